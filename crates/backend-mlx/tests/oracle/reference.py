"""Reference numerics from Python mlx-lm for backend-mlx's oracle tests.

Two commands:

  make-tiny OUT_DIR --arch llama|qwen2 [--quantize] [--seed N]
      Writes a random tiny model (config.json + model.safetensors) that both
      mlx-lm and backend-mlx can load.

  logits MODEL_DIR PROMPTS_JSON OUT_JSON --steps N [--full-logits]
      For each prompt (a list of token ids) runs a prefill and then N greedy
      decode steps with mlx-lm's own KV cache, and writes the greedy tokens
      and the logits of every step (all of them, or the top 64 with
      --full-logits absent) to OUT_JSON.

Weights are loaded exactly as mlx-lm loads them (mlx_lm.utils.load_model),
dequantization included, so any difference is ours.
"""

import argparse
import json
import pathlib
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def tiny_args(arch):
    base = dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=256,
        max_position_embeddings=512,
    )
    if arch == "llama":
        base.update(
            model_type="llama",
            rope_theta=10000.0,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    else:
        base.update(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True)
    return base


def make_tiny(args):
    mx.random.seed(args.seed)
    config = tiny_args(args.arch)
    if args.arch == "llama":
        from mlx_lm.models import llama as module
    else:
        from mlx_lm.models import qwen2 as module
    model = module.Model(module.ModelArgs.from_dict(config))
    # Larger weights than the default init make logits spread, so that a
    # numeric slip changes greedy tokens instead of hiding in the noise.
    params = tree_flatten(model.parameters())
    new = []
    for name, p in params:
        if name.endswith("norm.weight"):
            new.append((name, 1.0 + 0.1 * mx.random.normal(p.shape)))
        else:
            new.append((name, 0.08 * mx.random.normal(p.shape)))
    model.load_weights(new)
    if args.quantize:
        def predicate(path, module):
            if not hasattr(module, "to_quantized"):
                return False
            if path == "model.embed_tokens":
                return {"group_size": 32, "bits": 8}
            return True

        nn.quantize(model, group_size=32, bits=4, class_predicate=predicate)
        config["quantization"] = {
            "group_size": 32,
            "bits": 4,
            "model.embed_tokens": {"group_size": 32, "bits": 8},
        }
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def run_logits(args):
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(pathlib.Path(args.model_dir))
    prompts = json.loads(pathlib.Path(args.prompts).read_text())
    results = []
    for prompt in prompts:
        cache = make_prompt_cache(model)
        logits = model(mx.array(prompt)[None], cache=cache)[0, -1].astype(mx.float32)
        steps = []
        for _ in range(args.steps + 1):
            mx.eval(logits)
            token = int(mx.argmax(logits).item())
            entry = {"token": token}
            if args.full_logits:
                entry["logits"] = logits.tolist()
            else:
                top = mx.argsort(-logits)[:64]
                entry["top_ids"] = top.tolist()
                entry["top_logits"] = logits[top].tolist()
            steps.append(entry)
            logits = model(mx.array([[token]]), cache=cache)[0, -1].astype(mx.float32)
        results.append({"prompt": prompt, "steps": steps})
    pathlib.Path(args.out).write_text(json.dumps(results))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    tiny = sub.add_parser("make-tiny")
    tiny.add_argument("out_dir")
    tiny.add_argument("--arch", choices=["llama", "qwen2"], required=True)
    tiny.add_argument("--quantize", action="store_true")
    tiny.add_argument("--seed", type=int, default=0)
    logits = sub.add_parser("logits")
    logits.add_argument("model_dir")
    logits.add_argument("prompts")
    logits.add_argument("out")
    logits.add_argument("--steps", type=int, default=4)
    logits.add_argument("--full-logits", action="store_true")
    args = parser.parse_args()
    if args.cmd == "make-tiny":
        make_tiny(args)
    else:
        run_logits(args)


if __name__ == "__main__":
    sys.exit(main())
