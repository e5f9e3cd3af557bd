"""The raw sample stream of one reader slot: shard listing, partition, shuffle, cheap skip.

A slot is one DataLoader worker of one rank (`slot = rank * W + worker`, `S = world * W`).
Epoch e permutes the shard list with (seed, e); slot s takes `perm[s::S]` (the list is
repeated when there are fewer shards than slots, so every slot has work) and reads them in
groups of `group` shards: a group's shards are read interleaved, one sample from each in
turn, through a shuffle buffer seeded with (seed, slot, epoch, group index) and drained at
the group's end. Mixing therefore spans `group` shards with `buffer` samples of memory.

Because groups are independent, skipping n samples (resume) passes over whole groups
using sample counts from the tar headers (seeks, no data reads) and replays raw bytes,
undecoded, only inside the group where the resume point falls.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

log = logging.getLogger(__name__)

_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta


@dataclass
class RawSample:
    key: str
    shard: str
    files: dict[str, bytes]  # extension -> bytes, e.g. {"jpg": ..., "json": ...}


class MissingShardsError(FileNotFoundError):
    """Shard paths that do not exist or cannot be read."""


def expand_shards(shards: Sequence[str | os.PathLike] | str | os.PathLike) -> list[str]:
    """Brace patterns and directories (their `shard-*.tar`) to a list of existing tar paths.

    Patterns go through webdataset's own expansion (braces, `::`-separated lists)."""
    specs = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    if not specs:
        raise ValueError("no shards given: pass shard paths, a {000000..000009} pattern or a shard directory")
    paths, missing = [], []
    for spec in specs:
        for path in wds.shardlists.expand_urls(os.fspath(spec)):
            if os.path.isdir(path):
                found = sorted(str(p) for p in Path(path).glob("shard-*.tar"))
                paths += found
                missing += [] if found else [f"{path} (directory without shard-*.tar)"]
            elif os.path.isfile(path) and os.access(path, os.R_OK):
                paths.append(path)
            else:
                missing.append(path)
    if missing:
        more = " ..." if len(missing) > 10 else ""
        raise MissingShardsError(f"unreadable or missing shards: {', '.join(missing[:10])}{more}")
    return paths


def _warn_and_continue(exn: Exception) -> bool:
    log.warning("skipping unreadable tar content: %r", exn)
    return True


def read_shard(path: str) -> Iterator[RawSample]:
    """Raw samples of one tar in file order, grouped by key (webdataset's tar iterators)."""
    with open(path, "rb") as stream:
        files = wds.tariterators.tar_file_expander([{"url": path, "stream": stream}], handler=_warn_and_continue)
        for sample in wds.tariterators.group_by_keys(files, handler=_warn_and_continue):
            payload = {k: v for k, v in sample.items() if not k.startswith("__")}
            yield RawSample(key=sample["__key__"], shard=path, files=payload)


@functools.lru_cache(maxsize=65536)
def count_samples(path: str) -> int:
    """Samples `read_shard` yields, from the tar headers alone (same key grouping rules)."""
    count, previous = 0, None
    try:
        with tarfile.open(path, mode="r:") as tar:  # seekable mode: member data is skipped
            for info in tar:
                if not info.isreg() or _META.match(info.name):
                    continue
                prefix, _ = wds.tariterators.base_plus_ext(info.name)
                if prefix is not None and prefix != previous:
                    count, previous = count + 1, prefix
    except (tarfile.TarError, OSError) as exn:  # damaged tar: count what reading yields
        log.warning("counting %s by reading it: %r", path, exn)
        return sum(1 for _ in read_shard(path))
    return count


def slot_shards(n_shards: int, *, seed: int, epoch: int, slot: int, n_slots: int) -> list[int]:
    """Shard indices read by one slot in one epoch (seed-dependent order, disjoint slots)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n_shards)
    return np.resize(perm, max(n_shards, n_slots))[slot::n_slots].tolist()


def _interleave(iterators: list[Iterator[RawSample]]) -> Iterator[RawSample]:
    while iterators:
        for it in list(iterators):
            try:
                yield next(it)
            except StopIteration:
                iterators.remove(it)


def group_stream(paths: list[str], rng: np.random.Generator, buffer: int) -> Iterator[RawSample]:
    """Samples of a shard group, interleaved, through a shuffle buffer drained at the end."""
    pool: list[RawSample] = []
    for sample in _interleave([read_shard(p) for p in paths]):
        pool.append(sample)
        if len(pool) >= max(buffer, 1):
            j = int(rng.integers(len(pool)))
            pool[j], pool[-1] = pool[-1], pool[j]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


@dataclass(frozen=True, kw_only=True)
class SlotSpec:
    seed: int
    slot: int
    n_slots: int
    buffer: int  # shuffle buffer, samples
    group: int  # shards mixed together


def raw_stream(shards: list[str], spec: SlotSpec, *, skip: int = 0) -> Iterator[RawSample]:
    """Endless stream of one slot, starting `skip` samples in."""
    epoch = 0
    while True:
        order = slot_shards(len(shards), seed=spec.seed, epoch=epoch, slot=spec.slot, n_slots=spec.n_slots)
        n_epoch = 0
        for g, start in enumerate(range(0, len(order), spec.group)):
            paths = [shards[i] for i in order[start : start + spec.group]]
            n_group = sum(count_samples(p) for p in paths)
            n_epoch += n_group
            if skip >= n_group:
                skip -= n_group
                continue
            for sample in group_stream(paths, np.random.default_rng([spec.seed, spec.slot, epoch, g]), spec.buffer):
                if skip:
                    skip -= 1
                    continue
                yield sample
        if n_epoch == 0:  # an endless loop over empty or broken tars would hang training
            raise RuntimeError(f"slot {spec.slot} found no samples in epoch {epoch} of {len(shards)} shards")
        epoch += 1
