#!/usr/bin/env bash
# Trains several runs side by side on one lent GPU (docs/TRAINING.md, "GPU"): one small model's
# training step leaves most of an H100/H200 idle (kernel launches dominate), so a few processes
# share it at little cost each. Needs gpu-carry/ as scripts/gpu-train.sh does.
# Usage: bash scripts/gpu-sweep.sh OUT_DIR MINUTES JOB...
#   JOB is NAME (configs/NAME.toml -> runs/NAME; the checkpoint comes back, for resuming) or
#   NAME:model (only the exported model comes back: a stage-1 checkpoint is 20 MB and the device
#   returns 64 MiB in all). Every run's log and validation grid come back too.
# A run whose `init` model is missing but whose folder has a checkpoint gets it exported before
# any run starts, so a run may start from a backbone another job goes on training.
set -uo pipefail
out=$1; minutes=$2; shift 2
mkdir -p "$out"
# shellcheck source=scripts/gpu-lib.sh
source "$(dirname "$0")/gpu-lib.sh"

for job in "$@"; do export_init "${job%%:*}"; done # before any checkpoint moves on

pids=()
for job in "$@"; do
  name=${job%%:*}
  mkdir -p "runs/$name"
  train_run "$name" "$minutes" > "runs/$name/console.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
stamp "all runs ended (rc $rc)"

for job in "$@"; do
  name=${job%%:*}; dir=runs/$name
  tail -n 4 "$dir/console.log"
  files=("$dir"/log.jsonl "$dir"/console.log)
  if [ "$job" = "$name:model" ]; then files+=("$dir"/model.safetensors); else files+=("$dir"/checkpoint.safetensors); fi
  files+=("$dir"/val-grid.png)
  # A run that failed early has no checkpoint or grid: its log and console still come back.
  present=(); for f in "${files[@]}"; do [ -f "$f" ] && present+=("$f"); done
  pack "$name" "${present[@]}"
done
stamp "done"
ls -la "$out"
exit "$rc"
