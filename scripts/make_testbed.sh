#!/usr/bin/env bash
# The recipe of the shipped testbed (src/mambaprune/assets/testbed), piece by piece.
#
#   scripts/make_testbed.sh SYNTH OUT [--shipped-tower]
#
# SYNTH: a SynthVQA folder (written here with `mambaprune synth --per-family 2000` if it does not exist).
# OUT:   the run folder; the testbed is written there at the end (load it with load_model("testbed", OUT)).
# --shipped-tower: take the vision tower from the shipped testbed instead of training it (stage 1, ~18 min);
#   the shipped model did, and that tower is the one stage 1 below makes (run 30's).
#
# The shipped model was found step by step (docs/testbed.md, "What limits it": runs 39-45), so its schedule changed
# along the way; each piece below resumes OUT/last.pt with that piece's settings and stops (--stop-at) where
# the original piece stopped. Started again, the script skips the pieces already done. One thread, seed 0.
# Stage 2 took about 3.9 hours of one core (shallow ~1 s a step, deep ~5-8 s with another run beside it).
set -euo pipefail
SYNTH=${1:?usage: scripts/make_testbed.sh SYNTH OUT [--shipped-tower]}
OUT=${2:?usage: scripts/make_testbed.sh SYNTH OUT [--shipped-tower]}
MP=${MAMBAPRUNE:-mambaprune}
HERE=$(cd "$(dirname "$0")/.." && pwd)

[ -f "$SYNTH/manifest.json" ] || $MP synth --out "$SYNTH" --per-family 2000

# run 30's flags (docs/testbed.md, "How it was trained") without its schedule
BASE="--data $SYNTH --batch-size 24 --balance-chars --freeze-tower --standardize --visual-rms-weight 0.1
      --d-model 64 --expand 2 --d-state 16 --memory-weight 1 --turn-memory-weight 1 --no-difference-conv
      --embedding-std 1 --grow-from 2 --grow-spread --grow-lr-scale 0.25 --threads 1 --seed 0"

if [ "${3:-}" = "--shipped-tower" ]; then
    TOWER="$HERE/src/mambaprune/assets/testbed"
else     # stage 1 alone: run 30's 3000 tower steps, then one stage-2 step to write the checkpoint
    TOWER="$OUT.tower"
    $MP train-testbed $BASE --out "$TOWER" --tower-steps 3000 --steps 8500 --stop-at 1
fi

# recall questions, the ordinal names read-out after layer 0, stage 1's read-out on the projected tokens
RECALL="--tower-from $TOWER --recall-per-image 4 --referent-at names --referent-layer 0 --referent-code ordinal
        --visual-aux-weight 0.5"
run() { $MP train-testbed $BASE --out "$OUT" $RECALL "$@"; }

run --referent-weight 1 --extra-per-family 0 --steps 5000 --grow-at 0.9411765 --stop-at 4250      # run 39
run --referent-weight 3 --extra-per-family 1 --steps 8500 --grow-at 0.9411765 --stop-at 6100      # run 41
run --referent-weight 3 --extra-per-family 1 --steps 8500 --grow-at 0.9411765 --stop-at 7800 --row-flip 0.5  # run 42
run --referent-weight 3 --extra-per-family 1 --steps 12000 --grow-at 0.99 --stop-at 10000 --row-flip 0.5     # run 42
# run 45: the shallow phase on to step 12000, grown there to 16 layers (the two trained layers at depths 0 and
# 8), 500 steps at 16 layers, then the test split (2000 questions per family) and the testbed in OUT
run --referent-weight 3 --extra-per-family 1 --steps 12500 --grow-at 0.96 --row-flip 0.5 --test-per-family 2000
