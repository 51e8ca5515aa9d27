"""The disk tier's store (app/launcher/prompt_store.py) in this process: chains, eviction, damage, sharing.

Real files and real MLX arrays, without a model: the KV of token t is filled with the value t, so a
restored prefix shows exactly which tokens' entries it was assembled from.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from app.launcher.disk_tier import host_tensors
from app.launcher.prompt_files import SUFFIX, read_header
from app.launcher.prompt_store import PromptStore

LAYERS = 3
IDENTITY = "test-identity"


def kv_for(tokens: list[int]) -> list[Any]:
    """Layer caches whose every value at position i is tokens[i] (and the layer number in the heads)."""
    caches = []
    for layer in range(LAYERS):
        values = mx.array(np.asarray(tokens, dtype=np.float32))[None, None, :, None]
        keys = mx.broadcast_to(values, (1, 2, len(tokens), 4)) + layer
        cache = KVCache()
        cache.update_and_fetch(keys, keys * 2)
        caches.append(cache)
    return caches


def save(store: PromptStore, tokens: list[int]) -> bool:
    plan = store.plan_save(tokens)
    if plan is None:
        return False
    store.commit(plan, host_tensors(kv_for(tokens), plan.parent_length, plan.length))
    time.sleep(0.02)  # distinct modification times, even on a coarse clock
    return True


def restored_tokens(store: PromptStore, tokens: list[int]) -> list[int] | None:
    result = store.restore(tokens, minimum=1)
    if result is None:
        return None
    caches, length = result
    for layer, cache in enumerate(caches):
        assert cache.offset == length
        assert mx.array_equal(cache.values, cache.keys * 2).item()
        assert cache.keys[0, 1, :, 3].tolist() == [t + layer for t in tokens[:length]]
    return [int(t) for t in caches[0].keys[0, 0, :, 0].tolist()]


def files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SUFFIX}"))


@pytest.fixture
def store(tmp_path: Path) -> PromptStore:
    return PromptStore(tmp_path / "store", IDENTITY, max_bytes=1 << 30, min_tokens=4)


SYSTEM = list(range(100, 140))


def test_a_prefix_is_assembled_from_a_chain_and_cut_where_the_prompts_part(store: PromptStore) -> None:
    turn1 = [*SYSTEM, 1, 2, 3, 4, 5]
    turn2 = [*turn1, 6, 7, 8, 9, 10, 11]
    assert save(store, turn1)
    assert save(store, turn2)
    headers = {h.length: h for h in map(read_header, files(store.directory))}
    assert headers[len(turn2)].parent == headers[len(turn1)].name
    assert headers[len(turn2)].tokens == (6, 7, 8, 9, 10, 11)

    # A third turn: everything stored, less the last token; a new session: the shared system prompt.
    assert restored_tokens(store, [*turn2, 12]) == turn2
    assert restored_tokens(store, [*SYSTEM, 9, 9]) == SYSTEM
    assert restored_tokens(store, [*turn1[:-1], 99]) == turn1[:-1]
    # Stored and asked for exactly: all but the last token, which must be fed again.
    assert restored_tokens(store, turn1) == turn1[:-1]
    # Too little in common, or shorter than asked for.
    assert restored_tokens(store, [7, 7, 7]) is None
    assert store.restore([*SYSTEM, 9], minimum=len(SYSTEM) + 1) is None


def test_a_prompt_mostly_on_disk_already_is_not_saved_again(store: PromptStore) -> None:
    assert save(store, [*SYSTEM, 1, 2])
    assert not save(store, [*SYSTEM, 1, 2, 3, 4, 5])  # 3 new tokens < min_tokens
    assert not save(store, SYSTEM)  # a prefix of what is stored
    assert save(store, [*SYSTEM, 9, 9, 9, 9])  # 4 new: a child after the shared system prompt
    assert len(files(store.directory)) == 2


def sizes_by_tokens(directory: Path) -> dict[tuple[int, ...], int]:
    """Each entry's size in bytes, keyed by its own tokens."""
    return {read_header(path).tokens: path.stat().st_size for path in files(directory)}


def test_eviction_takes_the_least_recently_used_first(store: PromptStore) -> None:
    a, b, c = ([t + offset for t in SYSTEM] for offset in (0, 1000, 2000))
    save(store, a)
    save(store, b)
    # Reading `a` makes it more recent than `b`.
    assert restored_tokens(store, [*a, 5]) == a
    time.sleep(0.02)
    sizes = sizes_by_tokens(store.directory)
    store.max_bytes = sum(sizes.values()) + min(sizes.values()) // 2
    save(store, c)
    remaining = sizes_by_tokens(store.directory)
    assert sorted(tokens[0] for tokens in remaining) == [a[0], c[0]]
    assert sum(remaining.values()) <= store.max_bytes
    assert store.counters.evicted == 1


def test_eviction_takes_children_before_their_parents(store: PromptStore, tmp_path: Path) -> None:
    session, other = [*SYSTEM, 1, 1, 1, 1], [t + 1000 for t in SYSTEM]
    probe = PromptStore(tmp_path / "probe", IDENTITY, max_bytes=1 << 30, min_tokens=4)
    save(probe, other)
    save(store, session)
    save(store, [*session, 3, 3, 3, 3])
    sizes = {**sizes_by_tokens(store.directory), **sizes_by_tokens(probe.directory)}
    # Room for all three but half the child.
    store.max_bytes = sum(sizes.values()) - sizes[(3, 3, 3, 3)] // 2
    save(store, other)
    # The child was written last in its chain, but its parent was touched with it: the child goes.
    remaining = sizes_by_tokens(store.directory)
    assert (3, 3, 3, 3) not in remaining
    assert tuple(session) in remaining


