#!/usr/bin/env bash
# Split BN for single-process MoCo (model.split_bn, default 8) against plain BN (model.split_bn=1), at
# equal steps on the CIFAR-10 folder with the hypersphere study's CPU budget: tiny convnet, stratified
# 10,000-image subset, 2 epochs of batch 128 (156 steps), kNN bank = those 10,000 images, 2,000 queries.
# Usage: bash benchmarks/split_bn_cifar.sh [CIFAR_FOLDER] [OUT_DIR]   (about 15 min on 2 CPU cores)
set -euo pipefail
data=${1:-../shared/data/cifar10}
out=${2:-runs/split_bn}
for seed in 0 1 2; do
  for splits in 8 1; do
    python -m ssl_sphere.pretrain --method moco --dataset imagefolder --data-root "$data" --backbone tiny \
      --batch-size 128 --epochs 2 --seed "$seed" --output-dir "$out" --run-name "split${splits}_s${seed}" \
      model.split_bn="$splits" data.train_limit=10000 eval.every_epochs=2 eval.bank_size=10000 \
      eval.test_size=2000 method.queue_size=4096 run.progress=false > /dev/null
    knn=$(grep '"kind": "eval"' "$out/split${splits}_s${seed}/metrics.jsonl" | tail -1 | python -c 'import json,sys; print(round(json.loads(sys.stdin.read())["knn_top1"], 2))')
    echo "split_bn=$splits seed=$seed knn_top1=$knn"
  done
done
