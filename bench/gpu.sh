#!/usr/bin/env bash
# GPU benchmark (molopt only: the peers run on CPU). Needs molopt importable and a CUDA JAX.
# Usage: bash bench/gpu.sh [W2 W4 W1M W3]   (about 3 minutes on one H100)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -c "import jax; print('JAX', jax.__version__, jax.devices())"
python bench/gpu.py "$@"
