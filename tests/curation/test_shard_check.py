"""check_shards: passes on fresh output, and names each kind of tampering."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from lvd.curation.shards import ShardConfig, ShardSample, write_shards
from lvd.curation.shards.check import check_shards, format_shard_report

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def _samples() -> list[ShardSample]:
    out = []
    for name in _PHOTOS:
        buf = io.BytesIO()
        fmt = "PNG" if name == "coffee" else "JPEG"
        Image.fromarray(getattr(skimage.data, name)()).save(buf, format=fmt)
        raw = buf.getvalue()
        w, h = Image.open(buf).size
        uid = hashlib.sha256(raw).hexdigest()
        out.append(ShardSample(uid=uid, source=f"/dump/{name}", width=w, height=h, data=raw))
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pristine")
    write_shards(_samples(), out, ShardConfig(shard_size=2, max_side=256))
    return out


@pytest.fixture
def shards(pristine, tmp_path) -> Path:
    """A fresh copy of good output to tamper with: 5 samples in tars of 2, 2, 1."""
    out = tmp_path / "shards"
    shutil.copytree(pristine, out)
    return out


def _rewrite_tar(shards: Path, name: str, edit: Callable[[dict[str, bytes]], dict[str, bytes]]) -> None:
    """Rewrite one tar with edited members and put its new sha256 / size into the manifest,
    so only the content defect remains for the checker to find."""
    path = shards / name
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in edit(members).items():
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    raw = path.read_bytes()
    table = pq.read_table(shards / "manifest.parquet")
    mine = pc.equal(table["shard"], name)
    sha = pc.if_else(mine, hashlib.sha256(raw).hexdigest(), table["shard_sha256"])
    size = pc.if_else(mine, pa.scalar(len(raw), pa.int64()), table["shard_bytes"])
    table = table.set_column(table.schema.get_field_index("shard_sha256"), "shard_sha256", sha)
    table = table.set_column(table.schema.get_field_index("shard_bytes"), "shard_bytes", size)
    pq.write_table(table, shards / "manifest.parquet")


def _only_problems(shards: Path, **kw) -> list[str]:
    report = check_shards(shards, **kw)
    assert not report.ok and format_shard_report(report).count("\n  - ") == len(report.problems)
    return report.problems


def test_good_output_passes(shards):
    report = check_shards(shards)
    assert report.ok, report.problems
    assert (report.n_shards, report.n_samples, report.n_checked) == (3, 5, 5)
    assert "OK" in format_shard_report(report)


def test_empty_selection(tmp_path):
    manifest = write_shards([], tmp_path / "none", ShardConfig())
    assert manifest.shards == () and manifest.path.exists()
    report = check_shards(tmp_path / "none")
    assert report.ok and (report.n_shards, report.n_samples) == (0, 0)


def test_changed_byte_is_a_sha_mismatch(shards):
    path = shards / "shard-000001.tar"
    raw = bytearray(path.read_bytes())
    raw[1500] ^= 0x01  # inside the first JPEG's entropy-coded data: still decodes
    path.write_bytes(bytes(raw))
    (problem,) = _only_problems(shards)
    assert problem.startswith("shard-000001.tar: sha256") and "changed after writing" in problem


def test_missing_and_extra_tars(shards):
    (shards / "shard-000002.tar").unlink()
    shutil.copy(shards / "shard-000000.tar", shards / "shard-000007.tar")
    (shards / ".shard-000003.tar.abc.tmp").write_bytes(b"partial")
    assert _only_problems(shards) == [
        "shard-000002.tar: listed in the manifest but missing from " + str(shards),
        f"shard-000007.tar: in {shards} but not in the manifest",
        ".shard-000003.tar.abc.tmp: temp file of an interrupted write; delete it and rerun the shard stage",
    ]


def test_corrupt_jpg_in_rehashed_tar(shards):
    _rewrite_tar(
        shards, "shard-000000.tar", lambda m: {k: v[: len(v) // 2] if k == "000000001.jpg" else v for k, v in m.items()}
    )
    (problem,) = _only_problems(shards)
    assert problem.startswith("shard-000000.tar: 000000001: jpg does not decode")
    assert check_shards(shards, decode=False).ok  # the hash-only pass cannot see it


def test_wrong_uid_missing_member_and_stray_member(shards):
    def edit(members: dict[str, bytes]) -> dict[str, bytes]:
        meta = json.loads(members["000000002.json"])
        members["000000002.json"] = json.dumps(dict(meta, uid="0" * 64)).encode()
        del members["000000003.json"]
        members["notes.txt"] = b"hello"
        return members

    _rewrite_tar(shards, "shard-000001.tar", edit)
    problems = _only_problems(shards)
    assert problems[0].startswith("shard-000001.tar: 000000002: json uid '0000") and "!= manifest uid" in problems[0]
    assert problems[1] == "shard-000001.tar: notes.txt: unexpected member (samples hold KEY.jpg and KEY.json only)"
    assert problems[2] == "shard-000001.tar: 000000003: missing .json"
    assert len(problems) == 3


def test_dropped_sample_in_rehashed_tar(shards):
    _rewrite_tar(shards, "shard-000001.tar", lambda m: {k: v for k, v in m.items() if not k.startswith("000000003")})
    (problem,) = _only_problems(shards)
    assert problem == "shard-000001.tar: 2 samples listed, 1 in tar; missing keys ['000000003'], unlisted keys []"


def test_manifest_row_missing(shards):
    table = pq.read_table(shards / "manifest.parquet")
    pq.write_table(table.filter(pc.not_equal(table["key"], "000000003")), shards / "manifest.parquet")
    problems = _only_problems(shards)
    assert (
        problems[0]
        == "manifest: shard-000001.tar should hold 2 samples but 1 rows list it (a row was removed or added)"
    )
    assert problems[1] == "shard-000001.tar: 1 samples listed, 2 in tar; missing keys [], unlisted keys ['000000003']"
    assert len(problems) == 2


def test_truncated_tar(shards):
    path = shards / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[:2000])  # cut inside the first JPEG
    problems = _only_problems(shards)
    assert problems[0].startswith("shard-000000.tar: ") and "bytes, manifest says" in problems[0]
    assert "sha256" in problems[1] and "unreadable tar after 0 samples" in problems[2]
    assert len(problems) == 3


def test_unreadable_manifest(shards):
    (shards / "manifest.parquet").write_bytes(b"not parquet")
    (problem,) = _only_problems(shards)
    assert problem.startswith(f"cannot read {shards / 'manifest.parquet'}")
    (shards / "manifest.parquet").unlink()
    assert _only_problems(shards)[0].startswith("cannot read")
