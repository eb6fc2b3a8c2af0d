#!/usr/bin/env bash
# One lent-GPU session, prepared on the CPU (DEVELOPERS.md standing order): environment check, the
# CUDA-marked tests, benchmarks/gpu.sh, then hypersphere-study cells (GPU budget) until the time is up.
#
# Run on the device machine from the repo root, with the packed CIFAR-10 folder and the wheels the
# image lacks carried along (see docs/benchmarks/performance.md, "GPU sessions"):
#
#   python benchmarks/pack_folder.py pack ../shared/data/cifar10 .gpu/cifar10.pack     # here, once
#   bash benchmarks/gpu_session.sh [SECONDS]                                            # there; default 540
#
# Every phase gets the time that is left and a failing phase never stops the next one. Everything it
# prints goes to $OUT/session.log as it happens; the records come back in $OUT/results.tgz (unpack it
# in the repo root).
set -uo pipefail
START=$(date +%s)
LIMIT=${1:-540}
OUTDIR=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUTDIR"
exec > >(tee -a "$OUTDIR/session.log") 2>&1
left() { echo $((LIMIT - ($(date +%s) - START))); }
phase() {  # phase NAME MIN_SECONDS COMMAND...: run COMMAND with the time left (skipped below MIN_SECONDS)
  local name=$1 min=$2 t
  shift 2
  t=$(left)
  if [ "$t" -lt "$min" ]; then echo "## SKIPPED $name: ${t}s left"; return 1; fi
  echo "## $name: start $(date +%T), ${t}s left"
  timeout "$t" "$@"
  local rc=$?
  echo "## $name: rc $rc, $(( $(date +%s) - START ))s into the session"
  return $rc
}

# --- environment: stop at once if it is not usable (a rerun is cheaper than a session of failures)
export PYTHONUNBUFFERED=1 PYTHON=python3
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p /tmp/bin && ln -sf "$(command -v python3)" /tmp/bin/python && export PATH="/tmp/bin:$PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 - <<'EOF' || exit 3
import sys, torch, torchvision, kornia, lightly, omegaconf, sklearn, tensorboard
import ssl_sphere.engine.train; sys.path.insert(0, "benchmarks"); import bench
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torchvision", torchvision.__version__,
      "| kornia", kornia.__version__, "| lightly", lightly.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
DATA=/tmp/cifar10
[ -d $DATA/train ] || python3 benchmarks/pack_folder.py unpack .gpu/cifar10.pack $DATA || exit 3

# --- 1. the CUDA-marked tests
phase cuda-tests 60 python3 -m pytest -m cuda -q -ra -p no:cacheprovider tests/
# --- 2. the GPU benchmark set
phase gpu.sh 60 bash benchmarks/gpu.sh $DATA
# --- 3. study cells (each cell is recorded when it finishes; a cell cut off by the limit is lost)
phase study 120 python3 eval/sphere_study.py --budget gpu --cells 8 --device cuda --data-root $DATA \
  --out benchmarks/results/sphere_study_gpu.json --runs-dir /tmp/study_runs

tar czf "$OUTDIR/results.tgz" benchmarks/results/gpu_* $(ls benchmarks/results/sphere_study_gpu.json 2>/dev/null) \
  docs/benchmarks/performance.md
echo "## done: $(( $(date +%s) - START ))s"
