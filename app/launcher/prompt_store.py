"""The prompt caches of one model identity on disk: a directory of entries, indexed, bounded in bytes.

Entries form chains. A root holds the KV of a prompt's first tokens; a child holds only the tokens after
its parent's first `parent_length` (prompt_files.py has the header). So the next turn of a conversation
writes its new tokens only, not the whole conversation again, and a new session that shares the system
prompt and tools of an earlier one stores its own question under that earlier entry. Loading a prefix
reads the chain root first and concatenates; a prefix that ends inside a parent reads only the ancestors.

Names are content addresses: `sha256(identity, all tokens)`. Two backends of one model that save the
same prompt write the same name, and `os.replace` makes either file the entry; the index checks every
name against its tokens, so a file with a damaged or foreign header is caught without reading its data.

Several backend processes may share a directory: files never change once renamed into place, every
process re-lists the directory before it looks something up, a file deleted under a reader is a miss,
and an entry whose parent is gone is deleted by whoever notices. Recency is the file's mtime (touched
when an entry is written or read, together with its ancestors, so parents are never older than their
children); eviction deletes the oldest first, children before parents at equal times, and with an entry
every entry that depends on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from app.launcher.prompt_files import (
    FORMAT,
    SUFFIX,
    BadCacheFile,
    EntryHeader,
    Tensor,
    check_data,
    read_header,
    write_entry,
)

logger = logging.getLogger("specgate.launcher")

TEMP_PREFIX = ".partial-"
# A temporary file this old is a write that died with its process (a live write takes seconds).
_STALE_TEMP_SECONDS = 3600.0
_PARENT_GONE = "its parent is gone"


def entry_name(identity: str, tokens: Sequence[int] | np.ndarray) -> str:
    digest = hashlib.sha256(identity.encode())
    digest.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return digest.hexdigest()[:40]


@dataclass(frozen=True)
class SavePlan:
    """What `commit` will write: the tokens after `parent_length` of `parent`, named by all tokens."""

    name: str
    parent: str | None
    parent_length: int
    tokens: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.parent_length + len(self.tokens)


@dataclass
class StoreCounters:
    """What the store did since the backend started (`/specgate/stats`)."""

    saved: int = 0
    saved_bytes: int = 0
    restored: int = 0
    restored_tokens: int = 0
    discarded: int = 0
    evicted: int = 0
    # What a save costs the generation thread (taking views of the new tokens' KV); the writer does the rest.
    last_save_pause_seconds: float | None = None
    last_save_seconds: float | None = None
    last_restore_seconds: float | None = None


class PromptStore:
    """One identity's directory. Thread-safe: the generation thread reads, the writer thread commits."""

    def __init__(self, directory: Path, identity: str, max_bytes: int, min_tokens: int) -> None:
        self.directory = directory
        self.identity = identity
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self.counters = StoreCounters()
        self._lock = threading.Lock()
        # name -> (inode, size, header): a file replaced under the same name is read again.
        self._headers: dict[str, tuple[int, int, EntryHeader]] = {}
        # name -> all tokens the entry covers, for entries whose chain is complete and consistent.
        self._tokens: dict[str, np.ndarray] = {}

    # ----- index ---------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Re-list the directory (lock held): new files are read, vanished ones dropped, bad ones deleted."""
        self.directory.mkdir(parents=True, exist_ok=True)
        seen: dict[str, tuple[int, int, EntryHeader]] = {}
        for path in self.directory.iterdir():
            if path.name.startswith(TEMP_PREFIX):
                self._remove_stale_temp(path)
                continue
            if not path.name.endswith(SUFFIX):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if not S_ISREG(stat.st_mode):
                continue  # not something this store wrote: left alone
            name = path.name.removesuffix(SUFFIX)
            known = self._headers.get(name)
            if known is not None and known[:2] == (stat.st_ino, stat.st_size):
                seen[name] = known
                continue
            header = self._read_header(path)
            if header is not None:
                seen[name] = (stat.st_ino, stat.st_size, header)
        if seen.keys() != self._headers.keys() or any(seen[n] is not self._headers[n] for n in seen):
            self._headers = seen
            self._resolve_chains()

    def _read_header(self, path: Path) -> EntryHeader | None:
        try:
            header = read_header(path)
            if header.identity != self.identity:
                raise BadCacheFile(f"it belongs to identity {header.identity}, this directory is {self.identity}")
        except BadCacheFile as error:
            self._discard(path, str(error))
            return None
        except FileNotFoundError:
            return None
        return header

    def _resolve_chains(self) -> None:
        """Full token lists of every entry whose ancestors are all present and consistent; delete the rest."""
        headers = {name: entry[2] for name, entry in self._headers.items()}
        resolved: dict[str, np.ndarray] = {}
        broken: dict[str, str] = {}
        for start in headers:
            chain: list[str] = []
            name: str | None = start
            # Up to a resolved entry, past the root, or to a missing, broken or looping ancestor (a damaged
            # header could name any parent: the walk is bounded).
            while name in headers and name not in resolved and name not in broken and len(chain) <= len(headers):
                chain.append(name)
                name = headers[name].parent
            prefix: np.ndarray | None = np.zeros(0, dtype=np.int64) if name is None else resolved.get(name)
            for child in reversed(chain):
                header = headers[child]
                if prefix is None:
                    broken[child] = _PARENT_GONE
                elif len(prefix) < header.parent_length:
                    broken[child] = "its parent is shorter than its parent_length"
                else:
                    tokens = np.concatenate([prefix[: header.parent_length], np.asarray(header.tokens, np.int64)])
                    if entry_name(self.identity, tokens) == child:
                        resolved[child] = prefix = tokens
                        continue
                    broken[child] = "its name does not match its tokens (damaged header)"
                prefix = None
        for name, reason in broken.items():
            self._discard(self._path(name), reason, quiet=reason == _PARENT_GONE)
            self._headers.pop(name, None)
        self._tokens = resolved

    def _discard(self, path: Path, reason: str, quiet: bool = False) -> None:
        # A parent deleted by eviction (here or in another backend) leaves its children behind: routine.
        log = logger.info if quiet else logger.warning
        log("prompt cache on disk: deleting %s: %s", path.name, reason)
        self.counters.discarded += 1
        path.unlink(missing_ok=True)

    def _replaced(self, name: str) -> bool:
        """True when the file now under `name` is not the one indexed (lock held)."""
        try:
            inode = self._path(name).stat().st_ino
        except FileNotFoundError:
            return True
        known = self._headers.get(name)
        return known is None or known[0] != inode

    def _remove_stale_temp(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - path.stat().st_mtime > _STALE_TEMP_SECONDS:
                path.unlink(missing_ok=True)

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}{SUFFIX}"

    def _best_match(self, tokens: Sequence[int]) -> tuple[str, int] | None:
        """The entry sharing the longest prefix with `tokens`, and that prefix's length."""
        prompt = np.asarray(tokens, dtype=np.int64)
        best: tuple[str, int] | None = None
        for name, stored in self._tokens.items():
            n = min(len(stored), len(prompt))
            differ = np.flatnonzero(stored[:n] != prompt[:n])
            common = int(differ[0]) if differ.size else n
            if common > 0 and (best is None or common > best[1]):
                best = (name, common)
        return best

    def _header(self, name: str) -> EntryHeader:
        return self._headers[name][2]

    def _owner_of(self, name: str, length: int) -> str:
        """The nearest ancestor-or-self of `name` whose own tokens are needed for a prefix of `length`."""
        header = self._header(name)
        while header.parent is not None and length <= header.parent_length:
            name = header.parent
            header = self._header(name)
        return name

    def _chain(self, name: str, length: int) -> list[tuple[EntryHeader, int]]:
        """(entry, own tokens to take) from the root down, covering the first `length` tokens."""
        segments: list[tuple[EntryHeader, int]] = []
        while True:
            name = self._owner_of(name, length)
            header = self._header(name)
            segments.append((header, length - header.parent_length))
            if header.parent is None:
                return segments[::-1]
            name, length = header.parent, header.parent_length

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "directory": str(self.directory),
                "entries": len(self._headers),
                "bytes": sum(entry[1] for entry in self._headers.values()),
                **vars(self.counters),
            }

    # ----- restore ---------------------------------------------------------------------------------

    def restore(self, tokens: Sequence[int], minimum: int) -> tuple[list[Any], int] | None:
        """KV caches of the longest stored prefix of `tokens` (at most all but the last token, so there is
        something to feed), and its length; None when no entry gives at least `minimum` tokens."""
        started = time.perf_counter()
        with self._lock:
            self._refresh()
            match = self._best_match(tokens)
            if match is None or min(match[1], len(tokens) - 1) < max(minimum, 1):
                return None
            length = min(match[1], len(tokens) - 1)
            chain = self._chain(match[0], length)
        caches = self._load(chain)
        if caches is None:
            return None
        with self._lock:
            for header, _ in chain:
                _touch(self._path(header.name))
            self.counters.restored += 1
            self.counters.restored_tokens += length
            self.counters.last_restore_seconds = round(time.perf_counter() - started, 3)
        logger.info(
            "prompt cache on disk: restored %d of %d prompt tokens from %d file(s) in %.2fs",
            length,
            len(tokens),
            len(chain),
            time.perf_counter() - started,
        )
        return caches, length

    def _load(self, chain: list[tuple[EntryHeader, int]]) -> list[Any] | None:
        keys: list[list[mx.array]] = []
        values: list[list[mx.array]] = []
        for header, take in chain:
            path = self._path(header.name)
            try:
                check_data(path, header)
                arrays = mx.load(str(path))
                assert isinstance(arrays, dict)
                if not keys:
                    keys = [[] for _ in range(header.layers)]
                    values = [[] for _ in range(header.layers)]
                if header.layers != len(keys):
                    raise BadCacheFile(f"{header.layers} layers, its ancestors have {len(keys)}")
                for layer in range(header.layers):
                    k, v = arrays[f"k.{layer}"], arrays[f"v.{layer}"]
                    if k.ndim != 4 or k.shape[0] != 1 or k.shape[2] != len(header.tokens) or v.shape[2] != k.shape[2]:
                        raise BadCacheFile(f"layer {layer} has shape {k.shape}, not {len(header.tokens)} tokens")
                    keys[layer].append(k[..., :take, :])
                    values[layer].append(v[..., :take, :])
            except FileNotFoundError:
                logger.info("prompt cache on disk: %s was deleted while being read", path.name)
                return None
            except (BadCacheFile, OSError, ValueError, RuntimeError) as error:
                # MLX raises ValueError/RuntimeError for data it cannot read: as damaged as a bad checksum.
                with self._lock:
                    if self._replaced(header.name):
                        # Another backend saved the same prompt under the same name meanwhile: not damage.
                        logger.info("prompt cache on disk: %s was replaced while being read", path.name)
                    else:
                        self._discard(path, str(error))
                return None
        caches = []
        try:
            for layer_keys, layer_values in zip(keys, values, strict=True):
                cache = KVCache()  # type: ignore[no-untyped-call]
                cache.keys = mx.concatenate(layer_keys, axis=2) if len(layer_keys) > 1 else layer_keys[0]
                cache.values = mx.concatenate(layer_values, axis=2) if len(layer_values) > 1 else layer_values[0]
                cache.offset = int(cache.keys.shape[2])
                caches.append(cache)
            # Read everything now: a file that fails to load must fail here, not inside generation.
            mx.eval([c.keys for c in caches] + [c.values for c in caches])
        except (ValueError, RuntimeError) as error:
            logger.warning("prompt cache on disk: a stored chain does not fit together (%s); not used", error)
            return None
        return caches

    # ----- save ------------------------------------------------------------------------------------

    def plan_save(self, tokens: Sequence[int]) -> SavePlan | None:
        """What to write for a prompt of `tokens`, or None when the disk already has all but a few."""
        with self._lock:
            self._refresh()
            match = self._best_match(tokens)
        common = match[1] if match is not None else 0
        if len(tokens) - common < self.min_tokens:
            return None
        name = entry_name(self.identity, tokens)
        if match is None or common < self.min_tokens:
            # Too little in common to be worth a dependency: a root of its own.
            return SavePlan(name, None, 0, tuple(tokens))
        with self._lock:
            if match[0] not in self._headers:
                return SavePlan(name, None, 0, tuple(tokens))
            parent = self._owner_of(match[0], common)
        return SavePlan(name, parent, common, tuple(tokens[common:]))

    def commit(self, plan: SavePlan, tensors: list[Tensor]) -> None:
        """Write the entry (temporary file, then rename), touch its ancestors, evict down to the bound."""
        started = time.perf_counter()
        metadata = {
            "format": FORMAT,
            "identity": self.identity,
            "parent": plan.parent or "",
            "parent_length": str(plan.parent_length),
            "tokens": "[" + ",".join(map(str, plan.tokens)) + "]",
            "layers": str(len(tensors) // 2),
        }
        with self._lock:
            self._refresh()
            if plan.parent is not None and plan.parent not in self._tokens:
                # Evicted (here or by another backend) since the plan was made: the child would be an orphan.
                logger.info("prompt cache on disk: not saving %s: its parent %s is gone", plan.name, plan.parent)
                return
        temp = self.directory / f"{TEMP_PREFIX}{plan.name}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            size = write_entry(temp, tensors, metadata)
            os.replace(temp, self._path(plan.name))
        except OSError as error:
            temp.unlink(missing_ok=True)
            logger.warning("prompt cache on disk: could not write %s: %s", plan.name, error)
            return
        with self._lock:
            self._refresh()
            if plan.parent is not None and plan.parent in self._headers:
                for header, _ in self._chain(plan.parent, plan.parent_length):
                    _touch(self._path(header.name))
            self.counters.saved += 1
            self.counters.saved_bytes += size
            self.counters.last_save_seconds = round(time.perf_counter() - started, 3)
            self._evict()
        logger.info(
            "prompt cache on disk: saved %d tokens (%d after %d of %s) in %.2fs, %.1f MB",
            plan.length,
            len(plan.tokens),
            plan.parent_length,
            plan.parent or "no parent",
            time.perf_counter() - started,
            size / 1e6,
        )

    def _evict(self) -> None:
        """Delete least recently used entries (with their descendants) until the directory fits (lock held)."""
        total = sum(entry[1] for entry in self._headers.values())
        if total <= self.max_bytes:
            return
        recency: dict[str, int] = {}
        for name in self._headers:
            try:
                recency[name] = self._path(name).stat().st_mtime_ns
            except FileNotFoundError:
                recency[name] = 0
        depth = {name: self._depth(name) for name in self._headers}
        for victim in sorted(self._headers, key=lambda n: (recency[n], -depth[n])):
            if total <= self.max_bytes:
                break
            if victim not in self._headers:
                continue  # already gone with an ancestor
            for name in self._with_descendants(victim):
                total -= self._headers.pop(name)[1]
                self._tokens.pop(name, None)
                self._path(name).unlink(missing_ok=True)
                self.counters.evicted += 1
                logger.info("prompt cache on disk: evicted %s (over %d bytes)", name, self.max_bytes)

    def _depth(self, name: str) -> int:
        depth = 0
        parent = self._header(name).parent
        while parent is not None and parent in self._headers and depth <= len(self._headers):
            depth += 1
            parent = self._header(parent).parent
        return depth

    def _with_descendants(self, root: str) -> list[str]:
        found = [root]
        for name in found:
            found += [child for child, entry in self._headers.items() if entry[2].parent == name and child not in found]
        return found


def _touch(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)
