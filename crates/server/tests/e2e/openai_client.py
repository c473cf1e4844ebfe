"""End-to-end checks of mlx-batch driven by the official `openai` client.

Run by tests/e2e_openai.rs against a server it started on the default
model; the base URL comes as the first argument. Every check asserts, so
a failure exits non-zero with a traceback. Timings are printed as JSON
lines prefixed with "measure:" for the report.
"""

import json
import os
import sys
import threading
import time
import urllib.request
from typing import Literal

from openai import BadRequestError, OpenAI
from pydantic import BaseModel

BASE = sys.argv[1]
MODEL = sys.argv[2]
client = OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0)

CHAT = [{"role": "user", "content": "Name three colors."}]
# The server's max_batch_size (tests/e2e_openai.rs starts it with 8).
BATCH = 8


def chat_once(max_tokens=12, messages=CHAT):
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0
    )
    return r


def check_models():
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL], ids


def check_chat():
    r = chat_once()
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length"), r
    assert len(text) > 0, r
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0, r.usage
    # Greedy decoding is deterministic.
    assert chat_once().choices[0].message.content == text
    return text


def check_chat_stream(expected):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(pieces) == expected, ("".join(pieces), expected)
    assert finish in ("stop", "length"), finish
    assert usage is not None and usage.completion_tokens > 0, usage


def check_completions():
    prompt = "Once upon a time,"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    text = r.choices[0].text
    assert len(text) > 0 and r.choices[0].finish_reason == "length", r
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == text, (streamed, text)


def stream_text(messages, max_tokens, priority=None, marks=None, key=None):
    extra = {"priority": priority} if priority else None
    start = time.monotonic()
    first = None
    pieces = []
    tokens = 0
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    ):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.delta.content:
                if first is None:
                    first = time.monotonic()
                pieces.append(c.delta.content)
    if marks is not None:
        marks[key] = (first, time.monotonic(), start, tokens)
    return "".join(pieces)


def run_threads(fns):
    results = [None] * len(fns)

    def wrap(i, f):
        results[i] = f()

    threads = [threading.Thread(target=wrap, args=(i, f)) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def check_concurrent_streams_match_solo():
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 5}."}] for i in range(8)]
    alone = [stream_text(p, 10) for p in prompts]
    marks = {}
    together = run_threads(
        [lambda p=p, i=i: stream_text(p, 10, marks=marks, key=i) for i, p in enumerate(prompts)]
    )
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a == b, f"stream {i}: alone {a!r} but batched {b!r}"


def check_high_priority_overtakes_low():
    marks = {}
    long_msgs = [[{"role": "user", "content": f"Tell a long story about dragon {i}."}] for i in range(10)]
    fns = []
    # The running LOW requests have different lengths, so their slots free
    # one step apart: the first free slot must go to HIGH. With equal
    # lengths all slots free in one step, HIGH and the queued LOWs start
    # together, and their first tokens arrive in no meaningful order.
    for i, m in enumerate(long_msgs):
        fns.append(lambda m=m, i=i: stream_text(m, 24 + 4 * i, "low", marks, f"low{i}"))
    threads = []
    # Fill the batch first, then queue more LOW work, then send HIGH.
    for f in fns[:8]:
        t = threading.Thread(target=f)
        t.start()
        threads.append(t)
    wait_metric("mlx_batch_running_requests", lambda v: v >= 8)
    for f in fns[8:]:
        t = threading.Thread(target=f)
        t.start()
        threads.append(t)
    wait_metric("mlx_batch_waiting_requests", lambda v: v >= 2)
    high = threading.Thread(
        target=lambda: stream_text(CHAT, 4, "high", marks, "high")
    )
    high.start()
    high.join()
    for t in threads:
        t.join()
    high_first = marks["high"][0]
    for key in ("low8", "low9"):
        assert high_first < marks[key][0], f"HIGH first token after queued {key}: {marks}"


def metric(name):
    with urllib.request.urlopen(f"{BASE}/metrics") as resp:
        text = resp.read().decode()
    total = None
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total = (total or 0) + float(line.rsplit(" ", 1)[1])
    return total


def wait_metric(name, ok, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = metric(name)
        if v is not None and ok(v):
            return v
        time.sleep(0.05)
    raise AssertionError(f"{name} never satisfied the condition; last {metric(name)}")


def check_disconnect_frees_capacity():
    wait_metric("mlx_batch_kv_blocks_used", lambda v: v == 0)
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=400, temperature=0, stream=True
    )
    seen = 0
    for chunk in stream:
        seen += 1
        if seen == 3:
            break
    assert metric("mlx_batch_kv_blocks_used") > 0
    stream.close()
    wait_metric("mlx_batch_kv_blocks_used", lambda v: v == 0, timeout=10)
    wait_metric("mlx_batch_running_requests", lambda v: v == 0, timeout=10)


