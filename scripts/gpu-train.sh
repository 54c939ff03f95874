#!/usr/bin/env bash
# Trains the default model's stages one after another on a lent GPU machine (docs/TRAINING.md,
# "GPU").
#
# Expects, in the repository root on the GPU machine (scripts/gpu-prepare.sh makes them):
#   gpu-carry/psic.xz                   the psic binary built with --features cuda (xz'd):
#     source ../shared/gpu/env.sh && CARGO_TARGET_DIR=/work/cuda-target cargo build --release \
#       --no-default-features --features cuda,cli,train --bin psic
#     (no embedded default model: 7 MB instead of 14 MB xz'd), then strip and `xz -6`
#   gpu-carry/imagenet-val256/          the photos and labels.json
#   gpu-carry/efficientnet-lite0.safetensors
#   ../shared/gpu/run_on_gpu.sh is not there: the same LD_LIBRARY_PATH logic is in gpu-lib.sh.
# Usage: bash scripts/gpu-train.sh OUT_DIR MINUTES_STAGE0 MINUTES_STAGE1 MINUTES_STAGE2 (0 skips a stage)
# Stage s uses configs/${PSIC_RUN}-stage$s.toml and runs/${PSIC_RUN}-stage$s (PSIC_RUN defaults to
# "default", the first model). A run folder with a checkpoint is resumed. What travels must stay
# under 64 MiB: move the big checkpoints of other runs out of the working tree for the call (the
# tracked runs/ alone exceed it).
# Each stage's checkpoint, log and validation grid are packed into OUT_DIR as soon as the stage
# ends (split in 15 MB parts), so a run cut short still returns what it finished.
set -uo pipefail
out=$1; m0=$2; m1=$3; m2=$4
mkdir -p "$out"
# shellcheck source=scripts/gpu-lib.sh
source "$(dirname "$0")/gpu-lib.sh"
run=${PSIC_RUN:-default}

run_stage() { # stage minutes
  local s=$1 minutes=$2 dir="runs/${run}-stage$1"
  if [ "$minutes" = 0 ]; then stamp "stage $s skipped"; return 0; fi
  train_run "${run}-stage$s" "$minutes"
  local rc=$?
  # The exported model of stages 0 and 1 is left behind (the checkpoint holds the same weights;
  # the size of what comes back is limited; `psic export` rebuilds it).
  local files=("$dir"/checkpoint.safetensors "$dir"/log.jsonl)
  [ -f "$dir/val-grid.png" ] && files+=("$dir"/val-grid.png)
  [ "$s" = 2 ] && files+=("$dir"/model.safetensors)
  pack "stage$s" "${files[@]}"
  return "$rc"
}

run_stage 0 "$m0" && run_stage 1 "$m1" && run_stage 2 "$m2"
stamp "done"
ls -la "$out"
