"""Verify a shard folder against its `manifest.parquet` (for `lvd verify` and tests).

`check_shards(dir)` never raises on bad data: every defect becomes one line in
`ShardCheckReport.problems`, naming the shard (and key) and what differs. It checks
- the manifest itself: readable, expected columns, each shard's sha256 / count / size the same
  on all its rows, as many rows as the shard's count (a deleted row shows here), unique keys
  and uids;
- the folder: every listed tar present, no unlisted `shard-*.tar`, no temp file left by a
  writer that died;
- every tar: size and sha256 as listed; members are regular files named `KEY.jpg` /
  `KEY.json` with exactly the manifest's keys in order; each JSON parses and its uid is the
  manifest's; each JPEG decodes with Pillow (at 1/8 scale in the DCT, which still reads every
  scan; `decode=False` skips this, the slow part) and has the jpg_width / jpg_height its JSON
  states.
A tar whose hash differs is still read, so the report says what inside it changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lvd.curation.pixels import oriented_size
from lvd.curation.shards import MANIFEST, MANIFEST_SCHEMA

MAX_PROBLEMS_PER_SHARD = 10  # one broken tar must not bury the rest of the report
_SHARD_COLUMNS = ("shard_sha256", "shard_samples", "shard_bytes")


@dataclass(frozen=True, kw_only=True)
class ShardCheckReport:
    shards_dir: Path
    n_shards: int = 0  # listed in the manifest
    n_samples: int = 0  # manifest rows
    n_checked: int = 0  # samples found in tars and checked
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Listed:
    """One shard as the manifest describes it."""

    name: str
    sha256: str
    n_samples: int
    bytes: int
    keys: list[str]
    uids: list[str]


def read_manifest(shards_dir: Path | str) -> pa.Table:
    """The manifest table; raises FileNotFoundError / ValueError with what is wrong."""
    table = pq.read_table(Path(shards_dir) / MANIFEST)
    missing = [f.name for f in MANIFEST_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"{MANIFEST} lacks columns {missing}; rewrite it with lvd.curation.shards.write_manifest")
    return table


def check_shards(shards_dir: Path | str, *, decode: bool = True) -> ShardCheckReport:
    shards_dir = Path(shards_dir)
    try:
        rows = read_manifest(shards_dir).to_pydict()
    except (OSError, ValueError, pa.ArrowException) as e:
        return ShardCheckReport(shards_dir=shards_dir, problems=[f"cannot read {shards_dir / MANIFEST}: {e}"])
    listed, problems = _group(rows)
    problems += _check_folder(shards_dir, listed)
    n_checked = 0
    for shard in listed.values():
        path = shards_dir / shard.name
        if path.exists():
            found, shard_problems = _check_tar(path, shard, decode)
            n_checked += found
            problems += _capped(shard.name, shard_problems)
    return ShardCheckReport(
        shards_dir=shards_dir, n_shards=len(listed), n_samples=len(rows["key"]),
        n_checked=n_checked, problems=problems,
    )  # fmt: skip


def format_shard_report(report: ShardCheckReport) -> str:
    head = (
        f"shards {report.shards_dir}: {report.n_shards} tars, "
        f"{report.n_samples} samples listed, {report.n_checked} checked"
    )
    if report.ok:
        return head + "\nOK: every shard matches the manifest"
    return "\n".join([head, "BROKEN:"] + [f"  - {p}" for p in report.problems])


def _group(rows: dict[str, list]) -> tuple[dict[str, _Listed], list[str]]:
    """Shards in manifest order, and the manifest's own inconsistencies."""
    by_shard: dict[str, list[int]] = {}
    for i, name in enumerate(rows["shard"]):
        by_shard.setdefault(name, []).append(i)
    listed, problems = {}, []
    for name, idx in by_shard.items():
        values = {col: {rows[col][i] for i in idx} for col in _SHARD_COLUMNS}
        if any(len(v) > 1 for v in values.values()):
            problems.append(f"manifest: rows of {name} disagree on {[c for c, v in values.items() if len(v) > 1]}")
        sha, count, size = (sorted(values[c], key=str)[0] for c in _SHARD_COLUMNS)
        if count != len(idx):
            problems.append(
                f"manifest: {name} should hold {count} samples but {len(idx)} rows list it (a row was removed or added)"
            )
        keys, uids = [rows["key"][i] for i in idx], [rows["uid"][i] for i in idx]
        listed[name] = _Listed(name=name, sha256=sha, n_samples=count, bytes=size, keys=keys, uids=uids)
    for col in ("key", "uid"):
        if len(set(rows[col])) != len(rows[col]):
            problems.append(f"manifest: some {col}s appear on more than one row")
    return listed, problems


