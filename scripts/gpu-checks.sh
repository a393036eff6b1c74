#!/usr/bin/env bash
# The checks a lent GPU machine runs (the device tool; about 8 minutes on one H100), in order of value, each with
# its own time limit so that a slow stage cannot take the rest with it:
#   env        the GPU, torch and the packages lmopt needs
#   step       lmopt bench step --device cuda on qwen3-134m's shapes (the GPU's optimizer-step table)
#   overhead   lmopt bench overhead: AdamW, Spectra and Muon through lmopt train on qwen3-134m, bf16 autocast,
#              torch.compile, 256 x 1,024 tokens per step (the gpu-134m suite's batch): the end-to-end overhead
#   rehearsal  the gpu-134m suite's own settings under torchrun on NCCL (FSDP2, bf16, compile), straight and
#              stopped half-way then resumed: the losses must agree bit for bit
#   step-compiled  the per-tensor optimizers' compiled steps on the GPU
#   tests      the trainer's tests on the GPU (their device "auto" is CUDA there) and the papers' tests (Spectra's
#              stacked GPU step against the per-matrix update runs only there)
# STAGES (default: all, in this order) picks some, e.g. STAGES="env overhead".
# Each stage's log and the results tables (.md, .json) go to $OUT (default runs/gpu-checks), flat (the device
# tool returns at most 8 files, 2 folders down); the runs stay in $OUT/work (not returned: their checkpoints).
# Run from the repository root with the prepared data under data/ (brown.bpe-8192, brown.qwen3, the packages);
# LMOPT_COMMIT names the commit of a tree that travelled without its .git. A CPU smoke test of the script itself:
#   DEVICE=cpu STEP_PRESET=nano E2E="preset=nano seq_len=64 batch_tokens=1024 eval_tokens=1024" E2E_STEPS=4 \
#   TEST_SELECT=tests/train/test_trainer.py::test_resume_is_bit_exact PYTHON=.venv/bin/python scripts/gpu-checks.sh
set -u
OUT=${OUT:-runs/gpu-checks}
W=$OUT/work
mkdir -p "$W/results"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1 LMOPT_DATA=$PWD/data LMOPT_RUNS=$W/runs
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
E2E=${E2E:-preset=qwen3-134m seq_len=1024 batch_tokens=262144 eval_tokens=32768}

pack() { find "$W/results" -name '*.md' -o -name '*.json' | tar czf "$OUT/results.tgz" -T - 2>/dev/null; }
want() { [[ " ${STAGES:-env step overhead rehearsal step-compiled tests} " == *" $1 "* ]]; }
stage() {
  local name=$1 limit=$2
  shift 2
  want "$name" || return 0
  echo "== $name (limit ${limit}s, $(date +%T))"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  tail -n "${TAIL:-20}" "$OUT/$name.log"
  pack
}

stage env 30 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name())'; $PY -m pip list 2>/dev/null | grep -iE '^(torch|tokenizers|safetensors|rich|scipy|numpy|matplotlib) '"

ROWS=("adamw (foreach)" muon "muon (gram)" "muon (standard Newton–Schulz)" lamb "lamb (foreach)" adafactor stable-adamw "stable-adamw (foreach)"
      ortho-adam "ortho-adam (kronecker)" asm asa "asa (foreach)" msam "msam (foreach)" amcs "amcs (foreach)" spectra
      "spectra (householder qr)" "spectra (refresh every 10)" "spectra (refresh after the step)" "spectra (for-loop)"
      "torch.optim.Muon (matrices only)" "lmopt muon (matrices only)" "spectra (matrices only)")
stage step "${STEP_LIMIT:-150}" $PY -m lmopt.cli bench step --device "$DEVICE" --preset "${STEP_PRESET:-qwen3-134m}" --repeats 15 \
  --warmup 3 --train-preset none --no-compiled --profile spectra muon --only "${ROWS[@]}" --out "$W/results/step"

# shellcheck disable=SC2086  # E2E is a list of KEY=VALUE words
stage overhead "${OVERHEAD_LIMIT:-220}" $PY -m lmopt.cli bench overhead --optimizers ${E2E_OPTIMIZERS:-adamw spectra muon} \
  --steps "${E2E_STEPS:-10}" --rounds 2 --set $E2E data=brown device="$DEVICE" dtype=bf16 compile=true \
  log_interval=4 adamw.impl=fused --out "$W/results/overhead"

stage rehearsal "${REHEARSAL_LIMIT:-90}" env DEVICE="$DEVICE" LMOPT_RUNS="$W/runs/rehearsal" $PY -m torch.distributed.run \
  --standalone --nproc_per_node 1 tests/train/dist_worker.py rehearsal 8
want rehearsal && $PY - "$W/runs/rehearsal" > "$OUT/rehearsal-compare.txt" 2>&1 <<'EOF'
import sys
from pathlib import Path
from lmopt.train.metrics import read_metrics
runs = Path(sys.argv[1])
losses = {name: [r["train_loss"] for r in read_metrics(runs / name / "metrics.jsonl") if r["event"] == "train"]
          for name in ("rehearsal-straight", "rehearsal-resumed")}
print(losses)
print("resume bit-exact:", losses["rehearsal-straight"] == losses["rehearsal-resumed"])
EOF
want rehearsal && cat "$OUT/rehearsal-compare.txt"
pack

# the per-tensor optimizers' compiled steps (what `lmopt train --compile true` runs): eager they wait on kernel
# launches on a GPU (11-37x fused AdamW on an H100); compilation takes most of this stage's time
compiled_rows() {  # one process per optimizer, each time-boxed, so that a slow compilation loses only its row
  for name in ${COMPILED_ROWS:-lamb adafactor msam stable-adamw amcs asa}; do
    timeout "${COMPILED_EACH_LIMIT:-50}" $PY -m lmopt.cli bench step --device "$DEVICE" \
      --preset "${STEP_PRESET:-qwen3-134m}" --repeats 15 --warmup 3 --train-preset none \
      --only "$name (compiled)" --out "$W/results/step-compiled-$name"
    echo "$name (compiled): rc=$?"
  done
}
export PY DEVICE W COMPILED_ROWS COMPILED_EACH_LIMIT STEP_PRESET
stage step-compiled "${COMPILED_LIMIT:-300}" bash -c "$(declare -f compiled_rows); compiled_rows"

# shellcheck disable=SC2086  # TEST_SELECT is a list of pytest arguments
stage tests "${TESTS_LIMIT:-90}" $PY -m pytest -q -x -p no:cacheprovider ${TEST_SELECT:-tests/train/test_trainer.py \
  tests/optim/test_papers.py}
echo "== done ($(date +%T))"
