#!/usr/bin/env bash
# SEC weight (eta) sweep behind the default sec.weight: MoCo v2 on the embedded digits
# default run (tiny convnet, 15 epochs, batch 64), final kNN top-1 per (eta, seed).
# eta is relative to the per-direction mean method loss (docs/guide/hypersphere.md, SEC), the convention
# since the SEC-strength fix (issue 11); for MoCo's symmetric loss the SEC term is 2 x eta x L_sec.
# Usage: bash benchmarks/sec_weight_digits.sh [OUT_DIR]   (about 15 min on 2 CPU cores)
set -euo pipefail
out=${1:-runs/sec_sweep}
for seed in 0 1; do
  for eta in off 0.01 0.1 1.0; do
    if [ "$eta" = off ]; then flags=(); else flags=(--sec-weight "$eta"); fi
    python -m ssl_sphere.pretrain --method moco "${flags[@]}" --seed "$seed" --output-dir "$out" \
      --run-name "eta_${eta}_s${seed}" run.progress=false eval.every_epochs=15 > /dev/null
    knn=$(grep '"kind": "eval"' "$out/eta_${eta}_s${seed}/metrics.jsonl" | tail -1 | python -c 'import json,sys; print(round(json.loads(sys.stdin.read())["knn_top1"], 2))')
    echo "eta=$eta seed=$seed knn_top1=$knn"
  done
done
