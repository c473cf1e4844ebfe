"""End-to-end checks of mlx-batch driven by the official `openai` client.

Run by tests/e2e_openai.rs against a server it started on the default
model; the base URL comes as the first argument. Every check asserts, so
a failure exits non-zero with a traceback. Timings are printed as JSON
lines prefixed with "measure:" for the report.
"""

import json
import sys
import threading
import time
import urllib.request

from openai import OpenAI

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


CHECKS = {
    "basic": lambda: (check_models(), check_chat_stream(check_chat()), check_completions()),
    "concurrent": check_concurrent_streams_match_solo,
    "priority": check_high_priority_overtakes_low,
    "disconnect": check_disconnect_frees_capacity,
    "preempt": check_high_enters_a_full_batch,
    "long_prompt": check_short_prompts_start_beside_a_long_one,
    "measure": measure,
}

if __name__ == "__main__":
    for name in [a for a in sys.argv[3:] if a in CHECKS]:
        t = time.monotonic()
        CHECKS[name]()
        print(f"ok: {name} ({time.monotonic() - t:.1f}s)", flush=True)