def ttft_of(messages, max_tokens, priority=None):
    marks = {}
    stream_text(messages, max_tokens, priority, marks, "x")
    first, _, start, _ = marks["x"]
    return first - start


def idle_ttft(messages, max_tokens=4, priority=None, tries=3):
    """The median time to first token on an idle server."""
    wait_metric("mlx_batch_running_requests", lambda v: v == 0)
    return sorted(ttft_of(messages, max_tokens, priority) for _ in range(tries))[tries // 2]


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def check_high_enters_a_full_batch():
    """HIGH gets in within a step of a full batch of LOW streams, which
    pause and resume without a gap or a changed token."""
    batch = BATCH
    prompts = [[{"role": "user", "content": f"Describe the colour number {i} in detail."}] for i in range(batch)]
    n_low = 40
    alone = [stream_text(p, n_low) for p in prompts]
    idle = idle_ttft(CHAT, 4, "high")
    before = metric('mlx_batch_preemptions_total{reason="priority"}') or 0
    tokens_before = metric("mlx_batch_tokens_generated_total") or 0
    marks = {}
    threads = [
        threading.Thread(target=lambda p=p, i=i: marks.__setitem__(("text", i), stream_text(p, n_low, "low", marks, i)))
        for i, p in enumerate(prompts)
    ]
    for t in threads:
        t.start()
    # Every LOW stream is decoding: the batch is full.
    wait_metric("mlx_batch_running_requests", lambda v: v >= batch)
    wait_metric("mlx_batch_tokens_generated_total", lambda v: v >= tokens_before + 2 * batch)
    high = ttft_of(CHAT, 4, "high")
    for t in threads:
        t.join()
    itl = median((marks[i][1] - marks[i][0]) / max(marks[i][3] - 1, 1) for i in range(batch))
    pauses = (metric('mlx_batch_preemptions_total{reason="priority"}') or 0) - before
    print(
        "measure:",
        json.dumps({"check": "preempt", "batch": batch, "idle_high_ttft_s": round(idle, 3),
                    "loaded_high_ttft_s": round(high, 3), "low_step_s": round(itl, 3), "pauses": pauses}),
        flush=True,
    )
    assert pauses >= 1, "HIGH entered without pausing anyone"
    assert high <= 3 * idle + itl, f"HIGH TTFT {high:.3f}s > 3 x idle {idle:.3f}s + one step {itl:.3f}s"
    for i in range(batch):
        assert marks[("text", i)] == alone[i], f"LOW {i}: alone {alone[i]!r} but {marks[('text', i)]!r}"
    wait_metric("mlx_batch_paused_requests", lambda v: v == 0)


def long_prompt(topic):
    """A prompt of about 1.3k tokens; each topic shares no block with another
    (beyond the chat template's system prompt), so the prefix cache cannot
    serve one from the other."""
    return [{"role": "user", "content": f"Summarise this text about the {topic}. " + " ".join(
        f"Paragraph {i}: the {topic} ran past the mill, the miller counted sacks of grain, and the children played by the water."
        for i in range(48))}]


def check_short_prompts_start_beside_a_long_one():
    """Short requests behind a long prompt start within a few steps: their
    TTFT is compared with the same short requests sent together to an idle
    server."""
    # Every round asks new questions, so that no round's prompts are served
    # from the prefix cache that an earlier round filled.
    def short_ttfts(marks, round_):
        shorts = [[{"role": "user", "content": f"Name {i} colors of a {round_}."}] for i in range(2, 6)]
        run_threads([lambda m=m, i=i: stream_text(m, 4, marks=marks, key=i) for i, m in enumerate(shorts)])
        return [marks[i][0] - marks[i][2] for i in range(len(shorts))]

    wait_metric("mlx_batch_running_requests", lambda v: v == 0)
    idle = median(max(short_ttfts({}, round_)) for round_ in ("car", "bird", "house"))
    wait_metric("mlx_batch_running_requests", lambda v: v == 0)
    alone_long = ttft_of(long_prompt("river"), 4)
    marks = {}
    # Another topic, so the long prompt is computed again, not read from the
    # prefix cache that the run alone filled.
    long = threading.Thread(target=lambda: stream_text(long_prompt("brook"), 4, marks=marks, key="long"))
    long.start()
    # The long prompt is being prefilled when the short ones arrive.
    wait_metric("mlx_batch_running_requests", lambda v: v >= 1)
    ttfts = short_ttfts(marks, "flower")
    long.join()
    long_ttft = marks["long"][0] - marks["long"][2]
    print(
        "measure:",
        json.dumps({"check": "long_prompt", "idle_shorts_ttft_p99_s": round(idle, 3),
                    "shorts_ttft_p99_s": round(max(ttfts), 3), "long_ttft_alone_s": round(alone_long, 3),
                    "long_ttft_with_shorts_s": round(long_ttft, 3)}),
        flush=True,
    )
    assert max(ttfts) <= 5 * idle, f"short TTFT p99 {max(ttfts):.3f}s > 5 x idle {idle:.3f}s"
    assert long_ttft > max(ttfts), "the short requests were not served beside the long prompt"


def measure():
    """Time to first token and decode throughput, 1 and 8 streams."""
    n_tokens = 32
    for streams in (1, 8):
        marks = {}
        msgs = [[{"role": "user", "content": f"Write a poem about the number {i}."}] for i in range(streams)]
        start = time.monotonic()
        texts = run_threads(
            [lambda m=m, i=i: stream_text(m, n_tokens, marks=marks, key=i) for i, m in enumerate(msgs)]
        )
        wall = time.monotonic() - start
        ttft = sorted(v[0] - v[2] for v in marks.values())
        tokens = sum(v[3] for v in marks.values())
        print(
            "measure:",
            json.dumps(
                {
                    "streams": streams,
                    "max_tokens": n_tokens,
                    "ttft_median_s": round(ttft[len(ttft) // 2], 3),
                    "wall_s": round(wall, 3),
                    "completion_tokens": tokens,
                    "tokens_per_s": round(tokens / wall, 1),
                    "chars": sum(len(t) for t in texts),
                }
            ),
            flush=True,
        )


class Weather(BaseModel):
    """What `structured` asks for: short fields, so a small model finishes."""

    city: Literal["Paris", "Oslo", "Lima", "Tokyo"]
    unit: Literal["celsius", "fahrenheit"]
    temperature: int
    raining: bool


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima", "Tokyo"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima", "Tokyo"]}},
            "required": ["city"],
        },
    },
}


