#!/usr/bin/env bash
# Runs backend-mlx's generation bench and mlx-lm's batch_generate on the
# same model folder, one after the other, and prints tokens/s side by side.
#
# Both runs unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE in their own
# environment only: some machines set them to values that halve OpenBLAS
# GEMM speed, and both sides use the same OpenBLAS. Needs the Python
# reference and the default model (`cargo xtask setup --references`). Both sides read the same knobs from the environment:
# MLX_BATCH_BENCH_DTYPES, MLX_BATCH_BENCH_BATCHES, MLX_BATCH_BENCH_MODEL.
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
model="${MLX_BATCH_BENCH_MODEL:-$root/.models/SmolLM2-135M-Instruct}"
dtypes="${MLX_BATCH_BENCH_DTYPES:-f32,native}"
batches="${MLX_BATCH_BENCH_BATCHES:-1,8,32}"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
clean_env=(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE)

"${clean_env[@]}" MLX_BATCH_BENCH_REPORT_ONLY=1 MLX_BATCH_BENCH_MODEL="$model" \
    MLX_BATCH_BENCH_DTYPES="$dtypes" MLX_BATCH_BENCH_BATCHES="$batches" \
    cargo bench -q -p backend-mlx --bench generate 2>/dev/null | grep '^RESULT' | tee -a "$out"
# mlx-lm finds OpenBLAS the same way our binary links it: ahead of the
# wheel's reference BLAS.
openblas="$(ldconfig -p | awk '/libopenblas.so.0 /{print $NF; exit}')"
"${clean_env[@]}" ${openblas:+LD_PRELOAD="$openblas"} PYTHONPATH="$root/.mlx/python" \
    python3 "$root/crates/backend-mlx/benches/mlx_lm_generate.py" "$model" \
    --dtypes "$dtypes" --batches "$batches" | grep '^RESULT' | tee -a "$out"

python3 - "$out" <<'PY'
import re, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"RESULT (\S+) (\S+) dtype=(\S+) batch=(\d+) tok_s=([\d.]+) peak_mib=(\d+)", line)
    if m:
        who, kind, dtype, batch, tps, peak = m.groups()
        rows.setdefault((kind, dtype, int(batch)), {})[who] = (float(tps), int(peak))
print()
print(f"{'what':<10}{'dtype':<8}{'batch':>6}{'ours tok/s':>12}{'mlx-lm':>10}{'ratio':>8}{'peak MiB ours/mlx-lm':>24}")
for (kind, dtype, batch), v in sorted(rows.items()):
    o, p = v.get("ours", (0, 0)), v.get("mlx-lm", (0, 0))
    ratio = o[0] / p[0] if p[0] else float("nan")
    print(f"{kind:<10}{dtype:<8}{batch:>6}{o[0]:>12.1f}{p[0]:>10.1f}{ratio:>8.2f}{o[1]:>14}/{p[1]}")
PY
