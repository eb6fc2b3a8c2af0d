#!/usr/bin/env bash
# The GPU numbers (ResNet-18 small stem, CIFAR-10, batch 512, bf16 autocast + channels_last, without and with
# torch.compile). Writes benchmarks/results/gpu_*.json and gpu_epoch.txt;
# `python benchmarks/make_table.py --prefix gpu_ --write` renders the JSON records into
# docs/benchmarks/performance.md (between the performance-table-gpu markers).
#
#   bash benchmarks/gpu.sh [CIFAR_IMAGE_FOLDER]     # default ../shared/data/cifar10
#
# Needs a CUDA device (exits 2 otherwise). Every measurement runs even when an earlier one failed; the
# exit code is the number of failed measurements. Most important first: augmentation, the three steps
# against lightly, the epoch wall time, the phase profile, then the compiled steps. $PYTHON (default
# python) runs everything.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10}
PY=${PYTHON:-python}
R=benchmarks/results
$PY - <<'EOF' || { echo "benchmarks/gpu.sh: torch not importable or no CUDA device visible (activate the venv on a GPU machine)" >&2; exit 2; }
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
[ -d "$DATA/train" ] || { echo "benchmarks/gpu.sh: no image folder at $DATA/train (pass the CIFAR-10 folder)" >&2; exit 2; }
GPU=(--device cuda model.channels_last=true run.precision=bf16)
failed=0
run() { "$@" && return 0; echo "benchmarks/gpu.sh: FAILED: $*" >&2; failed=$((failed + 1)); return 1; }

run $PY benchmarks/bench.py augment --device cuda --sizes 32,96,224 --batch 512 --repeats 30 --max-seconds 8 \
  --data-root "$DATA" --json --out $R/gpu_augment.json
# headline step numbers: the configs/cifar10 recipes (batch 512, their queue / heads), no --profile (its
# per-phase device syncs would slow the ssl_sphere pipeline only)
for m in simclr moco byol; do
  run $PY benchmarks/bench.py step --config configs/cifar10/$m.yaml --method $m --steps 30 --warmup 5 \
    --compare-lightly --workers 16 --data-root "$DATA" "${GPU[@]}" --json --out $R/gpu_step_$m.json
done

# epoch time: one real epoch of the training loop (kNN monitor off), wall clock of the whole process
# (includes process start-up and decoding the image folder)
: > $R/gpu_epoch.txt
for m in simclr moco; do
  start=$(date +%s.%N)
  if run $PY -m ssl_sphere.pretrain --config configs/cifar10/$m.yaml --dataset imagefolder --data-root "$DATA" \
      --epochs 1 --output-dir /tmp/ssl_sphere_gpu_epoch --run-name $m "${GPU[@]}" eval.every_epochs=0 run.progress=false; then
    end=$(date +%s.%N)
    echo "$m resnet18 batch 512 bf16 channels_last: 1 epoch (process start, data load, all steps, checkpoint)" \
      "$(awk "BEGIN {printf \"%.1f\", $end - $start}") s" | tee -a $R/gpu_epoch.txt
  fi
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a $R/gpu_epoch.txt

# where the time goes (synchronised phases; slower than the headline run by construction)
run $PY benchmarks/bench.py step --config configs/cifar10/moco_sec.yaml --method moco --sec --steps 20 --warmup 5 \
  --profile --data-root "$DATA" "${GPU[@]}" --json --out $R/gpu_step_moco_sec_profile.json
# torch.compile (the backbone; the warm-up steps include the compilation)
for m in simclr moco byol; do
  run $PY benchmarks/bench.py step --config configs/cifar10/$m.yaml --method $m --steps 20 --warmup 8 \
    --data-root "$DATA" "${GPU[@]}" model.compile=true --json --out $R/gpu_step_${m}_compile.json
done
run $PY benchmarks/make_table.py --prefix gpu_ --write
exit $failed