def weather_question(i):
    city = ["Paris", "Oslo", "Lima", "Tokyo"][i % 4]
    return [
        {"role": "system", "content": "Answer with the weather report as JSON."},
        {"role": "user", "content": f"What is the weather like in {city} today?"},
    ]


def parse_weather(i, streamed, temperature=0.0):
    """One structured answer through the client's own parsing helpers."""
    kwargs = dict(model=MODEL, messages=weather_question(i), max_tokens=80, temperature=temperature,
                  seed=i, response_format=Weather)
    if streamed:
        with client.chat.completions.stream(**kwargs) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
    else:
        final = client.chat.completions.parse(**kwargs)
    choice = final.choices[0]
    assert choice.finish_reason == "stop", choice
    parsed = choice.message.parsed
    assert isinstance(parsed, Weather), choice.message
    return parsed


def check_structured_output():
    """8 concurrent answers in a pydantic schema, half of them streamed and
    a quarter sampled, batched beside free-text requests, each parsed by the
    client; streamed and whole answers agree."""
    structured = [lambda i=i: parse_weather(i, i % 2 == 1, 1.0 if i % 4 == 3 else 0.0) for i in range(BATCH)]
    free = [lambda i=i: stream_text([{"role": "user", "content": f"Tell me about the number {i}."}], 24)
            for i in range(4)]
    results = run_threads(structured + free)
    for i, parsed in enumerate(results[:BATCH]):
        assert parsed is not None, i
    assert all(results[BATCH:]), results[BATCH:]
    # Greedy and batch-invariant: the same question gives the same answer
    # streamed or not.
    assert results[0] == parse_weather(0, True), (results[0],)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "List two colours as JSON."}],
        max_tokens=60, temperature=0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict), r
    r = client.completions.create(
        model=MODEL, prompt="The weather report in JSON:", max_tokens=80, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {
            "name": "weather", "schema": Weather.model_json_schema(), "strict": True}}})
    assert r.choices[0].finish_reason == "stop", r
    Weather.model_validate_json(r.choices[0].text)


def check_tool_calls():
    """A named tool choice, streamed or not, gives a call whose arguments
    follow the schema; the conversation goes on with the tool's result."""
    messages = [{"role": "user", "content": "What's the weather in Oslo?"}]
    tools = [WEATHER_TOOL, TIME_TOOL]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice=named,
                                       max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather", calls
    args = json.loads(calls[0].function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit"), args

    streamed, finish = {}, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, tools=tools,
                                                tool_choice=named, max_tokens=60, temperature=0,
                                                stream=True):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                slot = streamed.setdefault(d.index, {"name": "", "arguments": ""})
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls", finish
    assert [(v["name"], json.loads(v["arguments"])) for v in streamed.values()] == [("get_weather", args)], streamed

    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=60, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1, r

    follow = messages + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"temperature": 3, "sky": "snow"})},
    ]
    r = client.chat.completions.create(model=MODEL, messages=follow, tools=tools, max_tokens=30, temperature=0)
    assert r.choices[0].message.content or r.choices[0].message.tool_calls, r


