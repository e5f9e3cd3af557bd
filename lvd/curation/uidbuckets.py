"""uid buckets for shuffles through Parquet files (decontamination's pool index, the copy
features' skips): bucket = crc32(uid) mod B. A map task writes one file sorted by bucket in row
groups, so a reduce task's `bucket ==` filter reads only its own groups: P files, not P x B."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from lvd import durable

GROUP_ROWS = 16_384  # rows per row group of a bucketed file


def uid_hash(uid: str, seed: int) -> int:
    """A seeded 64-bit hash of a uid: the first 8 bytes of sha256("seed:uid"), big-endian (the
    copy calibration's sample order and balanced sampling's draw)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{uid}".encode()).digest()[:8], "big")


def bucket_of(uids: list[str], buckets: int) -> np.ndarray:
    """int64 [n]: each uid's bucket."""
    return np.array([zlib.crc32(u.encode()) % buckets for u in uids], np.int64)


def write_sorted(t: pa.Table, path: Path, buckets: int) -> None:
    """`t` (a `uid` column) with its `bucket` column, sorted by bucket, written durably in row
    groups (whole files by rename: a retried task leaves no half file)."""
    t = t.append_column("bucket", pa.array(bucket_of(t["uid"].to_pylist(), buckets))).sort_by("bucket")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    durable.write_parquet(path, t, row_group_size=GROUP_ROWS)