def _check_folder(shards_dir: Path, listed: dict[str, _Listed]) -> list[str]:
    on_disk = {p.name for p in shards_dir.glob("shard-*.tar")}
    problems = [
        f"{name}: listed in the manifest but missing from {shards_dir}" for name in listed if name not in on_disk
    ]
    problems += [f"{name}: in {shards_dir} but not in the manifest" for name in sorted(on_disk - set(listed))]
    for tmp in sorted(shards_dir.glob(".*.tmp")):
        problems.append(f"{tmp.name}: temp file of an interrupted write; delete it and rerun the shard stage")
    return problems


def _check_tar(path: Path, shard: _Listed, decode: bool) -> tuple[int, list[str]]:
    """(samples found, problems) for one tar."""
    problems = []
    sha, size = _file_digest(path)
    if size != shard.bytes:
        problems.append(f"{size} bytes, manifest says {shard.bytes}")
    if sha != shard.sha256:
        problems.append(
            f"sha256 {sha[:16]}... differs from the manifest's {shard.sha256[:16]}... (changed after writing)"
        )
    uid_of, found = dict(zip(shard.keys, shard.uids)), []
    try:
        for key, files in _read_samples(path, problems):  # one sample in memory at a time
            found.append(key)
            if key in uid_of:
                problems += [f"{key}: {p}" for p in _check_sample(files, uid_of[key], decode)]
    except (tarfile.TarError, OSError, EOFError) as e:
        return len(found), problems + [f"unreadable tar after {len(found)} samples: {e}"]
    if found != shard.keys:
        problems.append(_key_mismatch(found, shard.keys))
    return len(found), problems


def _read_samples(path: Path, problems: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order; members that do not fit the layout go to problems."""
    key, files = None, {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                problems.append(f"{member.name}: not a regular file")
                continue
            name_key, _, ext = member.name.partition(".")
            if ext not in ("jpg", "json") or "/" in member.name:
                problems.append(f"{member.name}: unexpected member (samples hold KEY.jpg and KEY.json only)")
                continue
            if name_key != key and key is not None:
                yield key, files
                files = {}
            key = name_key
            files[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, files


def _check_sample(files: dict[str, bytes], uid: str, decode: bool) -> list[str]:
    if missing := [ext for ext in ("jpg", "json") if ext not in files]:
        return [f"missing .{' and .'.join(missing)}"]
    try:
        meta = json.loads(files["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"json does not parse: {e}"]
    problems = [] if meta.get("uid") == uid else [f"json uid {meta.get('uid')!r} != manifest uid {uid!r}"]
    if decode:
        try:
            with Image.open(io.BytesIO(files["jpg"]), formats=["JPEG"]) as img:
                size = oriented_size(img)
                # 1/8-scale DCT decode: libjpeg still reads every scan, so truncation and
                # corrupt entropy data still fail, at a fraction of a full decode's cost
                img.draft(img.mode, (1, 1))
                img.load()
        except Exception as e:  # Pillow raises many types for broken files
            return problems + [f"jpg does not decode: {e!r}"]
        if size != (meta.get("jpg_width"), meta.get("jpg_height")):
            said = f"{meta.get('jpg_width')}x{meta.get('jpg_height')}"
            problems.append(f"jpg is {size[0]}x{size[1]}, json says {said}")
    return problems


def _key_mismatch(found: list[str], want: list[str]) -> str:
    found_set, want_set = set(found), set(want)
    missing, extra = [k for k in want if k not in found_set], [k for k in found if k not in want_set]
    if not missing and not extra:
        return "keys out of manifest order"
    counts = f"{len(want)} samples listed, {len(found)} in tar"
    return f"{counts}; missing keys {missing[:3]}, unlisted keys {extra[:3]}"


def _file_digest(path: Path) -> tuple[str, int]:
    sha, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            n += len(chunk)
    return sha.hexdigest(), n


def _capped(name: str, problems: list[str]) -> list[str]:
    out = [f"{name}: {p}" for p in problems[:MAX_PROBLEMS_PER_SHARD]]
    if len(problems) > MAX_PROBLEMS_PER_SHARD:
        out.append(f"{name}: ... and {len(problems) - MAX_PROBLEMS_PER_SHARD} more problems")
    return out
