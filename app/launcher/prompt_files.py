"""One stored prompt cache as a file: safetensors, written by us, checked on every read.

A file holds the keys and values of every layer for a run of prompt tokens (`k.<layer>`, `v.<layer>`, shape
`(1, kv_heads, tokens, head_dim)`), and in the safetensors header's `__metadata__` (all strings):

    format         FORMAT: anything else is not ours
    identity       the model identity the KV belongs to (app/launcher/disk_tier.py); must match the directory
    parent         name of the entry holding the tokens before these ("" for a root)
    parent_length  how many of the parent's tokens come first (the parent may hold more)
    tokens         JSON list: this file's own tokens, after the parent's first `parent_length`
    layers         number of layers (target and draft layers are one list, as mlx_lm keeps them)
    crc32          of the data section: a flipped bit must never become a silently wrong answer

The format is safetensors because `mx.load` reads it natively (and lazily); the writer is our own so that
it needs only NumPy arrays and a file: it runs on a background thread that must not touch MLX (see
disk_tier.py). Reading the header alone (a few KB) is enough to index a directory.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "specgate-prompt-cache/1"
SUFFIX = ".safetensors"
# A header of a 100k-token root holds ~700 KB of token ids; anything far above is not ours.
_MAX_HEADER_BYTES = 16 << 20
_CHUNK = 8 << 20
# NumPy dtype name of the data as written (bfloat16 travels as uint16 bits) -> safetensors dtype.
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


class BadCacheFile(Exception):
    """A file that is not a usable entry: truncated, corrupt, foreign, or of another format."""


@dataclass(frozen=True)
class EntryHeader:
    """What the header says about an entry; enough to index it without reading its data."""

    name: str
    identity: str
    parent: str | None
    parent_length: int
    tokens: tuple[int, ...]
    layers: int
    crc32: int
    data_start: int
    size: int

    @property
    def length(self) -> int:
        """Tokens covered from the start of the prompt: the parent's part plus this file's own."""
        return self.parent_length + len(self.tokens)


@dataclass(frozen=True)
class Tensor:
    """One array to write, with the dtype and shape the reader must see (bfloat16 data as uint16 bits)."""

    name: str
    dtype: str  # a key of SAFETENSORS_DTYPES
    shape: tuple[int, ...]
    data: np.ndarray


def write_entry(path: Path, tensors: list[Tensor], metadata: dict[str, str]) -> int:
    """Write `path` (the caller renames it into place); returns its size in bytes.

    The tensors may be strided views of the KV caches (a slice of the token axis): they are read in place,
    block by block, never copied whole."""
    header: dict[str, Any] = {}
    offset = 0
    crc = 0
    for tensor in tensors:
        size = tensor.data.nbytes
        header[tensor.name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
        for block in _blocks(tensor.data):
            crc = zlib.crc32(block, crc)
    header["__metadata__"] = {**metadata, "crc32": str(crc)}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # safetensors readers expect the data to start 8-byte aligned: pad the header with spaces.
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for tensor in tensors:
            for block in _blocks(tensor.data):
                file.write(block)
    return 8 + len(encoded) + offset


def _blocks(array: np.ndarray) -> Iterator[memoryview]:
    """`array`'s bytes in C order, as the largest pieces that are contiguous in memory (no copy for a
    slice of the token axis of a `(1, heads, tokens, dim)` cache; a copy only of pieces that are not)."""
    if array.flags.c_contiguous or array.ndim <= 1:
        yield np.ascontiguousarray(array).data.cast("B")
        return
    for part in array:
        yield from _blocks(part)


def read_header(path: Path) -> EntryHeader:
    """The entry's header, checked for shape and size (not its data: see `check_data`)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
                raise BadCacheFile(f"header length {length} does not fit a file of {size} bytes")
            raw = json.loads(file.read(length))
    except (OSError, ValueError) as error:
        raise BadCacheFile(f"unreadable header: {error}") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("__metadata__"), dict):
        raise BadCacheFile("no metadata")
    metadata = raw.pop("__metadata__")
    if metadata.get("format") != FORMAT:
        raise BadCacheFile(f"format {metadata.get('format')!r} is not {FORMAT}")
    data_bytes = _check_layout(raw, _int(metadata, "layers"))
    if 8 + length + data_bytes != size:
        raise BadCacheFile(f"{size} bytes on disk, the header describes {8 + length + data_bytes} (truncated?)")
    tokens = json.loads(metadata.get("tokens", "null"))
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) and t >= 0 for t in tokens):
        raise BadCacheFile("no token list")
    parent = metadata.get("parent") or None
    return EntryHeader(
        name=path.name.removesuffix(SUFFIX),
        identity=str(metadata.get("identity")),
        parent=parent,
        parent_length=_int(metadata, "parent_length") if parent else 0,
        tokens=tuple(tokens),
        layers=_int(metadata, "layers"),
        crc32=_int(metadata, "crc32"),
        data_start=8 + length,
        size=size,
    )


def _int(metadata: dict[str, Any], key: str) -> int:
    try:
        value = int(metadata[key])
    except (KeyError, TypeError, ValueError):
        raise BadCacheFile(f"metadata {key!r} missing or not a number") from None
    if value < 0:
        raise BadCacheFile(f"metadata {key!r} is negative")
    return value


def _check_layout(tensors: dict[str, Any], layers: int) -> int:
    """Every layer's k and v present, packed back to back; returns the data section's size."""
    expected = {f"{kind}.{layer}" for layer in range(layers) for kind in "kv"}
    if layers == 0 or set(tensors) != expected:
        raise BadCacheFile(f"tensors {sorted(tensors)[:4]}... do not match {layers} layers")
    spans = []
    for info in tensors.values():
        try:
            start, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BadCacheFile("tensor without data offsets") from None
        spans.append((start, end))
    spans.sort()
    position = 0
    for start, end in spans:
        if start != position or end < start:
            raise BadCacheFile("tensor data overlaps or leaves gaps")
        position = end
    return position


def check_data(path: Path, header: EntryHeader) -> None:
    """Recompute the data section's CRC-32; raises BadCacheFile on a mismatch."""
    crc = 0
    try:
        with path.open("rb") as file:
            file.seek(header.data_start)
            for chunk in iter(lambda: file.read(_CHUNK), b""):
                crc = zlib.crc32(chunk, crc)
    except OSError as error:
        raise BadCacheFile(f"unreadable data: {error}") from error
    if crc != header.crc32:
        raise BadCacheFile(f"data checksum {crc} is not the header's {header.crc32} (corrupt)")
