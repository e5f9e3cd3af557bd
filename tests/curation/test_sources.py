"""sources: partition planning over folders / tars / parquet, and raw-item iteration."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lvd.curation import testdata
from lvd.curation.sources import CORRUPT_TAR_MEMBER, iter_items, plan_partitions


def _jpeg(name: str = "astronaut", size: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(testdata.photo(name)).resize((size, size)).save(buf, "JPEG")
    return buf.getvalue()


def _items(inputs, **kw):
    return [item for p in plan_partitions([str(i) for i in inputs], **kw) for item in iter_items(p)]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_folder_layout_sidecars_and_bookkeeping(tmp_path):
    shard = tmp_path / "dump" / "00000"
    shard.mkdir(parents=True)
    (shard / "000000000.jpg").write_bytes(_jpeg())
    (shard / "000000000.json").write_text(json.dumps({"url": "http://x/1.jpg", "key": "000000000"}))
    (shard / "000000000.txt").write_text("an astronaut\n")
    (shard / "garbage.bin").write_bytes(b"\x00\x01junk")
    (shard / "notes.txt").write_text("no image shares my stem")
    (tmp_path / "dump" / "00000.parquet").write_bytes(b"img2dataset metadata, not an input")
    (tmp_path / "dump" / "00000_stats.json").write_text("{}")
    items = {Path(i.source).name: i for i in _items([tmp_path / "dump"])}
    assert sorted(items) == ["000000000.jpg", "garbage.bin", "notes.txt"]
    assert items["000000000.jpg"].meta == {"json": {"url": "http://x/1.jpg", "key": "000000000"}, "txt": "an astronaut"}
    assert items["garbage.bin"].data == b"\x00\x01junk" and items["garbage.bin"].meta == {}
    assert items["notes.txt"].meta == {} and items["000000000.jpg"].error is None


def test_partitions_deterministic_sorted_and_chunked(tmp_path):
    names = [f"{i:03d}.jpg" for i in (7, 3, 11, 0, 5)]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(b"a")
    first = plan_partitions([str(tmp_path)], files_per_partition=2)
    assert first == plan_partitions([str(tmp_path)], files_per_partition=2)
    assert [p.index for p in first] == [0, 1, 2]
    flat = [Path(s).relative_to(tmp_path).as_posix() for p in first for s in p.items]
    assert flat == ["000.jpg", "003.jpg", "005.jpg", "007.jpg", "011.jpg", "sub/a.jpg"]
    assert [len(p.items) for p in first] == [2, 2, 2]
    assert all(p.kind == "files" and p.uri == str(tmp_path) for p in first)
    assert len({p.fingerprint for p in first}) == 3


def test_fingerprint_changes_only_with_its_files(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"12345")
    before = plan_partitions([str(tmp_path)], files_per_partition=2)
    (tmp_path / "c.jpg").write_bytes(b"123456")  # second partition's file grows
    grown = plan_partitions([str(tmp_path)], files_per_partition=2)
    assert grown[0].fingerprint == before[0].fingerprint
    assert grown[1].fingerprint != before[1].fingerprint
    os.utime(tmp_path / "a.jpg", (1_000_000, 1_000_000))  # same size, new mtime
    touched = plan_partitions([str(tmp_path)], files_per_partition=2)
    assert touched[0].fingerprint != grown[0].fingerprint


def test_missing_input_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        plan_partitions([str(missing)])


def test_symlinks_loops_broken_links_and_fifos(tmp_path):
    root = tmp_path / "dump"
    (root / "d").mkdir(parents=True)
    (root / "d" / "img.jpg").write_bytes(b"real")
    (root / "d" / "loop").symlink_to(root, target_is_directory=True)  # would recurse forever
    (root / "alias.jpg").symlink_to(root / "d" / "img.jpg")
    (root / "broken.jpg").symlink_to(root / "gone.jpg")
    os.mkfifo(root / "pipe")  # reading it would block: not a regular file, not an input
    items = {Path(i.source).relative_to(root).as_posix(): i for i in _items([root])}
    assert sorted(items) == ["alias.jpg", "broken.jpg", "d/img.jpg"]
    assert items["alias.jpg"].data == b"real"
    assert items["broken.jpg"].data is None and items["broken.jpg"].error == "read_error"


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_tar_groups_sidecars_by_key(tmp_path):
    tar = tmp_path / "shard-000.tar"
    _write_tar(tar, {
        "dir/s1.jpg": _jpeg(), "dir/s1.json": b'{"caption": "one"}', "dir/s1.cls": b"3",
        "dir/s2.first.png": b"png-ish", "dir/s2.first.txt": b"two",  # key is up to the FIRST dot
        "lonely.json": b"{}",  # no image with its key: an input (rejected later as not_image)
    })  # fmt: skip
    (parts,) = plan_partitions([str(tar)])
    assert parts.kind == "tar" and parts.uri == str(tar)
    items = {i.source.split("::")[1]: i for i in iter_items(parts)}
    assert sorted(items) == ["dir/s1.jpg", "dir/s2.first.png", "lonely.json"]
    assert items["dir/s1.jpg"].meta == {"json": {"caption": "one"}, "cls": "3"}
    assert items["dir/s2.first.png"].meta == {"txt": "two"} and items["lonely.json"].data == b"{}"
    assert all(i.source.startswith(f"{tar}::") for i in items.values())


def test_folder_of_tars_gives_one_partition_each(tmp_path):
    for k in (1, 0):
        _write_tar(tmp_path / f"{k:05d}.tar", {f"{k}.jpg": b"x"})
        (tmp_path / f"{k:05d}.parquet").write_bytes(b"img2dataset bookkeeping")
    (tmp_path / "00000.json").write_text("{}")  # shares a tar's stem, but tars take no sidecars
    parts = plan_partitions([str(tmp_path)])
    got = [(p.index, p.kind, Path(p.uri).name, [Path(i).name for i in p.items]) for p in parts]
    assert got == [
        (0, "files", tmp_path.name, ["00000.json"]),
        (1, "tar", "00000.tar", []),
        (2, "tar", "00001.tar", []),
    ]


def test_hostile_tar_writes_nothing(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    tar = work / "hostile.tar"
    expected = testdata.write_hostile_tar(tar)
    monkeypatch.chdir(work)
    before, abs_existed = _tree(tmp_path), os.path.exists("/abs")
    items = {i.source: i for i in _items([tar])}
    assert _tree(tmp_path) == before and os.path.exists("/abs") == abs_existed
    assert set(items) == set(expected)
    for source, want in expected.items():
        got = items[source]
        assert (got.error if got.error else "data") == (want if want.startswith("tar_") else "data"), source
    assert items[f"{tar}::sample.jpg"].meta == {"json": {"caption": "a cup of coffee"}, "txt": "coffee"}


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_tar_yields_read_members_then_corrupt(tmp_path, compress):
    members = {f"s{i}.jpg": _jpeg(n) for i, n in enumerate(("astronaut", "rocket", "coffee", "chelsea"))}
    whole = tmp_path / "whole.tar"
    _write_tar(whole, members)
    raw = whole.read_bytes()
    raw = gzip.compress(raw) if compress else raw
    cut = tmp_path / ("cut.tar.gz" if compress else "cut.tar")
    cut.write_bytes(raw[: int(len(raw) * 0.6)])
    items = _items([cut])
    assert items[-1].source == f"{cut}::{CORRUPT_TAR_MEMBER}" and items[-1].error == "corrupt"
    intact = [i for i in items if i.error is None]
    assert intact and all(i.data == members[i.source.split("::")[1]] for i in intact)
    assert len(items) <= len(members) + 1


def test_not_a_tar_is_one_corrupt_record(tmp_path):
    bogus = tmp_path / "bogus.tar"
    bogus.write_bytes(b"this is not a tar archive" * 40)
    (item,) = _items([bogus])
    assert item.error == "corrupt" and item.source == f"{bogus}::{CORRUPT_TAR_MEMBER}"


def _parquet(path: Path, table: pa.Table, row_group_size: int = 2) -> None:
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_bytes_column_row_ranges(tmp_path):
    blobs = [_jpeg(n) for n in ("astronaut", "rocket", "coffee", "chelsea", "china")]
    path = tmp_path / "data.parquet"
    _parquet(path, pa.table({"caption": list("abcde"), "jpg": blobs[:4] + [None]}))
    parts = plan_partitions([str(path)], parquet_rows_per_partition=3)
    assert [(p.kind, p.rows) for p in parts] == [("parquet", (0, 3)), ("parquet", (3, 5))]
    items = [i for p in parts for i in iter_items(p)]
    assert [i.source for i in items] == [f"{path}::{r}" for r in range(5)]
    assert [i.data for i in items[:4]] == blobs[:4] and [i.meta for i in items] == [{"caption": c} for c in "abcde"]
    assert items[4].data is None and items[4].error == "empty"


def test_parquet_hf_struct_and_path_columns(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"file-a")
    struct = pa.array([{"bytes": b"inline", "path": None}, {"bytes": None, "path": "imgs/a.jpg"}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))  # fmt: skip
    hf = tmp_path / "hf.parquet"
    _parquet(hf, pa.table({"image": struct, "label": [1, 2]}))
    assert [(i.data, i.meta) for i in _items([hf])] == [
        (b"inline", {"label": 1}),
        (b"file-a", {"label": 2, "path": "imgs/a.jpg"}),
    ]
    paths = tmp_path / "paths.parquet"
    rel_abs_missing_web = [
        "imgs/a.jpg",
        str(tmp_path / "imgs" / "a.jpg"),
        "imgs/missing.jpg",
        "https://x.invalid/a.jpg",
    ]
    _parquet(paths, pa.table({"url": rel_abs_missing_web}))
    got = [(i.data, i.error) for i in _items([paths])]
    # web URLs are never fetched without --allow-remote (tests/security/test_inputs.py)
    assert got == [(b"file-a", None), (b"file-a", None), (None, "read_error"), (None, "remote_path")]


def test_parquet_without_image_column_names_the_file(tmp_path):
    path = tmp_path / "captions_only.parquet"
    _parquet(path, pa.table({"caption": ["a"], "width": [3]}))
    with pytest.raises(ValueError, match="captions_only.parquet"):
        plan_partitions([str(path)])
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 but not really")
    with pytest.raises(ValueError, match="broken.parquet"):
        plan_partitions([str(broken)])


def test_file_replaced_by_fifo_after_planning_is_a_read_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (part,) = plan_partitions([str(tmp_path)])
    (tmp_path / "a.jpg").unlink()
    os.mkfifo(tmp_path / "a.jpg")  # opening it for reading would block with no writer
    (item,) = iter_items(part)
    assert item.error == "read_error" and item.data is None


def test_fsspec_uri_folder_and_tar():
    import fsspec

    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("k.jpg")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"K"))
    fs.pipe(
        {
            "/lvd-test/a.jpg": b"A",
            "/lvd-test/a.json": b'{"k": 1}',
            "/lvd-test/s/b.png": b"B",
            "/lvd-test/t.tar": buf.getvalue(),
        }
    )
    try:
        parts = plan_partitions(["memory://lvd-test"])
        assert [(p.kind, p.uri) for p in parts] == [
            ("files", "memory:///lvd-test"),
            ("tar", "memory:///lvd-test/t.tar"),
        ]
        got = [(i.source, i.data, i.meta) for p in parts for i in iter_items(p)]
        assert got == [("memory:///lvd-test/a.jpg", b"A", {"json": {"k": 1}}), ("memory:///lvd-test/s/b.png", b"B", {}),
                       ("memory:///lvd-test/t.tar::k.jpg", b"K", {})]  # fmt: skip
    finally:
        fs.rm("/lvd-test", recursive=True)
