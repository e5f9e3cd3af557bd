"""Stage 7: write selected samples as byte-deterministic WebDataset shards plus a manifest.

Order and keys. `write_shards` sorts the samples by `uid` (`ShardConfig.order="uid"`, the
default: the sha256 of the content, so shards mix sources and clusters like a shuffle and the
output does not depend on the order the caller found them in) or keeps the caller's order
(`order="given"`). Sample i of that order (0-based, over the whole run) gets the key
`f"{i:09d}"` and goes to `shard-{i // shard_size:06d}.tar`. Keys are digits only: no dots, so
WebDataset splits `KEY.jpg` / `KEY.json` correctly, and lexical order is sample order.

Images (`shard_image.store_image`). `KEY.jpg` is the original bytes when the source is an RGB or
grayscale JPEG needing no resize (`keep_original_jpeg`), else an RGB JPEG re-encode at
`jpeg_quality`, longer side at most `max_side`. `KEY.json` holds uid, source, width, height (as
ingest recorded them), cluster_ids, retrieval and jpg_width / jpg_height: the size a reader
sees after applying EXIF orientation to `KEY.jpg`.

Determinism and atomicity. Tar headers are fixed (mtime 0, uid/gid 0, no user/group names,
mode 0444, ustar format) and JSON is sorted and compact, so same input -> same sha256 (for
re-encoded images, with the same Pillow/libjpeg build). Each tar
is written through `lvd.durable.write_atomic` (a hidden temp name unique to the writer in
`out_dir`, fsync, rename, fsync of the folder); a failure removes the temp file, so a
`shard-*.tar` on disk is always complete. The manifest is written the same way. Shards are independent:
`plan_shards` + `write_shard` let a runner write them as parallel tasks and `write_manifest`
collect the `ShardInfo`s; `write_shards` does all three in one process.

Manifest `manifest.parquet` (`MANIFEST_SCHEMA`): one row per sample, in key order, with the
shard's sha256 / sample count / size repeated on each of its rows, so one file answers both
"where is uid X" and "what must shard-000003.tar hash to".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from lvd import durable
from lvd.curation.shards.image import StoredImage, store_image

MANIFEST = "manifest.parquet"
KEY_DIGITS = 9
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("uid", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),  # file name, e.g. shard-000000.tar
        pa.field("shard_sha256", pa.string(), nullable=False),
        pa.field("shard_samples", pa.int64(), nullable=False),
        pa.field("shard_bytes", pa.int64(), nullable=False),
    ]
)


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    shard_size: int = 1000  # samples per tar; the last tar holds the remainder
    max_side: int | None = None  # longer side of stored images; None keeps the size
    jpeg_quality: int = 95  # for re-encoded images only
    keep_original_jpeg: bool = True  # store JPEG sources byte-identical when no resize is needed
    order: Literal["uid", "given"] = "uid"

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size={self.shard_size}: a shard needs at least 1 sample")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max_side={self.max_side}: use a positive side length, or None to keep sizes")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality}: use 1..100 (Pillow's JPEG quality scale)")
        if self.order not in ("uid", "given"):
            raise ValueError(f"order={self.order!r}: use 'uid' (sort by content hash) or 'given'")


@dataclass(frozen=True, kw_only=True)
class ShardSample:
    """One selected image: ingest's record fields, its raw bytes, and curation provenance."""

    uid: str
    source: str
    width: int
    height: int
    data: bytes
    cluster_ids: tuple[int, ...] = ()  # one id per clustering level, coarsest first
    retrieval: Mapping[str, Any] = field(default_factory=dict)  # JSON-serialisable provenance
    faces: tuple[tuple[int, int, int, int], ...] = ()  # boxes (x, y, w, h, oriented full size) to blur


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """What one written tar holds; returned by `write_shard` (small, cheap to ship from a task)."""

    name: str
    n_samples: int
    sha256: str
    bytes: int
    keys: tuple[str, ...]
    uids: tuple[str, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ShardManifest:
    """The written manifest file and the shards it lists, in name order."""

    path: Path
    shards: tuple[ShardInfo, ...]

    @property
    def n_samples(self) -> int:
        return sum(info.n_samples for info in self.shards)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def order_samples(samples: Iterable[ShardSample], cfg: ShardConfig) -> list[ShardSample]:
    """The run's sample order (see module doc); rejects a uid given twice."""
    samples = list(samples)
    if twice := sorted(u for u, n in Counter(s.uid for s in samples).items() if n > 1):
        raise ValueError(f"{len(twice)} uids given more than once (dedup them before sharding): {twice[:3]}")
    return sorted(samples, key=lambda s: s.uid) if cfg.order == "uid" else samples


def plan_shards(n_samples: int, shard_size: int) -> list[range]:
    """Sample index ranges of each shard: shard i holds range i."""
    if n_samples < 0 or shard_size < 1:
        raise ValueError(f"n_samples={n_samples}, shard_size={shard_size}: need n >= 0, size >= 1")
    return [range(start, min(start + shard_size, n_samples)) for start in range(0, n_samples, shard_size)]


def write_shards(samples: Iterable[ShardSample], out_dir: str | os.PathLike, cfg: ShardConfig) -> ShardManifest:
    """Order, write every shard in this process, write the manifest; returns the manifest."""
    ordered = order_samples(samples, cfg)
    infos = [
        write_shard(i, ordered[r.start : r.stop], out_dir, cfg)
        for i, r in enumerate(plan_shards(len(ordered), cfg.shard_size))
    ]
    return write_manifest(infos, out_dir, cfg)


def write_shard(
    shard_index: int, samples: Sequence[ShardSample], out_dir: str | os.PathLike, cfg: ShardConfig
) -> ShardInfo:
    """Write `shard-{shard_index}.tar` atomically; `samples` is that shard's slice of the order."""
    if not 0 < len(samples) <= cfg.shard_size:
        raise ValueError(f"shard {shard_index} got {len(samples)} samples; plan_shards gives 1..{cfg.shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = shard_name(shard_index)
    keys = tuple(sample_key(shard_index * cfg.shard_size + j) for j in range(len(samples)))
    sinks = []

    def write(raw) -> None:
        sinks.append(sink := _HashingWriter(raw))
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, sample in zip(keys, samples):
                _add_sample(tar, key, sample, cfg)

    durable.write_atomic(out_dir / name, write)
    (sink,) = sinks
    return ShardInfo(
        name=name, n_samples=len(samples), sha256=sink.sha.hexdigest(), bytes=sink.n,
        keys=keys, uids=tuple(s.uid for s in samples), sources=tuple(s.source for s in samples),
    )  # fmt: skip


def write_manifest(
    infos: Iterable[ShardInfo], out_dir: str | os.PathLike, cfg: ShardConfig | None = None
) -> ShardManifest:
    """Write `out_dir/manifest.parquet` atomically (rows in key order); the config goes in its metadata."""
    infos = sorted(infos, key=lambda info: info.name)
    rows: dict[str, list] = {f.name: [] for f in MANIFEST_SCHEMA}
    for info in infos:
        rows["key"] += info.keys
        rows["uid"] += info.uids
        rows["source"] += info.sources
        per_shard = dict(
            shard=info.name, shard_sha256=info.sha256, shard_samples=info.n_samples, shard_bytes=info.bytes
        )
        for col, value in per_shard.items():
            rows[col] += [value] * info.n_samples
    meta = {b"lvd.shard_config": json.dumps(asdict(cfg), sort_keys=True).encode()} if cfg else None
    table = pa.Table.from_pydict(rows, schema=MANIFEST_SCHEMA.with_metadata(meta))
    path = Path(out_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)  # a run that selected nothing has no shards
    durable.write_parquet(path, table)
    return ShardManifest(path=path, shards=tuple(infos))


def samples_from_table(table: pa.Table) -> list[ShardSample]:
    """ShardSamples from a table with uid, source, width, height, data and optional
    cluster_ids (list<int>) and retrieval (struct, map or JSON string) columns."""
    missing = {"uid", "source", "width", "height", "data"} - set(table.column_names)
    if missing:
        raise ValueError(f"sample table lacks columns {sorted(missing)}; join the ingest blobs (uid, data) first")
    out = []
    for row in table.to_pylist():
        retrieval = row.get("retrieval") or {}
        out.append(
            ShardSample(
                uid=row["uid"], source=row["source"], width=int(row["width"]), height=int(row["height"]),
                data=row["data"], cluster_ids=tuple(row.get("cluster_ids") or ()),
                retrieval=json.loads(retrieval) if isinstance(retrieval, str) else dict(retrieval),
            )
        )  # fmt: skip
    return out


def sample_json(sample: ShardSample, stored: StoredImage) -> bytes:
    meta = dict(
        uid=sample.uid, source=sample.source, width=sample.width, height=sample.height,
        cluster_ids=list(sample.cluster_ids), retrieval=dict(sample.retrieval),
        jpg_width=stored.width, jpg_height=stored.height,
    )  # fmt: skip
    if sample.faces:  # blurred in KEY.jpg; boxes in width x height coordinates
        meta.update(faces_blurred=len(sample.faces), faces=[list(b) for b in sample.faces])
    try:
        return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except TypeError as e:
        raise TypeError(f"sample {sample.uid}: retrieval provenance must be JSON-serialisable ({e})") from None


def _add_sample(tar: tarfile.TarFile, key: str, sample: ShardSample, cfg: ShardConfig) -> None:
    try:
        stored = store_image(
            sample.data,
            max_side=cfg.max_side,
            quality=cfg.jpeg_quality,
            keep_original=cfg.keep_original_jpeg,
            faces=sample.faces,
        )
    except Exception as e:
        raise ValueError(f"sample {sample.uid} ({sample.source}) cannot be stored as JPEG: {e!r}") from e
    _add_member(tar, f"{key}.jpg", stored.data)
    _add_member(tar, f"{key}.json", sample_json(sample, stored))


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


class _HashingWriter:
    """File-like sink that hashes and counts what tarfile writes, so no second read is needed."""

    def __init__(self, raw) -> None:
        self.raw, self.sha, self.n = raw, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.raw.write(b)

    def tell(self) -> int:
        return self.n
