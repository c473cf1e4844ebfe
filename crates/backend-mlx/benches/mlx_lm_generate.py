"""mlx-lm's batch_generate on the same weights as benches/generate.rs.

Prints RESULT lines in the same format as the Rust bench: prefill tokens/s
(one 256-token prompt) and decode tokens/s summed over the batch (prompts of
64 tokens, greedy, no stop tokens), for the weights as stored ("native",
4-bit) and dequantized to f32 ("f32").

usage: python3 mlx_lm_generate.py MODEL_DIR [--dtypes f32,native] [--batches 1,8,32]
"""

import argparse
import pathlib

import mlx.core as mx
from mlx_lm.generate import batch_generate
from mlx_lm.utils import dequantize_model, load_model

DECODE_PROMPT = 64
PREFILL_PROMPT = 256


class NoStopTokenizer:
    """batch_generate needs only these two members; no stop tokens keeps
    every sequence running for the full measurement."""

    eos_token_ids = []

    def decode(self, ids):
        return ""


def prompt(seq, length):
    return [(seq * 7919 + i * 104729) % 40000 + 100 for i in range(length)]


def load(model_dir, dtype):
    model, _ = load_model(pathlib.Path(model_dir))
    if dtype == "f32":
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--dtypes", default="f32,native")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    tok = NoStopTokenizer()
    for dtype in args.dtypes.split(","):
        model = load(args.model_dir, dtype)
        batch_generate(model, tok, [prompt(0, PREFILL_PROMPT)], max_tokens=2)
        mx.reset_peak_memory()
        runs = [
            batch_generate(model, tok, [prompt(1 + i, PREFILL_PROMPT)], max_tokens=1)
            for i in range(3)
        ]
        tps = sum(r.stats.prompt_tps for r in runs) / len(runs)
        print(
            f"RESULT mlx-lm prefill dtype={dtype} batch=1 tok_s={tps:.1f} "
            f"peak_mib={mx.get_peak_memory() / 2**20:.0f}",
            flush=True,
        )
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = [prompt(100 + i, DECODE_PROMPT) for i in range(batch)]
            batch_generate(model, tok, prompts, max_tokens=4)
            mx.reset_peak_memory()
            r = batch_generate(model, tok, prompts, max_tokens=args.max_tokens)
            print(
                f"RESULT mlx-lm decode dtype={dtype} batch={batch} "
                f"tok_s={r.stats.generation_tps:.1f} "
                f"peak_mib={mx.get_peak_memory() / 2**20:.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
