#!/usr/bin/env bash
# Adds the current model of a stage-0 (backbone) run to its Kodak curve (issue 18: "record its
# curve (Kodak PSNR vs steps)"): evaluates runs/RUN/model.safetensors (the trainer writes it with
# each checkpoint) on the 24 Kodak photos at full size, keeps the report's report.json and
# report.md in runs/RUN/kodak/step-STEP, then redraws runs/RUN/kodak-curve/curve.{md,png} from
# every step kept (`psic curve`).
# Usage: bash scripts/backbone-curve.sh RUN [MODEL STEP]
#   MODEL (default runs/RUN/model.safetensors) may be any model file of the run; STEP (default:
#   the step `psic info` names) places it on the curve, e.g. `runs/RUN/init-*.safetensors 0`
#   for the run's starting point (its file names the steps of the run that made it).
#   PSIC (default target/release/psic, a build with the eval feature) runs the commands.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:?usage: backbone-curve.sh RUN [MODEL STEP]}
model=${2:-runs/$run/model.safetensors}
psic=${PSIC:-target/release/psic}
[ -f "$model" ] || { echo "no model file $model" >&2; exit 1; }
[ -x "$psic" ] || { echo "no psic binary at $psic (cargo build --release --features eval)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A copy: the trainer replaces the model file while it runs (atomically, so a copy is whole).
cp "$model" "$tmp/model.safetensors"
step=${3:-}
[ -n "$step" ] || step=$("$psic" info -m "$tmp/model.safetensors" | sed -n 's/^source: .* training, \([0-9]*\) steps.*/\1/p')
[ -n "$step" ] || { echo "$model names no training step (psic info)" >&2; exit 1; }
"$psic" eval -m "$tmp/model.safetensors" --data ../shared/data/kodak --no-purify --quiet \
  --title "$run after $step steps on Kodak" --out "$tmp/report"
mkdir -p "runs/$run/kodak/step-$step"
cp "$tmp/report/report.json" "$tmp/report/report.md" "runs/$run/kodak/step-$step/"
reports=$(for d in runs/"$run"/kodak/step-*; do echo "${d##*/step-}=$d"; done | sort -n | paste -sd, -)
"$psic" curve --reports "$reports" --title "$run on Kodak" --out "runs/$run/kodak-curve"
