"""Reading an HF directory: ``config.json``, one or many ``*.safetensors`` (with or
without ``model.safetensors.index.json``), ``tokenizer.json``.

Safetensors files are parsed here (8-byte header length, JSON header, raw data) and
memory-mapped, so each tensor is read alone, bfloat16 and float8 included, and a short
file or a bad header names the tensor at fault.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from checkpoints.errors import CheckpointError
from fineserve_jax.config import ModelConfig
from fineserve_jax.tokenizer import Tokenizer, tokenizer_from_hf_dir

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """One ``.safetensors`` file: ``names`` and ``read(name)`` (a memory-mapped view)."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path.name}: header length {n} exceeds file size {size}")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise CheckpointError(f"{path.name}: corrupt safetensors header ({e})") from e
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.header = header
        avail = size - self.data_start
        for name, info in header.items():
            if info.get("dtype") not in _DTYPES:
                raise CheckpointError(f"tensor {name!r} in {path.name}: unsupported dtype "
                                      f"{info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            expect = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
            if end - begin != expect:
                raise CheckpointError(f"tensor {name!r} in {path.name}: {end - begin} bytes for "
                                      f"shape {info['shape']} {info['dtype']} (expected {expect})")
            if end > avail:
                raise CheckpointError(f"{path.name} is truncated: tensor {name!r} needs bytes up to "
                                      f"{end}, the file holds {avail}")

    @property
    def names(self) -> list[str]:
        return list(self.header)

    def read(self, name: str) -> np.ndarray:
        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start + begin,
                       shape=(end - begin,))
        return mm.view(dtype).reshape(info["shape"])


class HFSource:
    """An HF directory: config, tokenizer, and an iterator of (name, array)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"{self.path} has no config.json")
        self.hf_config = json.loads(cfg_path.read_text())
        self.config = ModelConfig.from_hf(self.hf_config)
        self.files = self._weight_files()

    def _weight_files(self) -> list[SafetensorsFile]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.path / n).exists()]
            if missing:
                raise CheckpointError(f"index names shard(s) not in {self.path}: {missing}")
            files = [SafetensorsFile(self.path / n) for n in names]
            listed = {n for f in files for n in f.names}
            absent = sorted(set(weight_map) - listed)
            if absent:
                raise CheckpointError(f"tensors listed in the index but not in their shard: "
                                      f"{absent[:5]}")
            return files
        paths = sorted(self.path.glob("*.safetensors"))
        if not paths:
            raise CheckpointError(f"{self.path} has no *.safetensors files "
                                  f"(PyTorch .bin checkpoints are not read)")
        return [SafetensorsFile(p) for p in paths]

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_hf_dir(self.path, self.hf_config)

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for f in self.files:
            for name in f.names:
                yield name, f.read(name)

    def hashed_files(self) -> list[Path]:
        return [self.path / "config.json"] + [f.path for f in self.files]
