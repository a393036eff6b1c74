#!/usr/bin/env bash
# The CPU ladder's upper rungs (cpu-ladder-micro, cpu-ladder-small) on a lent GPU, for the device tool: the
# suites' own protocol and settings, in strict fp32 (their dtype: no bf16 autocast, no TF32), one `lmopt train`
# process per run and many at once on the one GPU (runs this small are launch-bound: each leaves the GPU mostly
# idle). Records name the device they ran on, and the reports say so. Whatever finishes within LIMIT seconds is
# kept; the runner resumes the rest anywhere (on the GPU again, or on a CPU: the report then counts both).
#
# Run from the repository root with the prepared data (data/prepared/brown.bpe-8192, data/tokenizers) and
# cpu-full's finished records (the rungs start from its tuned values); LMOPT_COMMIT names the commit of a tree that
# travelled without its .git. The records come back in $OUT/ladder-records.tgz, the logs beside it.
# A CPU smoke test of the script itself: RUNGS=cpu-quick LIMIT=60 JOBS=2 PYTHON=.venv/bin/python scripts/gpu-ladder.sh
set -u
OUT=${OUT:-runs/gpu-ladder}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LMOPT_DATA=$PWD/data LMOPT_RUNS=${LMOPT_RUNS:-$OUT/work}
PY=${PYTHON:-python3}
RUNGS=${RUNGS:-cpu-ladder-micro cpu-ladder-small}

{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1
  $PY -c 'import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'
  nproc; } > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

for rung in $RUNGS; do  # the rungs at once: each one's tuning is a chain of runs, so one rung cannot fill the GPU
  timeout -k 30 -s TERM "${LIMIT:-480}" $PY -m lmopt.cli bench run "$rung" --jobs "${JOBS:-7}" > "$OUT/$rung.log" 2>&1 &
done
wait
for rung in $RUNGS; do
  $PY -m lmopt.cli bench report "$rung" >> "$OUT/$rung.log" 2>&1
  tail -n "${TAIL:-8}" "$OUT/$rung.log"
done
$PY -m lmopt.cli bench ladder cpu-ladder > "$OUT/ladder.log" 2>&1
cat "$OUT/ladder.log"
# shellcheck disable=SC2086  # RUNGS is a list of suite names
tar czf "$OUT/ladder-records.tgz" $(for rung in $RUNGS; do echo "results/$rung"; done) results/cpu-ladder 2>/dev/null
ls -la "$OUT"
