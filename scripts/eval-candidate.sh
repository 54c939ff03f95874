#!/usr/bin/env bash
# Evaluates a candidate default model the way the shipped one was chosen and measured
# (docs/MODELS.md): the selection split with every purification (what chooses), the 60 first
# held-out photos of ../shared/data/photos enlarged 2x (a full-size selection set that is not
# Kodak: the classifier downsizes them about 2x), then Kodak at its default level at full size
# and at 1.5x with every purification (what a published photo meets; a test set). Lite1 is a
# probe: reported, never used to choose.
# Usage: bash scripts/eval-candidate.sh MODEL OUT_DIR [STRENGTH]
#   PSIC (default target/release/psic, a build with the eval feature) runs the commands;
#   KODAK=0 skips the two Kodak reports (the rule does not read them; about half the time).
# Writes OUT_DIR/split, OUT_DIR/photos-x2, OUT_DIR/kodak, OUT_DIR/kodak-x1.5 (psic eval reports),
# then prints the selection rule's verdict on the split (scripts/select_model.py).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: eval-candidate.sh MODEL OUT_DIR [STRENGTH]}
out=${2:?usage: eval-candidate.sh MODEL OUT_DIR [STRENGTH]}
strength=${3:-}
psic=${PSIC:-target/release/psic}
[ -f "$model" ] || { echo "no model file $model" >&2; exit 1; }
[ -x "$psic" ] || { echo "no psic binary at $psic (cargo build --release)" >&2; exit 1; }
source scripts/eval-lib.sh
common=(-m "$model" "${TARGET_ARGS[@]}")
[ -n "$strength" ] && common+=(--strength "$strength")
mkdir -p "$out"
"$psic" eval "${common[@]}" --data ../shared/data/imagenet-val256 --split eval \
  --out "$out/split" --title "candidate on the selection split"
"$psic" eval "${common[@]}" --data ../shared/data/photos --split eval -n 60 --scale 2 \
  --no-purify --jpeg none --out "$out/photos-x2" --title "candidate on held-out photos enlarged 2x"
if [ "${KODAK:-1}" != 0 ]; then
  "$psic" eval "${common[@]}" --data ../shared/data/kodak --out "$out/kodak" \
    --title "candidate on Kodak"
  "$psic" eval "${common[@]}" --data ../shared/data/kodak --scale 1.5 --out "$out/kodak-x1.5" \
    --title "candidate on Kodak resized by 1.5"
fi
python3 scripts/select_model.py "$out/split" || true
