# Shared by scripts/gpu-train.sh (stages one after another) and scripts/gpu-sweep.sh (runs side by
# side): sourced, not run. Expects gpu-carry/ from scripts/gpu-prepare.sh in the repository root.
# Sets: bin, device, start; defines stamp, config_for, pack, train_run.

start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

# PSIC_BIN / PSIC_DEVICE let the scripts be dry-run on a CPU build.
bin=${PSIC_BIN:-/tmp/psic}; device=${PSIC_DEVICE:-cuda}
[ -n "${PSIC_BIN:-}" ] || { xz -dc gpu-carry/psic.xz > /tmp/psic && chmod +x /tmp/psic; }
NVLIB=$(python3 -c 'import nvidia, os, glob; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "*", "lib", "lib*.so*"))})))' 2>/dev/null)
export LD_LIBRARY_PATH="$NVLIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ldd "$bin" | grep -E 'not found' && stamp "missing libraries"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

# config_for NAME -> path of configs/NAME.toml with the ../shared paths pointed at gpu-carry/.
config_for() {
  mkdir -p /tmp/cfg
  sed -e 's#\.\./shared/data/imagenet-val256#gpu-carry/imagenet-val256#' \
      -e 's#\.\./shared/models/efficientnet-lite0.safetensors#gpu-carry/efficientnet-lite0.safetensors#' \
      "configs/$1.toml" > "/tmp/cfg/$1.toml"
  echo "/tmp/cfg/$1.toml"
}

# pack NAME FILE... -> OUT_DIR/NAME.tar.part-* (15 MB parts: the device returns files up to 16 MiB).
pack() {
  local name=$1; shift
  tar -cf "/tmp/$name.tar" "$@" && split -b 15M -d "/tmp/$name.tar" "$out/$name.tar.part-" && rm "/tmp/$name.tar"
}

# export_init NAME: when configs/NAME.toml starts from an `init` model file that is missing but
# whose folder holds a checkpoint, exports the model from that checkpoint.
export_init() {
  local cfg init
  cfg=$(config_for "$1")
  init=$(sed -n 's/^init *= *"\(.*\)"/\1/p' "$cfg")
  if [ -n "$init" ] && [ ! -f "$init" ] && [ -f "$(dirname "$init")/checkpoint.safetensors" ]; then
    "$bin" export -i "$(dirname "$init")/checkpoint.safetensors" -o "$init" && stamp "exported $init"
  fi
}

# train_run NAME MINUTES: trains configs/NAME.toml into runs/NAME (resumed when a checkpoint is
# there) for MINUTES, keeping one progress line in 4 (they come every 15 s off a terminal;
# export_init first).
train_run() {
  local name=$1 minutes=$2 dir="runs/$1" cfg args
  export_init "$name"
  cfg=$(config_for "$name")
  if [ -f "$dir/checkpoint.safetensors" ]; then
    args=(--resume "$dir/checkpoint.safetensors")
  else
    args=(--config "$cfg")
  fi
  stamp "$name: $minutes min"
  "$bin" train "${args[@]}" --out "$dir" --device "$device" --max-minutes "$minutes" 2>&1 \
    | tr '\r' '\n' | awk '/^train: / { if (++n % 4) next } { print; fflush() }'
  local rc=${PIPESTATUS[0]}
  stamp "$name exited with $rc"
  tail -n 2 "$dir/log.jsonl" || true
  return "$rc"
}
