#!/usr/bin/env bash
# Installs the Python reference (mlx-lm on the same MLX wheel that the Rust
# crate links) into the project-local, git-ignored folder `.mlx/python`.
# The oracle tests and the comparison benchmark look for it there and skip
# with a message when it is absent. Idempotent: a second run is a no-op.
set -euo pipefail
root="$(cd "$(dirname "$0")/../../../.." && pwd)"
target="$root/.mlx/python"
if [ -f "$target/.installed-0.32.2" ]; then
    exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --target "$target" \
    mlx==0.32.2 mlx-cpu==0.32.2 mlx-lm==0.32.2 numpy
touch "$target/.installed-0.32.2"
