"""Write safetensors shards one tensor at a time, so an import never holds a whole model in memory.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the raw bytes. All shapes are known before the first tensor is
converted (the GGUF header lists them), so the header is written first and each tensor is
streamed to disk as soon as it is dequantized. The result is what `mlx_lm.utils.save_model`
writes: `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus an index.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from app.models.store import DTYPES

_SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# mlx_lm shards at 5 GB; smaller shards keep any single file (and a failed write) cheap.
DEFAULT_SHARD_BYTES = 2 * 1024**3


class NonFiniteError(ValueError):
    """A tensor holds inf or NaN after conversion (corrupt data, or out of range for the dtype)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]


def convert(array: np.ndarray[Any, Any], dtype: str) -> np.ndarray[Any, Any]:
    """`array` (float32) as the little-endian storage of `dtype`; raise if any value is not finite."""
    if dtype == "float32":
        out = np.ascontiguousarray(array, dtype="<f4")
    elif dtype == "float16":
        out = np.ascontiguousarray(array, dtype="<f2")
    elif dtype == "bfloat16":
        out = _to_bfloat16_bits(array)
    else:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    # One check after the cast catches both corrupt source values and float16 overflow.
    check = (out.astype(np.uint32) << np.uint32(16)).view(np.float32) if dtype == "bfloat16" else out
    if not np.isfinite(check).all():
        raise NonFiniteError(f"non-finite values after conversion to {dtype}")
    return out


def _to_bfloat16_bits(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    bits = np.ascontiguousarray(array, dtype="<f4").view(np.uint32)
    # Round to nearest, ties to even, as torch and mlx do; non-finite inputs are rejected later.
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype("<u2")


def plan_shards(tensors: Sequence[TensorSpec], dtype: str, shard_bytes: int) -> list[list[TensorSpec]]:
    """Split `tensors` (in order) into shards of at most `shard_bytes` (one big tensor may exceed it)."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in tensors:
        size = math.prod(spec.shape) * _ITEMSIZE[dtype]
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


class ShardedWriter:
    """Stream tensors, in the planned order, into safetensors shards in `directory`."""

    def __init__(
        self,
        directory: Path,
        tensors: Sequence[TensorSpec],
        dtype: str,
        shard_bytes: int | None = None,
    ) -> None:
        if dtype not in _SAFETENSORS_DTYPE:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self._directory = directory
        self._dtype = dtype
        self._shards = plan_shards(tensors, dtype, shard_bytes or DEFAULT_SHARD_BYTES)
        self._queue = [(index, spec) for index, shard in enumerate(self._shards) for spec in shard]
        self._position = 0
        self._open: IO[bytes] | None = None
        self._open_index = -1

    def file_name(self, index: int) -> str:
        count = len(self._shards)
        return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"

    def write(self, name: str, shape: tuple[int, ...], chunks: Iterable[np.ndarray[Any, Any]]) -> int:
        """Write the next tensor of the plan from row chunks (in order); returns the bytes written.

        Taking chunks lets a caller dequantize a large tensor piece by piece, so memory stays at
        one chunk rather than one whole float32 tensor.
        """
        index, spec = self._queue[self._position]
        if name != spec.name or shape != spec.shape:
            raise ValueError(f"expected {spec.name} {spec.shape}, got {name} {shape}")
        handle = self._handle_for(index)
        written = 0
        for chunk in chunks:
            data = convert(chunk, self._dtype)
            handle.write(data.tobytes())
            written += int(data.nbytes)
        expected = math.prod(spec.shape) * _ITEMSIZE[self._dtype]
        if written != expected:
            raise ValueError(f"{name}: wrote {written} bytes, expected {expected}")
        self._position += 1
        return written

    def close(self) -> None:
        """Finish the last shard and write the index; raises if tensors are missing."""
        if self._position != len(self._queue):
            raise ValueError(f"{len(self._queue) - self._position} tensors were never written")
        self._close_open()
        if len(self._shards) > 1:
            self._write_index()

    def abort(self) -> None:
        self._close_open()

    def _handle_for(self, index: int) -> IO[bytes]:
        if index != self._open_index:
            self._close_open()
            # Spans many write() calls; close() and abort() end it.
            self._open = open(self._directory / self.file_name(index), "wb")  # noqa: SIM115
            self._open.write(self._header(self._shards[index]))
            self._open_index = index
        assert self._open is not None
        return self._open

    def _close_open(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None

    def _header(self, shard: list[TensorSpec]) -> bytes:
        header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
        offset = 0
        for spec in shard:
            size = math.prod(spec.shape) * _ITEMSIZE[self._dtype]
            header[spec.name] = {
                "dtype": _SAFETENSORS_DTYPE[self._dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        # The format allows trailing spaces; padding to 8 bytes keeps the data aligned for mmap.
        encoded += b" " * (-len(encoded) % 8)
        return len(encoded).to_bytes(8, "little") + encoded

    def _write_index(self) -> None:
        weight_map = {spec.name: self.file_name(index) for index, shard in enumerate(self._shards) for spec in shard}
        total = sum(math.prod(spec.shape) * _ITEMSIZE[self._dtype] for _, spec in self._queue)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self._directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
