#!/usr/bin/env bash
# Single node, N GPUs (or N CPU processes with --device cpu, gloo backend).
#
#   launch/torchrun.sh NGPUS [pretrain args...]
#   launch/torchrun.sh 8 --config configs/cifar10/moco_sec.yaml data.root=/data/cifar
#
# Every argument after NGPUS goes to `python -m ssl_sphere.pretrain` unchanged.
# --batch-size is PER PROCESS: the global batch is NGPUS x batch, and the default
# lr (optim.base_lr x global batch / 128) and the MoCo queue check use the global batch.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 NGPUS [pretrain args...]" >&2
  exit 2
fi
nproc=$1
shift
exec torchrun --standalone --nnodes=1 --nproc_per_node="$nproc" -m ssl_sphere.pretrain "$@"
