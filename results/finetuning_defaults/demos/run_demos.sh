#!/bin/bash
# each fine-tuning bundle's demo as a user runs it (train.json defaults), then its evaluate.json; times in seconds
cd /work/main
for b in "$@"; do
  root=/work/runs/demos/$b
  start=$(date +%s)
  python -m monai.bundle run training --config_file bundles/$b/configs/train.json --bundle_root $root > $root.train.log 2>&1
  mid=$(date +%s)
  python -m monai.bundle run --config_file "['bundles/$b/configs/train.json','bundles/$b/configs/evaluate.json']" --bundle_root $root > $root.eval.log 2>&1
  end=$(date +%s)
  echo "$b train_seconds=$((mid-start)) eval_seconds=$((end-mid)) threads=${OMP_NUM_THREADS:-default}" >> /work/runs/demos/times.txt
done