def check_logprobs_and_sampling():
    """Greedy log probabilities are self-consistent; penalties and logit
    bias change the output; unsupported fields are refused by name."""
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens or len(content) == r.usage.completion_tokens - 1, r
    for t in content:
        top = t.top_logprobs
        assert len(top) == 3, t
        assert t.token == top[0].token and abs(t.logprob - top[0].logprob) < 1e-4, t
        assert top[0].logprob >= top[1].logprob >= top[2].logprob, t
        assert t.logprob <= 0, t
    assert "".join(t.token for t in content) == r.choices[0].message.content, (content, r)
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [(t.token, round(t.logprob, 3)) for t in streamed] == [(t.token, round(t.logprob, 3)) for t in content]

    c = client.completions.create(model=MODEL, prompt="Once upon a time,", max_tokens=6, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6, lp
    assert "".join(lp.tokens) == c.choices[0].text, lp

    base = chat_once(max_tokens=30).choices[0].message.content
    first_token = content[0]
    penalised = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=30, temperature=0,
                                               frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].message.content != base, base
    # Ban the greedy first token: the answer must start differently.
    tokens = client.completions.create(model=MODEL, prompt="Once upon a time,", max_tokens=1, temperature=0,
                                       logprobs=1)
    first = tokens.choices[0].text
    banned_id = token_id_of(first)
    unbanned = client.completions.create(model=MODEL, prompt="Once upon a time,", max_tokens=1, temperature=0,
                                         logit_bias={str(banned_id): -100})
    assert unbanned.choices[0].text != first, (first, unbanned)
    forced = client.completions.create(model=MODEL, prompt="Once upon a time,", max_tokens=3, temperature=0,
                                       logit_bias={str(banned_id): 100})
    assert forced.choices[0].text == first * 3, (first, forced)
    assert first_token.token, first_token

    for bad, param in (({"best_of": 2}, "best_of"), ({"functions": []}, "functions")):
        try:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body=bad)
        except BadRequestError as e:
            assert e.body["param"] == param and e.body["code"] == "unknown_parameter", e.body
        else:
            raise AssertionError(f"{bad} was accepted")


def byte_chars():
    """GPT-2's table from bytes to the printable characters byte-level BPE
    vocabularies spell them with."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def token_id_of(text):
    """The id of the one token `text` is, from the model's tokenizer file
    (the server tokenizes it as one token: checked first)."""
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == 1, (text, r.usage)
    with open(os.path.join(os.environ["MLX_BATCH_MODEL_DIR"], "tokenizer.json"), encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    table = byte_chars()
    return vocab["".join(table[b] for b in text.encode())]


def measure_structured():
    """What constrained rows cost: 8 streams all free, half constrained, all
    constrained; the free rows' own throughput shows what they pay for
    their constrained neighbours."""
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {
        "type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
        "required": ["notes"]}}}
    for n_constrained in (0, BATCH // 2, BATCH):
        marks = {}

        def one(i):
            kwargs = dict(model=MODEL, messages=weather_question(i), max_tokens=64, temperature=0)
            if i < n_constrained:
                kwargs["response_format"] = schema
            t0 = time.monotonic()
            r = client.chat.completions.create(**kwargs)
            marks[i] = (time.monotonic() - t0, r.usage.completion_tokens)

        start = time.monotonic()
        run_threads([lambda i=i: one(i) for i in range(BATCH)])
        wall = time.monotonic() - start
        tokens = sum(v[1] for v in marks.values())
        free = [marks[i] for i in range(n_constrained, BATCH)]
        free_rate = sum(t for _, t in free) / sum(d for d, _ in free) if free else None
        print("measure:", json.dumps({
            "check": "structured", "constrained_rows": n_constrained, "streams": BATCH,
            "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1),
            "free_row_tokens_per_s": round(free_rate, 2) if free_rate else None}), flush=True)


CHECKS = {
    "basic": lambda: (check_models(), check_chat_stream(check_chat()), check_completions()),
    "concurrent": check_concurrent_streams_match_solo,
    "priority": check_high_priority_overtakes_low,
    "disconnect": check_disconnect_frees_capacity,
    "preempt": check_high_enters_a_full_batch,
    "long_prompt": check_short_prompts_start_beside_a_long_one,
    "structured": check_structured_output,
    "tools": check_tool_calls,
    "logprobs": check_logprobs_and_sampling,
    "measure": measure,
    "measure_structured": measure_structured,
}

if __name__ == "__main__":
    for name in [a for a in sys.argv[3:] if a in CHECKS]:
        t = time.monotonic()
        CHECKS[name]()
        print(f"ok: {name} ({time.monotonic() - t:.1f}s)", flush=True)
