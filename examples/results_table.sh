#!/usr/bin/env bash
# The runs behind the README's results table (2-core CPU): bash examples/results_table.sh [JOBS]
# Every row: today's code, one thread per run (--threads 1), TensorFlow op determinism (--deterministic), so a row
# repeats exactly with the same command on the same versions. JOBS runs (default 2) share the machine; a finished row
# (runs/<name>/results.json) is skipped, an interrupted one resumes. Then: python examples/summarize_runs.py --plots fast-s2
cd "$(dirname "$0")/.."
mkdir -p runs
JOBS=${1:-2}
rows() {
  # name, then the options of examples/mnist.py
  for s in 0 1 2 3 4; do echo "fast-s$s --seed $s --budget-bops 0"; done  # fixed mu = 0.1
  for s in 0 1 2 3 4; do echo "budget033-s$s --seed $s --budget-bops 0.33"; done  # the default run
  echo "gumbel-b038 --method gumbel --budget-bops 0.38"
  echo "float --method float"
  for m in tfmot_w8a8 tfmot_w4a8 tfmot_w2a8 quant_only prune_only_w8 prune_only_w4 gumbel; do echo "$m --method $m"; done
}
run() {
  name=$1; shift
  # a finished row is skipped; an interrupted one resumes (the same command continues from its checkpoint)
  [ -f "runs/$name/results.json" ] && ! grep -q '"complete": false' "runs/$name/results.json" && return 0
  python examples/mnist.py --output-dir "runs/$name" --verbose 2 --no-export --threads 1 --deterministic "$@" \
    > "runs/$name.log" 2>&1
}
export -f run
rows | xargs -P "$JOBS" -L 1 bash -c 'run "$@"' _
