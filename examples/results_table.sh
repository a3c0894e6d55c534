#!/usr/bin/env bash
# The runs behind the README's results table (2-core CPU): bash examples/results_table.sh
# Rows whose runs/<name>/results.json exists are skipped. Two queues run side by side, one thread each;
# then: python examples/summarize_runs.py --plots fast-s2
cd "$(dirname "$0")/.."
mkdir -p runs
run() { name=$1; shift; [ -f runs/$name/results.json ] && return; python examples/mnist.py --output-dir runs/$name --verbose 2 --no-export --threads 1 "$@" > runs/$name.log 2>&1; }
# The ablations, baselines and fast-v1 rows were made before the fast recipe decayed the gates' and ranges'
# learning rates: --decay-groups weights reproduces that recipe.
v1="--decay-groups weights"
(
  run fast-s0 --seed 0
  run fast-s1 --seed 1
  run fast-s2 --seed 2
  run fast-s3 --seed 3
  run fast-s4 --seed 4
  run fast-v1-s0 --seed 0 $v1
  run fast-v1-s1 --seed 1 $v1
  run fast-v1-s2 --seed 2 $v1
  run float --method float $v1
  run tfmot_w8a8 --method tfmot_w8a8 $v1
  run tfmot_w4a8 --method tfmot_w4a8 $v1
  run tfmot_w2a8 --method tfmot_w2a8 $v1
  run quant_only --method quant_only $v1
  run prune_only_w4 --method prune_only_w4 $v1
  run prune_only_w8 --method prune_only_w8 $v1
  run gumbel --method gumbel $v1
) &
run paper --recipe paper
wait
