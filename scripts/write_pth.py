#!/usr/bin/env python3
"""Writes a PyTorch-format checkpoint ({"state_dict": OrderedDict}, zip layout of torch.save)
from a safetensors file, WITHOUT needing torch: used by psic's tests to check the importer's
PyTorch path on machines without PyTorch.

usage: write_pth.py IN.safetensors OUT.pth.tar [--int-buffers]
  --int-buffers  keep CompressAI's integer buffers (_quantized_cdf, _offset, _cdf_length) as
                 IntStorage, as real CompressAI checkpoints do; otherwise they are dropped.
"""
import collections
import json
import pickle
import struct
import sys
import types
import zipfile

INT_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length")


def fake_module(name):
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    return mod


torch = fake_module("torch")
utils = fake_module("torch._utils")


def _rebuild_tensor_v2(*args):  # referenced by name only
    raise RuntimeError("not callable here")


_rebuild_tensor_v2.__module__ = "torch._utils"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2
for storage in ("FloatStorage", "IntStorage"):
    cls = type(storage, (), {"__module__": "torch"})
    setattr(torch, storage, cls)


class Storage:
    def __init__(self, key, cls, numel):
        self.key, self.cls, self.numel = key, cls, numel


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return (_rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def main():
    src, dst = sys.argv[1], sys.argv[2]
    keep_int = "--int-buffers" in sys.argv[3:]
    raw = open(src, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    state = collections.OrderedDict()
    blobs = {}
    for i, name in enumerate(sorted(k for k in header if k != "__metadata__")):
        info = header[name]
        if info["dtype"] != "F32":
            raise SystemExit(f"{name}: only F32 inputs are supported")
        data = body[info["data_offsets"][0]:info["data_offsets"][1]]
        numel = len(data) // 4
        is_int = name.endswith(INT_BUFFERS)
        if is_int and not keep_int:
            continue
        if is_int:
            vals = struct.unpack(f"<{numel}f", data)
            data = struct.pack(f"<{numel}i", *[int(v) for v in vals])
            cls = torch.IntStorage
        else:
            cls = torch.FloatStorage
        key = str(i)
        blobs[key] = data
        state[name] = Tensor(Storage(key, cls, numel), info["shape"])
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        import io
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump({"state_dict": state, "epoch": 0})
        z.writestr("archive/data.pkl", buf.getvalue())
        for key, data in blobs.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


if __name__ == "__main__":
    main()
