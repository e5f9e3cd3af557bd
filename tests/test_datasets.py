"""Fashion-MNIST idx reader, labelled folders and the shard writer."""

import hashlib
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lvd.datasets import load_fashion_mnist, write_labelled_folder, write_shards


def test_fashion_mnist_shapes_and_labels():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and np.bincount(y).tolist() == [1000] * 10  # balanced test set
    assert y[:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser, trouser, shirt


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_labelled_folder_upscales(tmp_path):
    x, y = load_fashion_mnist("test")
    write_labelled_folder(x[:3], y[:3], tmp_path, size=32)
    img = Image.open(tmp_path / "ankle-boot" / "0000000.png")
    assert img.size == (32, 32) and img.mode == "RGB"


def test_shards_layout_and_manifest(tmp_path):
    x, _ = load_fashion_mnist("test")
    shards = write_shards(x[:5], tmp_path, samples_per_shard=2, size=56)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        meta = json.load(tar.extractfile("000000000.json"))
        jpg = tar.extractfile("000000000.jpg").read()
    assert names == ["000000000.jpg", "000000000.json", "000000001.jpg", "000000001.json"]
    assert meta["uid"] == hashlib.sha256(jpg).hexdigest() and meta["width"] == 56
    rows = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    assert len(rows) == 5 and rows[4]["shard"] == "shard-000002.tar"
    assert rows[0]["shard_sha256"] == hashlib.sha256(shards[0].read_bytes()).hexdigest()
    # deterministic bytes: writing again gives the same shards
    again = write_shards(x[:5], tmp_path / "again", samples_per_shard=2, size=56)
    assert again[1].read_bytes() == shards[1].read_bytes()
