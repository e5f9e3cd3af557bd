"""Fail-fast inputs of training: unusable shards are named, corrupt samples are counted in
metrics.jsonl, and the out-of-memory message names the settings to lower."""

import io
import json
import tarfile
from dataclasses import replace

import pytest
import torch
import webdataset as wds
from PIL import Image
from skimage import data

from lvd.datasets import load_fashion_mnist, write_shards
from lvd.pretrain.data import expand_shards
from lvd.pretrain.failures import check_shard_files, oom_message
from lvd.pretrain.recipes import get_recipe, tiny
from lvd.pretrain.train import TrainConfig, train


@pytest.fixture(scope="module")
def good_shard(tmp_path_factory) -> str:
    x, _ = load_fashion_mnist("test")
    return str(write_shards(x[:8], tmp_path_factory.mktemp("good"), samples_per_shard=8, size=56)[0])


def _bad_shards(folder):
    empty = folder / "shard-000001.tar"
    empty.write_bytes(b"")
    no_members = folder / "shard-000002.tar"
    tarfile.open(no_members, "w").close()  # a valid tar with nothing in it: zero blocks
    not_tar = folder / "shard-000003.tar"
    not_tar.write_bytes(b"<html>502 Bad Gateway</html>" * 40)  # a failed download
    return {str(empty): "empty file", str(no_members): "no samples (empty tar)", str(not_tar): "not a tar file"}


def test_unusable_shards_are_named_with_the_reason(good_shard, tmp_path):
    bad = _bad_shards(tmp_path)
    check_shard_files([good_shard])  # a shard written by write_shards passes
    with pytest.raises(ValueError, match="unusable shards") as err:
        check_shard_files([good_shard, *bad])
    message = str(err.value)
    for path, why in bad.items():
        assert f"{path} ({why})" in message
    assert good_shard not in message


def test_train_refuses_them_before_building(good_shard, tmp_path):
    bad = _bad_shards(tmp_path)
    cfg = TrainConfig(shards=(good_shard, *bad), recipe=tiny(), out=tmp_path / "run", max_steps=1, num_workers=0)
    with pytest.raises(ValueError, match="not a tar file"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_paths_are_named(tmp_path):
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        expand_shards([str(tmp_path / "gone.tar"), str(tmp_path / "nothing-here")])
    assert str(tmp_path / "gone.tar") in str(err.value)
    assert f"{tmp_path / 'nothing-here'} (directory without shard-*.tar)" in str(err.value)


def _jpeg(name: str, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size)).save(buf, "JPEG")
    return buf.getvalue()


def test_corrupt_samples_are_counted_in_metrics(tmp_path):
    """8 samples, 1 truncated JPEG; 2 steps of 4 read the shard exactly once."""
    shard = tmp_path / "shard-000000.tar"
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "immunohistochemistry", "cat"]
    with wds.TarWriter(str(shard)) as w:
        for i, name in enumerate(names):
            jpg = _jpeg(name, 64 + i)
            w.write(
                {
                    "__key__": f"{i:06d}",
                    "jpg": jpg[:300] if i == 5 else jpg,
                    "json": json.dumps({"uid": f"u{i}"}).encode(),
                }
            )
    recipe = replace(tiny(), batch_size=4, log_every=1)
    train(
        TrainConfig(
            shards=(str(shard),), recipe=recipe, out=tmp_path / "run", max_steps=2, num_workers=0, pictures=False
        )
    )
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1]  # one line per step, from rank 0 only
    assert sum(x["corrupt_samples"] for x in lines) == 1


def test_out_of_memory_message_names_what_to_lower():
    r = replace(get_recipe("vitl14"), batch_size=24)
    message = oom_message(r, world_size=4, step=1234, bf16=True, device=torch.device("cpu"))
    for part in (
        "step 1234",
        "--batch-size (now 24 images per rank)",
        f"crops.n_local={r.crops.n_local}",
        f"crops.local_size={r.crops.local_size}",
        "--recipe vitl14",
        "more ranks (now 4",
        "--nproc-per-node x --nnodes",
        "bf16 autocast is already on",
    ):
        assert part in message, (part, message)
    assert r.crops.n_local == 8 and r.crops.local_size == 98  # the numbers shown are real
    fp32 = oom_message(tiny(), world_size=1, step=0, bf16=False)
    assert "train in bf16" in fp32 and "--batch-size (now 32 images" in fp32
