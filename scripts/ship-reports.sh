#!/usr/bin/env bash
# Makes the default model's reports for a newly chosen model and writes its model file, the
# steps of docs/MODELS.md "Reproduce" in order, so that shipping a chosen candidate is one
# command. The outgoing default's `*-default*` reports are renamed `*-OLD_TAG*` (git mv) first.
# Usage: bash scripts/ship-reports.sh MODEL CANDIDATE_DIR OLD_TAG
#   MODEL          the chosen model as the trainer wrote it (before `psic export`)
#   CANDIDATE_DIR  its scripts/eval-candidate.sh folder (split, photos-x2, kodak, kodak-x1.5),
#                  made from MODEL: those four reports are moved in, not made again
#   OLD_TAG        the outgoing default's name in report folders, e.g. v18-step900
#   PSIC (default target/release/psic, a build with the eval feature) runs the commands.
# Leaves the docs (MODELS.md, README, TRAINING.md, HISTORY.md, docs/reports/README.md) and the
# trade-off charts (their run lists are chosen by hand; commands in MODELS.md) to the person
# shipping; prints what it did.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: ship-reports.sh MODEL CANDIDATE_DIR OLD_TAG}
cand=${2:?usage: ship-reports.sh MODEL CANDIDATE_DIR OLD_TAG}
old=${3:?usage: ship-reports.sh MODEL CANDIDATE_DIR OLD_TAG}
psic=${PSIC:-target/release/psic}
r=docs/reports
[ -f "$model" ] || { echo "no model file $model" >&2; exit 1; }
[ -x "$psic" ] || { echo "no psic binary at $psic (cargo build --release --features eval)" >&2; exit 1; }
for s in split photos-x2 kodak kodak-x1.5; do
  [ -f "$cand/$s/report.json" ] || { echo "no $cand/$s/report.json (run eval-candidate.sh with Kodak)" >&2; exit 1; }
done
fp=$("$psic" info -m "$model" | sed -n 's/.*fingerprint \([0-9a-f]*\).*/\1/p')
[ -n "$fp" ] && grep -q "$fp" "$cand/split/report.md" || { echo "$cand was not made from $model ($fp)" >&2; exit 1; }
defaults=$(cd $r && ls -d *-default *-default-* 2>/dev/null)
for d in $defaults; do
  to=${d/-default/-$old}
  [ ! -e "$r/$to" ] || { echo "$r/$to exists already" >&2; exit 1; }
done
for d in $defaults; do git mv "$r/$d" "$r/${d/-default/-$old}"; done
mkdir -p $r/imagenet-eval-default $r/photos-eval-default-x2 $r/kodak-default $r/kodak-default-x1.5
cp "$cand"/split/* $r/imagenet-eval-default/
cp "$cand"/photos-x2/* $r/photos-eval-default-x2/
cp "$cand"/kodak/* $r/kodak-default/
cp "$cand"/kodak-x1.5/* $r/kodak-default-x1.5/
source scripts/eval-lib.sh
T=("${TARGET_ARGS[@]}")
for q in 0 1 3; do
  "$psic" eval -m "$model" --level $q --data ../shared/data/kodak "${T[@]}" --no-purify --out $r/kodak-default-q$q
  "$psic" eval -m "$model" --level $q --data ../shared/data/imagenet-val256 --split eval "${T[@]}" --no-purify --out $r/imagenet-eval-default-q$q
done
"$psic" eval -m "$model" --data ../shared/data/kodak --scale 0.5 "${T[@]}" --out $r/kodak-default-x0.5
"$psic" eval -m "$model" --data ../shared/data/photos --split eval -n 60 "${T[@]}" --no-purify --jpeg none --out $r/photos-eval-default
# The photos reports keep report.md and report.json only (docs/reports/README.md).
rm -f $r/photos-eval-default/*.png $r/photos-eval-default-x2/*.png
"$psic" export --from-model -i "$model" -o models/psic-default.safetensors --strength 1 --default-level 2 \
  --level-reports 0=$r/kodak-default-q0,1=$r/kodak-default-q1,2=$r/kodak-default,3=$r/kodak-default-q3
"$psic" rd --reports "level 0=$r/kodak-default-q0,level 1=$r/kodak-default-q1,level 2=$r/kodak-default,level 3=$r/kodak-default-q3" --out $r/rd-default
"$psic" info -m models/psic-default.safetensors
echo "renamed: $(echo $defaults | wc -w) folders to *-$old*; made the level, x0.5 and photos reports, models/psic-default.safetensors and rd-default."
echo "left: the trade-off charts (docs/MODELS.md), the docs, a rebuild (the model is embedded) and the tests."
