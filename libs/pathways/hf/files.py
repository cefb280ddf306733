"""Hugging Face folder I/O: config.json and safetensors (single file or sharded with an index).

The safetensors header is parsed here rather than by the `safetensors` package so that every
malformed file gives one `HfFormatError` naming the file and the field, and so bfloat16 tensors load
as numpy arrays without torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class HfFormatError(ValueError):
    """A missing, malformed or unsupported file of a Hugging Face folder; names file and field."""


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise HfFormatError(f"{path}: file not found (a Hugging Face folder needs {CONFIG})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HfFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HfFormatError(f"{path}: top level must be a JSON object")
    return data


class ConfigReader:
    """Typed access to config.json fields; errors name the file and the field."""

    def __init__(self, data: dict[str, Any], path: Path):
        self.data, self.path = data, path

    def get(self, name: str, kind: type, default: Any = ..., *, positive: bool = False) -> Any:
        if name not in self.data or (self.data[name] is None and default is not ...):
            if default is ...:
                raise HfFormatError(f"{self.path}: field {name!r} is missing")
            return default
        value = self.data[name]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise HfFormatError(
                f"{self.path}: field {name!r} must be {kind.__name__}, got {value!r}"
            )
        if positive and not value > 0:
            raise HfFormatError(f"{self.path}: field {name!r} must be > 0, got {value!r}")
        return value


class Tensors:
    """The tensors of a folder, read lazily by name; remembers which ones were taken."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self._where: dict[str, tuple[Path, dict]] = {}
        self._data: dict[Path, memoryview] = {}
        self.taken: set[str] = set()
        index = folder / INDEX
        if (folder / WEIGHTS).is_file():
            self._add(folder / WEIGHTS)
        elif index.is_file():
            for shard in _shards(index):
                self._add(folder / shard, index)
        else:
            raise HfFormatError(
                f"{folder}: no {WEIGHTS} and no {INDEX} (only safetensors "
                f"weights are read; convert .bin files first)"
            )

    def _add(self, path: Path, index: Path | None = None) -> None:
        if not path.is_file():
            raise HfFormatError(
                f"{index}: field 'weight_map' names shard {path.name}, which does not exist"
            )
        raw = path.read_bytes()
        header, start = _header(path, raw)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            self._where[name] = (path, info)
        self._data[path] = memoryview(raw)[start:]

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1].get("shape", ()))

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor `name` as float32, checked against `shape`."""
        if name not in self._where:
            files = sorted({p.name for p, _ in self._where.values()})
            raise HfFormatError(f"{', '.join(files)}: tensor {name!r} is missing")
        path, info = self._where[name]
        arr = _decode(path, name, info, self._data[path])
        if arr.shape != tuple(shape):
            raise HfFormatError(
                f"{path}: tensor {name!r} has shape {list(arr.shape)}, "
                f"expected {list(shape)} from {CONFIG}"
            )
        self.taken.add(name)
        return arr.astype(np.float32)

    def check_all_taken(self, ignore: tuple[str, ...] = ()) -> None:
        """Fails on tensors nothing consumed, so no weight is dropped silently."""
        left = sorted(n for n in self.names() - self.taken if not n.endswith(ignore))
        if left:
            path = self._where[left[0]][0]
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise HfFormatError(
                f"{path}: unexpected tensor {left[0]!r}{more} for this architecture"
            )


def _shards(index: Path) -> list[str]:
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HfFormatError(f"{index}: not valid JSON ({e})") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise HfFormatError(f"{index}: field 'weight_map' must map tensor names to shard files")
    return sorted(set(wm.values()))


def _header(path: Path, raw: bytes) -> tuple[dict, int]:
    if len(raw) < 8:
        raise HfFormatError(f"{path}: too short for a safetensors file (no header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise HfFormatError(f"{path}: header length {n} exceeds the file size {len(raw)}")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HfFormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise HfFormatError(f"{path}: safetensors header must be a JSON object")
    return header, 8 + n


def _decode(path: Path, name: str, info: Any, data: memoryview) -> np.ndarray:
    try:
        dtype = _DTYPES[info["dtype"]]
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise HfFormatError(
            f"{path}: tensor {name!r} has a malformed header entry {info!r} "
            f"(needs dtype, shape, data_offsets)"
        ) from None
    if end - begin != dtype.itemsize * int(np.prod(shape)) or end > len(data) or begin < 0:
        raise HfFormatError(
            f"{path}: tensor {name!r}: data_offsets {[begin, end]} do not fit "
            f"shape {list(shape)} of {info['dtype']} in the file"
        )
    return np.frombuffer(data[begin:end], dtype).reshape(shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes one safetensors file (names sorted, float32 as given, metadata format=pt)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, blobs = 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        blob = arr.tobytes()
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # 8-byte alignment of the data, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


def write_config(path: Path, config: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
