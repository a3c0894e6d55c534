#!/usr/bin/env bash
# The runs behind the README's results table, one after another (2-core CPU): bash examples/results_table.sh
cd "$(dirname "$0")/.."
run() { name=$1; shift; [ -f runs/$name/results.json ] && return; python examples/mnist.py --output-dir runs/$name --verbose 2 --no-export "$@" > runs/$name.log 2>&1; }
run fast-s1 --seed 1
run fast-s2 --seed 2
run float --method float
run tfmot_w8a8 --method tfmot_w8a8
run tfmot_w4a8 --method tfmot_w4a8
run tfmot_w2a8 --method tfmot_w2a8
run quant_only --method quant_only
run prune_only_w4 --method prune_only_w4
run gumbel --method gumbel
run prune_only_w8 --method prune_only_w8
run fast-s0 --seed 0
run paper-15 --recipe paper --epochs 15
