#!/usr/bin/env bash
# Train the two shipped neural potentials on a GPU within a fixed time budget each.
#   BUDGET=170 bash data/neural/train_gpu.sh OUT_DIR   (nn-gfn2-chno shipped with BUDGET=400)
# Each training stops after the number of epochs that fits BUDGET seconds (measured in its
# first epoch); the learning rate follows a cosine over exactly those epochs. The chosen
# number is recorded in the model card, so `molopt train ... --epochs N` reproduces it.
# FINETUNE=1 starts each from the shipped potential's weights (molopt train --init) with a
# peak learning rate of 5e-4 instead of training from scratch: GPU time adds up over sessions.
# For gfn2-chno it continues the CPU fine-tuning recipe the shipped model came from
# (configs/train-gfn2-chno-finetune2.toml): peak 3e-4, huber_delta 0.02, ema_decay 0.999.
# NAMES="gfn2-chno" trains only the potentials named (default: both).
# SET="learning_rate = 1e-3; batch_atoms = 2048" overrides config keys (after FINETUNE's);
# Several runs may share one GPU, each with its own OUT_DIR (the config used is copied there).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-data/neural/trained}
budget=${BUDGET:-170}
mkdir -p "$out"
# float32 matrix products at full precision (not TF32) on the GPU
export PYTHONUNBUFFERED=1 JAX_DEFAULT_MATMUL_PRECISION=highest
for name in ${NAMES:-emt-metals gfn2-chno}; do
  work=$(mktemp -d "/tmp/molopt-train-$name.XXXXXX")
  cfg=$work.toml
  data="data/neural/$name/train.extxyz.gz"
  source="configs/train-$name.toml"
  batches=(-e 's/^batch_atoms = .*/batch_atoms = 1024/' -e 's/^batch_structures = .*/batch_structures = 96/')
  if [ "$name" = gfn2-chno ]; then
    # the GPU recipe: 128 features, batches of 1024 atoms; plus the coverage molecules and,
    # where generated, the extra molecules (generate_gfn2.py extra)
    data="$data data/neural/$name/train-coverage.extxyz.gz"
    extra=data/neural/$name/train-extra.extxyz.gz
    [ -f "$extra" ] && data="$data $extra"
    source="configs/train-$name-gpu.toml"
    batches=()
  fi
  if [ ! -f "$source" ] || [ ! -f "data/neural/$name/train.extxyz.gz" ]; then
    echo "unknown potential $name (NAMES takes emt-metals, gfn2-chno)"; continue
  fi
  sed -e 's/^epochs = .*/epochs = 3000/' -e 's/^patience = .*/patience = 3000/' "${batches[@]}" \
      -e 's/^max_time_s = .*/max_time_s = 100000/' -e '/^time_budget_s = /d' "$source" > "$cfg"
  echo "time_budget_s = $budget" >> "$cfg"
  init=()
  if [ "${FINETUNE:-0}" = 1 ]; then
    init=(--init "nn-$name")
    sed -i 's/^learning_rate = .*/learning_rate = 5e-4/' "$cfg"
    if [ "$name" = gfn2-chno ]; then
      sed -i -e 's/^learning_rate = .*/learning_rate = 3e-4/' \
          -e 's/^huber_delta = .*/huber_delta = 0.02/' "$cfg"
      grep -q '^ema_decay = ' "$cfg" || echo "ema_decay = 0.999" >> "$cfg"
    fi
  fi
  IFS=';' read -ra sets <<< "${SET:-}"
  for kv in "${sets[@]}"; do
    key=${kv%%=*}; key=${key//[[:space:]]/}
    value=$(sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' <<< "${kv#*=}")
    [ -z "$key" ] && continue
    if grep -q "^$key = " "$cfg"; then sed -i "s|^$key = .*|$key = $value|" "$cfg"
    else echo "$key = $value" >> "$cfg"; fi
  done
  cp "$cfg" "$out/train-$name.toml"
  timeout $((budget + 240)) python -m molopt.cli train $data "${init[@]}" \
      -c "$cfg" -o "$work" --test "data/neural/$name/test.extxyz.gz" 2>&1 | tail -n 400 > "$out/train-$name.log"
  tail -n 5 "$out/train-$name.log"
  cp "$work"/nn-*.toml "$work"/nn-*.eqx "$out"/ 2>/dev/null || echo "no potential written for $name"
done
ls -la "$out"
