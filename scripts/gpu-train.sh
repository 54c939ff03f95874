#!/usr/bin/env bash
# Trains the default model's stages on a lent GPU machine (see docs/TRAINING.md, "GPU").
#
# Expects, in the repository root on the GPU machine (scripts/gpu-prepare.sh makes them):
#   gpu-carry/psic.xz                   the example binary built with --features cuda (xz'd):
#     source ../shared/gpu/env.sh && CARGO_TARGET_DIR=/work/cuda-target cargo build --release \
#       --no-default-features --features cuda --example psic
#     (no embedded default model: 7 MB instead of 14 MB xz'd), then strip and `xz -6`
#   gpu-carry/imagenet-val256/          the photos and labels.json
#   gpu-carry/efficientnet-lite0.safetensors
#   ../shared/gpu/run_on_gpu.sh is not there: the same LD_LIBRARY_PATH logic is inlined below.
# Usage: bash scripts/gpu-train.sh OUT_DIR MINUTES_STAGE0 MINUTES_STAGE1 MINUTES_STAGE2 (0 skips a stage)
# Stage s uses configs/${PSIC_RUN}-stage$s.toml and runs/${PSIC_RUN}-stage$s (PSIC_RUN defaults to
# "default", the first model; "v2" is the second, "v3" the next). A run folder with a checkpoint
# is resumed. What travels must stay under 64 MiB: move the big checkpoints of other runs out
# of the working tree for the call (the tracked runs/ alone exceed it).
# Each stage's checkpoint, log and validation grid are packed into OUT_DIR as soon as the stage
# ends (split in 15 MB parts), so a run cut short still returns what it finished.
set -uo pipefail
out=$1; m0=$2; m1=$3; m2=$4
mkdir -p "$out"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

# PSIC_BIN / PSIC_DEVICE let the script be dry-run on a CPU build.
bin=${PSIC_BIN:-/tmp/psic}; device=${PSIC_DEVICE:-cuda}
[ -n "${PSIC_BIN:-}" ] || { xz -dc gpu-carry/psic.xz > /tmp/psic && chmod +x /tmp/psic; }
NVLIB=$(python3 -c 'import nvidia, os, glob; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "*", "lib", "lib*.so*"))})))' 2>/dev/null)
export LD_LIBRARY_PATH="$NVLIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ldd "$bin" | grep -E 'not found' && stamp "missing libraries"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

# The configs name ../shared paths: point them at the carried copies.
mkdir -p /tmp/cfg
run=${PSIC_RUN:-default}
for s in 0 1 2; do
  name=$run
  [ -f "configs/$name-stage$s.toml" ] || continue
  sed -e 's#\.\./shared/data/imagenet-val256#gpu-carry/imagenet-val256#' \
      -e 's#\.\./shared/models/efficientnet-lite0.safetensors#gpu-carry/efficientnet-lite0.safetensors#' \
      "configs/$name-stage$s.toml" > "/tmp/cfg/stage$s.toml"
done

pack() { # stage name -> OUT_DIR/NAME.tar.part-*
  local name=$1; shift
  tar -cf "/tmp/$name.tar" "$@" && split -b 15M -d "/tmp/$name.tar" "$out/$name.tar.part-" && rm "/tmp/$name.tar"
}

run_stage() { # stage minutes
  local s=$1 minutes=$2 dir="runs/${run}-stage$1"
  if [ "$minutes" = 0 ]; then stamp "stage $s skipped"; return 0; fi
  stamp "stage $s: $minutes min"
  if [ -f "$dir/checkpoint.safetensors" ]; then
    args=(--resume "$dir/checkpoint.safetensors")
  else
    args=(--config "/tmp/cfg/stage$s.toml")
  fi
  # Keep one progress line in 50.
  "$bin" train "${args[@]}" --out "$dir" --device "$device" --max-minutes "$minutes" 2>&1 \
    | tr '\r' '\n' | awk '/^train \[/ { if (++n % 50) next } { print; fflush() }'
  local rc=${PIPESTATUS[0]}
  stamp "stage $s exited with $rc"
  tail -n 3 "$dir/log.jsonl" || true
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
