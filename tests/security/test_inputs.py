"""Trust boundaries of the inputs (issue 12): inputs are data, paths stay inside the dump, and
every input has a byte cap (checked before reading) and a decoded-size cap (checked before
decoding), so one hostile input can neither read outside the dump, reach the network, nor
take a worker's memory."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import threading
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lvd.curation import testdata
from lvd.curation.ingest import IngestConfig, ingest_partition
from lvd.curation.sources import iter_items, plan_partitions

REPO = Path(__file__).resolve().parents[2]


def _jpeg(name: str = "astronaut", size: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(testdata.photo(name)).resize((size, size)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _records(inputs, cfg: IngestConfig = IngestConfig(), **kw) -> dict[str, dict]:
    out = {}
    for part in plan_partitions([str(i) for i in inputs], **kw):
        out.update({r["source"]: r for r in ingest_partition(part, cfg).records.to_pylist()})
    return out


# ---------------------------------------------------------------- paths stay inside the dump


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 -- http.server's name
        type(self).requests.append(self.path)
        body = _jpeg("rocket")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """A server on 127.0.0.1 that records every request it gets (bounded: closed after the test)."""
    _Recorder.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def hostile_parquet(tmp_path, http_server):
    """dump/paths.parquet naming one good path and every way out of the dump."""
    url, requests = http_server
    dump = tmp_path / "dump"
    (dump / "imgs").mkdir(parents=True)
    (dump / "imgs" / "ok.jpg").write_bytes(_jpeg("astronaut"))
    (tmp_path / "outside.jpg").write_bytes(_jpeg("coffee"))  # a valid image next to the dump
    (dump / "imgs" / "link.jpg").symlink_to(tmp_path / "outside.jpg")  # inside by name only
    rows = {
        "imgs/ok.jpg": None,
        "../outside.jpg": "path_outside_root",
        "imgs/../../outside.jpg": "path_outside_root",
        "imgs/link.jpg": "path_outside_root",
        str(tmp_path / "outside.jpg"): "path_outside_root",
        "/etc/hostname": "path_outside_root",
        f"file://{tmp_path}/outside.jpg": "remote_path",
        f"{url}/x.jpg": "remote_path",
        f"simplecache::{url}/y.jpg": "remote_path",
        f"blockcache::{url}/z.jpg": "remote_path",
        f"filecache::file://{tmp_path}/outside.jpg": "remote_path",
    }
    path = dump / "paths.parquet"
    pq.write_table(pa.table({"url": list(rows)}), path)
    return path, list(rows.values()), tmp_path, url, requests


def test_parquet_paths_outside_the_dump_or_remote_are_rejected_unread(hostile_parquet):
    path, reasons, tmp_path, _, requests = hostile_parquet
    records = _records([path])
    got = [records[f"{path}::{i}"] for i in range(len(reasons))]
    assert [r["reason"] for r in got] == reasons
    assert got[0]["status"] == "accepted"
    assert all(r["status"] == "rejected" and r["uid"] is None and r["nbytes"] is None for r in got[1:])
    assert requests == []  # not one request reached the local server
    uids = {r["uid"] for r in got}
    assert hashlib.sha256((tmp_path / "outside.jpg").read_bytes()).hexdigest() not in uids
    if os.path.exists("/etc/hostname"):
        assert hashlib.sha256(Path("/etc/hostname").read_bytes()).hexdigest() not in uids


def test_allow_root_and_allow_remote_open_exactly_what_they_name(hostile_parquet):
    path, reasons, tmp_path, url, requests = hostile_parquet
    cfg = IngestConfig(allow_roots=(str(tmp_path),), allow_remote=True)
    records = _records([path], cfg)
    got = [records[f"{path}::{i}"]["reason"] for i in range(len(reasons))]
    # outside.jpg lies in the allowed root (by relative, absolute and symlinked path); the
    # plain http URL is fetched; chained and file:// URLs stay refused, /etc/hostname too.
    assert got == [None, None, None, None, None, "path_outside_root", "remote_path", None,
                   "remote_path", "remote_path", "remote_path"]  # fmt: skip
    assert requests and set(requests) == {"/x.jpg"}  # its size asked, then its bytes; nothing else


def test_hf_struct_path_field_obeys_the_same_rules(tmp_path):
    (tmp_path / "outside.jpg").write_bytes(_jpeg())
    (tmp_path / "dump").mkdir()
    struct_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = pa.array(
        [{"bytes": None, "path": "../outside.jpg"}, {"bytes": None, "path": "https://127.0.0.1:9/a.jpg"}], struct_t
    )
    path = tmp_path / "dump" / "hf.parquet"
    pq.write_table(pa.table({"image": cells}), path)
    assert [(i.data, i.error) for p in plan_partitions([str(path)]) for i in iter_items(p)] == [
        (None, "path_outside_root"), (None, "remote_path")]  # fmt: skip


def test_remote_parquet_dump_reads_only_inside_its_own_folder():
    """The operator's own remote `--input` (here fsspec's memory://): relative paths resolve in
    its folder and may not climb out of it; absolute paths and URLs in it are refused."""
    import fsspec

    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    pq.write_table(
        pa.table({"path": ["a.jpg", "../up/b.jpg", "sub/../a.jpg", "/t12/up/b.jpg", "memory:///t12/up/b.jpg"]}), buf
    )
    fs.pipe({"/t12/d/p.parquet": buf.getvalue(), "/t12/d/a.jpg": b"A", "/t12/up/b.jpg": b"B"})
    try:
        got = [(i.data, i.error) for p in plan_partitions(["memory://t12/d/p.parquet"]) for i in iter_items(p)]
    finally:
        fs.rm("/t12", recursive=True)
    assert got == [
        (b"A", None),
        (None, "path_outside_root"),
        (b"A", None),
        (None, "path_outside_root"),
        (None, "remote_path"),
    ]


def test_folder_symlink_out_of_the_dump_is_not_read_nor_its_sidecar(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    (tmp_path / "secret.jpg").write_bytes(_jpeg("chelsea"))
    (tmp_path / "secret.txt").write_text("a secret caption")
    (dump / "a.jpg").write_bytes(_jpeg())
    (dump / "a.txt").symlink_to(tmp_path / "secret.txt")  # sidecar pointing out: not read
    (dump / "b.jpg").symlink_to(tmp_path / "secret.jpg")
    items = {Path(i.source).name: i for p in plan_partitions([str(dump)]) for i in iter_items(p)}
    assert items["b.jpg"].error == "path_outside_root" and items["b.jpg"].data is None
    assert items["a.jpg"].error is None and items["a.jpg"].meta == {}
    records = _records([dump], IngestConfig(allow_roots=(str(tmp_path),)))
    assert records[str(dump / "b.jpg")]["status"] == "accepted"


def test_rejections_reach_the_ledger(ray_local, hostile_parquet, tmp_path):
    from plain_curate import curate_without_prefect

    from lvd.curation import ledger
    from lvd.curation.dedup import DedupConfig

    path, reasons, _, _, requests = hostile_parquet
    table = curate_without_prefect([str(path)], tmp_path / "run", partition_size=4, ingest_cfg=IngestConfig(),
                                   dedup_cfg=DedupConfig())  # fmt: skip
    rows = {r["source"]: r for r in table.to_pylist()}
    assert [rows[f"{path}::{i}"]["reason"] for i in range(len(reasons))] == reasons
    assert ledger.verify_run(tmp_path / "run").ok and requests == []


# ---------------------------------------------------------------- byte and decoded-size caps


def _zero_png(path: Path, width: int, height: int) -> None:
    """A width x height RGBA PNG of zeros, compressed as it is written (never whole in memory)."""
    comp, row = zlib.compressobj(9), b"\x00" * (1 + 4 * width)
    idat = b"".join([*(comp.compress(row) for _ in range(height)), comp.flush()])
    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n" + testdata._png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
        )
        f.write(testdata._png_chunk(b"IDAT", idat) + testdata._png_chunk(b"IEND", b""))


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.n = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.n)
        b[:k] = bytes(k)
        self.n -= k
        return k


# Runs ingest on one input in a fresh process; prints the growth of its peak RSS (ru_maxrss)
# over a warmed-up baseline and the records.
_MEASURE = """
import json, resource, sys, tempfile
from PIL import Image
from lvd.curation.ingest import IngestConfig, ingest_partition
from lvd.curation.sources import plan_partitions
with tempfile.TemporaryDirectory() as warm:  # the same code paths once, on a small image
    Image.new("RGBA", (640, 480)).save(f"{warm}/w.png")
    [ingest_partition(p, IngestConfig()) for p in plan_partitions([warm])]
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = peak()
records = [r for p in plan_partitions([sys.argv[1]]) for r in ingest_partition(p, IngestConfig()).records.to_pylist()]
print(json.dumps({"grew": peak() - before, "records": [[r["source"], r["status"], r["reason"]] for r in records]}))
"""


def _measure(path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_png_decompression_bomb_rejected_from_header_without_memory(tmp_path):
    png = tmp_path / "bomb.png"
    _zero_png(png, 9400, 9400)  # 88 Mpx (under max_pixels), 337 MiB decoded, ~340 KB on disk
    assert png.stat().st_size < 400_000
    got = _measure(png)
    assert got["records"] == [[str(png), "rejected", "too_large"]]
    assert got["grew"] < 32 << 20, f"peak RSS grew by {got['grew'] / 2**20:.0f} MiB"


def test_gzip_tar_member_above_the_cap_is_skipped_not_read(tmp_path):
    tar = tmp_path / "big.tar.gz"
    ok = _jpeg("rocket")
    with tarfile.open(tar, "w:gz", compresslevel=6) as tf:
        info = tarfile.TarInfo("big.jpg")
        info.size = 512 << 20
        tf.addfile(info, io.BufferedReader(_Zeros(info.size), 1 << 20))
        info = tarfile.TarInfo("ok.jpg")
        info.size = len(ok)
        tf.addfile(info, io.BytesIO(ok))
    assert tar.stat().st_size < 1 << 20
    got = _measure(tar)
    assert got["records"] == [[f"{tar}::big.jpg", "rejected", "too_many_bytes"], [f"{tar}::ok.jpg", "accepted", None]]
    assert got["grew"] < 32 << 20, f"peak RSS grew by {got['grew'] / 2**20:.0f} MiB"


def test_byte_cap_on_files_parquet_cells_and_paths_before_reading(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    with open(dump / "huge.jpg", "wb") as f:  # sparse: 100 MiB that take no disk
        f.truncate(100 << 20)
    (dump / "ok.jpg").write_bytes(_jpeg(size=48))
    records = _records([dump])
    assert records[str(dump / "huge.jpg")]["reason"] == "too_many_bytes"
    assert records[str(dump / "huge.jpg")]["uid"] is None
    small = IngestConfig(max_bytes=10_000)
    big_cell, ok = b"\xff\xd8\xff" + bytes(20_000), _jpeg(size=48)
    assert len(ok) < 10_000
    table = tmp_path / "cells.parquet"
    pq.write_table(pa.table({"jpg": [big_cell, ok, None]}), table)
    paths = dump / "paths.parquet"
    pq.write_table(pa.table({"path": ["huge.jpg", "ok.jpg"]}), paths)
    got = _records([table, paths], small)
    assert [got[f"{table}::{i}"]["reason"] for i in range(3)] == ["too_many_bytes", None, "empty"]
    assert [got[f"{paths}::{i}"]["reason"] for i in range(2)] == ["too_many_bytes", None]
    assert got[f"{table}::0"]["uid"] is None


def test_parquet_is_read_in_row_batches_not_row_groups(tmp_path, monkeypatch):
    path = tmp_path / "one_group.parquet"
    blobs = [_jpeg(n, s) for n in ("astronaut", "rocket", "coffee", "chelsea") for s in range(64, 72)]
    pq.write_table(pa.table({"jpg": blobs}), path, row_group_size=len(blobs))
    seen = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kw):
        for batch in real(self, *args, **kw):
            seen.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", None)  # whole row groups: never
    cap = 3 * max(map(len, blobs))
    items = [i for p in plan_partitions([str(path)], parquet_rows_per_partition=20)
             for i in iter_items(p, IngestConfig(max_bytes=cap).source_limits())]  # fmt: skip
    assert [i.data for i in items] == blobs
    assert seen and max(seen) <= 4 and sum(seen) >= len(blobs)


# ---------------------------------------------------------------- honest errors


def test_symlink_loop_is_named_as_such(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "a.jpg").symlink_to(dump / "b.jpg")
    (dump / "b.jpg").symlink_to(dump / "a.jpg")
    (tmp_path / "o1").symlink_to(tmp_path / "o2")
    (tmp_path / "o2").symlink_to(tmp_path / "o1")
    (dump / "c.jpg").symlink_to(tmp_path / "o1")  # a loop outside the dump: still named a loop
    (dump / "ok.jpg").write_bytes(_jpeg())
    records = _records([dump])
    assert [records[str(dump / n)]["reason"] for n in ("a.jpg", "b.jpg", "c.jpg", "ok.jpg")] == ["symlink_loop"] * 3 + [
        None
    ]
    table = dump / "paths.parquet"  # a Parquet path cell naming the loop says so too
    pq.write_table(pa.table({"path": ["a.jpg", "ok.jpg"]}), table)
    assert [(i.error, i.data is None) for p in plan_partitions([str(table)]) for i in iter_items(p)][0] == (
        "symlink_loop",
        True,
    )
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(ValueError, match="symlink loop"):
        plan_partitions([str(loop)])
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="broken symlink"):
        plan_partitions([str(broken)])


@pytest.mark.parametrize("column,values", [("image", [1, 2]), ("path", [1.5, 2.5]), ("jpg", ["not", "bytes"])])
def test_wrong_typed_image_column_names_column_type_and_accepted_types(tmp_path, column, values):
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({column: values}), path)
    type_name = str(pa.array(values).type)
    with pytest.raises(ValueError, match=rf"'{column}' is {type_name}.*binary or large_binary.*string or large_string"):
        plan_partitions([str(path)])


# ---------------------------------------------------------------- lvd/tools use the same gate


def test_tools_decode_only_allow_listed_formats_within_the_caps(tmp_path):
    from lvd.tools.images import ImageRef, Raw, decode, open_checked_file, open_image, plan_units, read_raw

    img = Image.fromarray(testdata.photo("astronaut")).resize((64, 64))
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.tga")  # Pillow opens TGA, ingest's allow-list does not
    header = struct.pack(">IIBBBBB", 9400, 9400, 8, 6, 0, 0, 0)  # RGBA: 337 MiB decoded
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + testdata._png_chunk(b"IHDR", header)
                                     + testdata._png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + testdata._png_chunk(b"IEND", b""))  # fmt: skip
    with open(tmp_path / "d.png", "wb") as f:
        f.truncate(100 << 20)
    assert decode(Raw(ImageRef("a", "a"), (tmp_path / "a.png").read_bytes()), 32).image.size == (64, 64)
    assert (
        decode(Raw(ImageRef("b", "b"), (tmp_path / "b.tga").read_bytes()), 32).reason
        == "decode_error: ImageRejected: not_image"
    )
    assert (
        decode(Raw(ImageRef("c", "c"), (tmp_path / "c.png").read_bytes()), 32).reason
        == "decode_error: ImageRejected: too_large"
    )
    (unit,) = plan_units(tmp_path)
    assert {r.ref.id: r.reason for r in read_raw(unit)}["d.png"].startswith("read_error: too_many_bytes")
    for name, reason in (("b.tga", "not_image"), ("c.png", "too_large"), ("d.png", "too_many_bytes")):
        with pytest.raises(ValueError, match=f"rejected: {reason}"):
            open_image(str(tmp_path / name))
        with pytest.raises(ValueError, match=f"rejected: {reason}"):
            open_checked_file(tmp_path / name)
    assert open_image(str(tmp_path / "a.png")).size == (64, 64)


# ---------------------------------------------------------------- the CLI passes the options on


def test_curate_cli_options_reach_the_ingest_config(tmp_path):
    from lvd.cli.main import build_parser
    from lvd.cli.options import flow_kwargs

    args = build_parser().parse_args(["curate", "--input", "x", "--out", "y", "--allow-root", str(tmp_path),
                                      "--allow-root", "/srv/imgs", "--allow-remote", "--max-bytes", "1000",
                                      "--max-decoded-bytes", "5000"])  # fmt: skip
    cfg = IngestConfig(**flow_kwargs(args)["ingest"])
    assert cfg.allow_roots == tuple(sorted({os.path.realpath(tmp_path), "/srv/imgs"}))
    assert (cfg.allow_remote, cfg.max_bytes, cfg.max_decoded_bytes) == (True, 1000, 5000)
    default = IngestConfig(**flow_kwargs(build_parser().parse_args(["curate", "--input", "x", "--out", "y"]))["ingest"])
    assert (default.allow_roots, default.allow_remote, default.max_bytes) == ((), False, 64 << 20)