def test_eviction_of_an_entry_takes_every_entry_built_on_it(store: PromptStore) -> None:
    root, child = [*SYSTEM, 1, 1, 1, 1], [*SYSTEM, 1, 1, 1, 1, 3, 3, 3, 3]
    save(store, root)
    save(store, child)
    # An old root with a newer child (a file copied in, a clock that moved): the child cannot outlive it.
    root_path = next(p for p in files(store.directory) if read_header(p).parent is None)
    os.utime(root_path, (time.time() - 3600, time.time() - 3600))
    store.max_bytes = max(sizes_by_tokens(store.directory).values()) * 2
    save(store, [t + 1000 for t in root])
    assert [read_header(p).tokens[0] for p in files(store.directory)] == [1100]
    assert restored_tokens(store, [*child, 5]) is None


def test_an_entry_whose_parent_is_gone_is_deleted(store: PromptStore, caplog: pytest.LogCaptureFixture) -> None:
    root, child = [*SYSTEM, 1, 2, 3, 4], [*SYSTEM, 1, 2, 3, 4, 5, 6, 7, 8]
    save(store, root)
    save(store, child)
    parent = next(h for h in map(read_header, files(store.directory)) if h.parent is None)
    (store.directory / f"{parent.name}{SUFFIX}").unlink()
    with caplog.at_level(logging.INFO, "specgate.launcher"):
        assert restored_tokens(store, [*child, 9]) is None
    assert files(store.directory) == []
    assert "its parent is gone" in caplog.text


def test_a_file_under_another_name_is_deleted_with_a_warning(
    store: PromptStore, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = [*SYSTEM, 1, 2, 3, 4]
    save(store, tokens)
    (path,) = files(store.directory)
    renamed = path.with_name("0" * 40 + SUFFIX)
    os.rename(path, renamed)
    assert restored_tokens(store, [*tokens, 5]) is None
    assert not renamed.exists()
    assert "its name does not match its tokens" in caplog.text


def test_two_stores_on_one_directory_see_each_others_entries(tmp_path: Path) -> None:
    one = PromptStore(tmp_path, IDENTITY, max_bytes=1 << 30, min_tokens=4)
    two = PromptStore(tmp_path, IDENTITY, max_bytes=1 << 30, min_tokens=4)
    turn1 = [*SYSTEM, 1, 2, 3, 4]
    save(one, turn1)
    assert restored_tokens(two, [*turn1, 5]) == turn1
    # The second extends what the first wrote; the first then finds the chain.
    save(two, [*turn1, 5, 6, 7, 8])
    assert restored_tokens(one, [*turn1, 5, 6, 7, 8, 9]) == [*turn1, 5, 6, 7, 8]
    # One evicts; the other notices the files are gone instead of failing.
    one.max_bytes = 0
    save(one, [*SYSTEM, 9, 9, 9, 9])
    assert files(tmp_path) == []
    assert restored_tokens(two, [*turn1, 5, 6, 7, 8, 9]) is None


def test_a_save_writes_the_kv_as_it_was_even_if_the_cache_changes_before_the_write(store: PromptStore) -> None:
    # The writer reads the cache's memory through views, later than the generation thread took them. MLX
    # reuses a buffer in place only when nothing else references it: the views must keep the bytes.
    tokens = [*SYSTEM, 1, 2, 3, 4]
    cache = kv_for(tokens)
    plan = store.plan_save(tokens)
    assert plan is not None
    tensors = host_tensors(cache, plan.parent_length, plan.length)
    for layer in cache:
        layer.trim(20)
        layer.update_and_fetch(mx.zeros((1, 2, 10, 4)), mx.zeros((1, 2, 10, 4)))
        mx.eval(layer.keys, layer.values)
    store.commit(plan, tensors)
    assert restored_tokens(store, [*tokens, 5]) == tokens


def test_an_entry_replaced_by_another_backend_while_being_read_is_not_deleted(tmp_path: Path) -> None:
    # Two backends saved the same prompt under the same name, one as a chain, one as a root; the second
    # one's rename lands between the first's index (under its lock) and its read (outside it).
    one = PromptStore(tmp_path / "one", IDENTITY, max_bytes=1 << 30, min_tokens=4)
    two = PromptStore(tmp_path / "two", IDENTITY, max_bytes=1 << 30, min_tokens=4)
    prompt = [*SYSTEM, 1, 2, 3, 4]
    save(one, SYSTEM)
    save(one, prompt)
    save(two, prompt)
    (replacement,) = files(two.directory)
    with one._lock:
        one._refresh()
        chain = one._chain(replacement.stem, len(prompt))
    assert [header.parent_length for header, _ in chain] == [0, len(SYSTEM)]
    os.replace(replacement, one.directory / replacement.name)
    assert one._load(chain) is None
    assert (one.directory / replacement.name).exists()
    # Indexed again, the new file is the entry.
    assert restored_tokens(one, [*prompt, 5]) == prompt
    assert read_header(one.directory / replacement.name).parent is None
