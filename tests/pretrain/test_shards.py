"""Shard reader: real JPEG shards written with webdataset.TarWriter, including corrupt samples."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from skimage import data

from lvd.pretrain.data.augmentations import MultiCropConfig
from lvd.pretrain.data.masking import MaskingConfig
from lvd.pretrain.data.shard_stream import count_samples, expand_shards, read_shard, slot_shards
from lvd.pretrain.data.shards import ShardDataConfig, make_dataloader

N_SHARDS, PER_SHARD = 4, 6
CORRUPT = {"000007": "jpg", "000016": "json"}  # key -> which member is broken
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"]


def _jpeg(index: int) -> bytes:
    arr = getattr(data, PHOTOS[index % len(PHOTOS)])()
    img = Image.fromarray(arr).convert("RGB").resize((48 + index, 40 + index))  # every sample distinct
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    for s in range(N_SHARDS):
        with wds.TarWriter(str(out / f"shard-{s:06d}.tar")) as writer:
            for j in range(PER_SHARD):
                key = f"{s * PER_SHARD + j:06d}"
                jpg, meta = _jpeg(s * PER_SHARD + j), json.dumps({"uid": f"uid-{key}", "source": key}).encode()
                if CORRUPT.get(key) == "jpg":
                    jpg = jpg[:200]  # truncated JPEG
                if CORRUPT.get(key) == "json":
                    meta = b"{not json"
                writer.write({"__key__": key, "jpg": jpg, "json": meta})
    return out


GOOD_UIDS = {f"uid-{i:06d}" for i in range(N_SHARDS * PER_SHARD) if f"{i:06d}" not in CORRUPT}


def cfg(**kw) -> dict:
    """make_dataloader keyword arguments for small, fast batches."""
    base = dict(
        batch_size=4,
        num_workers=0,
        seed=0,
        shuffle_buffer=8,
        crops=MultiCropConfig(global_size=28, local_size=14, n_local=1),
        masking=MaskingConfig(patch_size=14),
    )
    return {**base, **kw}


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_expand_shards_patterns_directories_and_errors(shard_dir, tmp_path):
    all_tars = sorted(str(p) for p in shard_dir.glob("shard-*.tar"))
    assert expand_shards(str(shard_dir)) == all_tars
    assert expand_shards([str(shard_dir / "shard-{000000..000003}.tar")]) == all_tars
    with pytest.raises(FileNotFoundError, match="shard-000009.tar"):
        expand_shards(str(shard_dir / "shard-{000000..000009}.tar"))
    with pytest.raises(FileNotFoundError, match="without shard"):
        expand_shards([str(tmp_path)])
    with pytest.raises(ValueError, match="no shards"):
        expand_shards([])


def test_slots_partition_the_shards_each_epoch_in_a_seeded_order():
    orders = []
    for epoch in range(3):
        slots = [slot_shards(10, seed=1, epoch=epoch, slot=s, n_slots=4) for s in range(4)]
        assert sorted(sum(slots, [])) == list(range(10))
        orders.append(slots)
    assert orders[0] != orders[1]
    assert orders[0] == [slot_shards(10, seed=1, epoch=0, slot=s, n_slots=4) for s in range(4)]
    # fewer shards than slots: every slot still gets one
    assert all(len(slot_shards(2, seed=0, epoch=0, slot=s, n_slots=5)) == 1 for s in range(5))


def test_one_epoch_without_shuffle_counts_and_replaces_corrupt_samples(shard_dir):
    batches = take(make_dataloader(shard_dir, **cfg(shuffle_buffer=0)), N_SHARDS * PER_SHARD // 4)
    assert all(b.n_images == 4 and b.global_crops.shape == (8, 3, 28, 28) for b in batches)
    assert sum(b.n_corrupt for b in batches) == len(CORRUPT)
    uids = [u for b in batches for u in b.uids]
    assert set(uids) == GOOD_UIDS  # every good sample once in the epoch, corrupt ones replaced
    assert len(uids) == N_SHARDS * PER_SHARD
    assert [b.batch_index for b in batches] == list(range(6))


def test_same_seed_same_stream_other_seed_other_stream(shard_dir):
    a = take(make_dataloader(shard_dir, **cfg(seed=3)), 8)  # 32 images: crosses into the next epoch
    b = take(make_dataloader(shard_dir, **cfg(seed=3)), 8)
    c = take(make_dataloader(shard_dir, **cfg(seed=4)), 8)
    assert [x.uids for x in a] == [x.uids for x in b]
    assert all(torch.equal(x.global_crops, y.global_crops) and torch.equal(x.masks, y.masks) for x, y in zip(a, b))
    assert [x.uids for x in a] != [x.uids for x in c]
    assert {u for x in a for u in x.uids} == GOOD_UIDS


def test_header_counts_match_samples_read(shard_dir):
    for path in sorted(shard_dir.glob("shard-*.tar")):
        assert count_samples(str(path)) == len(list(read_shard(str(path)))) == PER_SHARD


# shuffle_shards=1: resume passes whole shards by header counts; 4: replays inside a group
@pytest.mark.parametrize("num_workers, shuffle_shards", [(0, 1), (0, 4), (2, 1)])
def test_resume_from_start_batch_matches_uninterrupted_stream(shard_dir, num_workers, shuffle_shards):
    c = cfg(num_workers=num_workers, shuffle_shards=shuffle_shards)
    fresh = take(make_dataloader(shard_dir, **c), 9)
    resumed = take(make_dataloader(shard_dir, **c, start_batch=5), 4)
    assert [b.batch_index for b in resumed] == [5, 6, 7, 8]
    for x, y in zip(fresh[5:], resumed):
        assert x.uids == y.uids
        assert torch.equal(x.global_crops, y.global_crops) and torch.equal(x.local_crops, y.local_crops)
        assert torch.equal(x.masks, y.masks)


def test_ranks_read_disjoint_shards(shard_dir):
    r0 = take(make_dataloader(shard_dir, **cfg(shuffle_buffer=0), rank=0, world_size=2), 3)
    r1 = take(make_dataloader(shard_dir, **cfg(shuffle_buffer=0), rank=1, world_size=2), 3)
    shard_of = lambda uid: int(uid.split("-")[1]) // PER_SHARD  # noqa: E731
    s0 = {shard_of(u) for b in r0 for u in b.uids}
    s1 = {shard_of(u) for b in r1 for u in b.uids}
    assert len(s0) == len(s1) == 2 and not s0 & s1


def test_config_errors_name_the_fix(shard_dir):
    with pytest.raises(ValueError, match="batch_size=0"):
        ShardDataConfig(batch_size=0)
    with pytest.raises(ValueError, match="not a multiple of patch_size 15"):
        ShardDataConfig(batch_size=2, masking=MaskingConfig(patch_size=15))
    with pytest.raises(ValueError, match="rank=2"):
        make_dataloader(shard_dir, batch_size=2, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="nowhere.tar"):
        make_dataloader(["/nowhere.tar"], batch_size=2)


def test_truncated_shard_is_read_up_to_the_damage(shard_dir, tmp_path):
    raw = (shard_dir / "shard-000000.tar").read_bytes()
    cut = tmp_path / "shard-000000.tar"
    cut.write_bytes(raw[: len(raw) // 2])  # ends inside a member
    n = count_samples(str(cut))
    read = list(read_shard(str(cut)))
    assert 0 < n == len(read) < PER_SHARD  # header counts agree with what reading yields
    batches = take(make_dataloader([str(cut)], **cfg(shuffle_buffer=0, batch_size=n)), 2)
    # the last sample of the cut may have lost its json: it is replaced and counted, not fatal
    assert all(b.n_images == n for b in batches)
    assert sum(b.n_corrupt for b in batches) == 2 * sum("json" not in r.files or "jpg" not in r.files for r in read)
