#!/usr/bin/env bash
# The CPU benchmark studies in their order, each resumable (finished runs are skipped, an interrupted one
# resumes from its checkpoint): cpu-full, the variants that need its tuned configurations, the ladder rungs.
#
#   BENCH_SRC=/path/to/frozen/worktree/src  the lmopt source the suites run with (all of a suite's runs must
#                                           come from one version of the training code; default: this tree)
#   VARIANT_SRC=...                         the source the variant studies run with (default: this tree)
#   MSAM_VARIANT_SRC=...                    the source of the MSAM variant (needs its gamma_from option)
#   LADDER_SRC=...                          the source the ladder rungs run with (default: this tree)
#   nohup scripts/cpu-studies.sh >> runs/cpu-studies.log 2>&1 &
#
# Stop it with `kill -TERM <pid of the lmopt bench process>` (the runner forwards the signal and waits);
# records land in results/<suite>/ and are committed as they come.
set -euo pipefail
cd "$(dirname "$0")/.."
here="$(pwd)/src"
bench() { PYTHONPATH="${BENCH_SRC:-$here}" .venv/bin/python -m lmopt.cli bench "$@"; }
variant() { PYTHONPATH="${VARIANT_SRC:-$here}" .venv/bin/python -m lmopt.cli bench variant "$@" --jobs 2; }

# every optimizer's pipeline (after the momentum grid was widened to 0.6, Muon and Spectra re-tune from their
# records: the replayed search shares its first probes with the old path)
bench run cpu-full --jobs 2
bench report cpu-full
# issue 14: is any tuned knob's grid end hiding a better value? (one grid step further, held-out seeds)
variant cpu-full --grid-ends
# issue 19: Spectra's refresh interval, at its tuned configuration (the default is chosen from this)
variant cpu-full spectra --name spectra-refresh-10 --set optim.refresh_interval=10
variant cpu-full spectra --name spectra-refresh-after --set optim.refresh_timing=after
for n in 5 25 50; do
    variant cpu-full spectra --name "spectra-refresh-$n" --set "optim.refresh_interval=$n"
done
# issue 19: MSAM's one-pass option (gamma one step late) against its default
PYTHONPATH="${MSAM_VARIANT_SRC:-$here}" .venv/bin/python -m lmopt.cli bench variant cpu-full msam \
    --name msam-gamma-previous --set optim.gamma_from=previous --jobs 2
# issue 19: faster settings at equal results, paired on cpu-full's held-out seeds
variant cpu-full muon --name muon-ns-fp32 --set optim.ns_dtype=float32
variant cpu-full muon --name muon-gram --set optim.ns_dtype=float32 optim.ns_method=gram
variant cpu-full muon --name muon-polar-express --set optim.ns_dtype=float32 optim.ns_coefficients=polar-express
variant cpu-full muon --name muon-gram-bf16 --set optim.ns_dtype=bfloat16
variant cpu-full muon --name muon-polar-express-4-bf16 --set optim.ns_dtype=bfloat16 optim.ns_coefficients=polar-express \
    optim.ns_steps=4
variant cpu-full ortho-adam --name ortho-adam-kronecker --set optim.rotation=kronecker
# issue 19: MSAM's one-pass option needs more seeds to show equivalence (or not): 5 more, paired
variant cpu-full msam --name msam-gamma-previous --set optim.gamma_from=previous --extra-seeds 5 6 7 8 9
variant cpu-full --report
# issue 14: the model-size ladder (rungs 2 and 3 may instead run on a lent GPU in strict fp32: finished runs skip)
ladder() { PYTHONPATH="${LADDER_SRC:-$here}" .venv/bin/python -m lmopt.cli bench "$@"; }
ladder run cpu-ladder-micro --jobs 2
ladder run cpu-ladder-small --jobs 2
ladder report cpu-ladder-micro
ladder report cpu-ladder-small
ladder ladder cpu-ladder
