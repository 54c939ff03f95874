#!/usr/bin/env bash
# Prepares the git-ignored gpu-carry/ that scripts/gpu-train.sh expects on a lent GPU machine
# (docs/TRAINING.md, "GPU"): the psic binary built with CUDA (no embedded model), stripped and
# xz'd; a copy of the training photos; an f16 copy of EfficientNet-Lite0 (half the bytes).
# Needs ../shared (data, models, the CUDA toolchain recipe in ../shared/gpu) and python3 + numpy.
# Usage: bash scripts/gpu-prepare.sh   (CARGO_TARGET_DIR defaults to /work/cuda-target)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=../shared
target=${CARGO_TARGET_DIR:-/work/cuda-target}
[ -d "$HOME/.cache/psic-cuda" ] || bash "$shared/gpu/setup_cuda.sh"
# shellcheck disable=SC1091
source "$shared/gpu/env.sh"
CARGO_TARGET_DIR=$target cargo build --release --no-default-features --features cuda,cli,train --bin psic
mkdir -p gpu-carry
strip -o /tmp/psic-cuda "$target/release/psic"
xz -T2 -6 -c /tmp/psic-cuda > gpu-carry/psic.xz && rm /tmp/psic-cuda
rm -rf gpu-carry/imagenet-val256 && cp -r "$shared/data/imagenet-val256" gpu-carry/
python3 - "$shared/models/efficientnet-lite0.safetensors" gpu-carry/efficientnet-lite0.safetensors <<'PY'
# F32 -> F16 safetensors, metadata kept (tensor order and names unchanged).
import json, struct, sys
import numpy as np
src, dst = sys.argv[1], sys.argv[2]
raw = open(src, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
data = raw[8 + n:]
out, blobs, offset = {}, [], 0
for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0]):
    a, b = info["data_offsets"]
    t = np.frombuffer(data[a:b], dtype=np.float32) if info["dtype"] == "F32" else None
    blob = t.astype(np.float16).tobytes() if t is not None else data[a:b]
    dtype = "F16" if t is not None else info["dtype"]
    out[name] = {"dtype": dtype, "shape": info["shape"], "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
if "__metadata__" in header:
    out["__metadata__"] = header["__metadata__"]
head = json.dumps(out, separators=(",", ":")).encode()
head += b" " * (-len(head) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
PY
du -sh gpu-carry/*
