"""The flow's count tables: the ingest counts read a partition at a time, equal to counting every record."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import skimage.data
from PIL import Image

from lvd.curation import rundir
from lvd.flows import artifacts


def _jpeg(a) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_ingest_status_rows_count_each_partition_as_all_records(ray_local, tmp_path):
    """A real ingest run (photos, a duplicate, broken files across partitions) and manifests with
    null and empty reasons: the per-partition counts equal `status_reason_rows` over all records."""
    from lvd.curation.ingest import IngestConfig
    from lvd.curation.stages import ingest_dedup as stages

    src = tmp_path / "in"
    src.mkdir()
    for i, a in enumerate([skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]):
        (src / f"a{i}.jpg").write_bytes(_jpeg(a))
    (src / "b_dup.jpg").write_bytes(_jpeg(skimage.data.astronaut()))
    (src / "c_empty.png").write_bytes(b"")
    (src / "d_text.jpg").write_bytes(b"hello")
    (src / "e_cut.jpg").write_bytes(_jpeg(skimage.data.camera())[:300])
    run = tmp_path / "run"
    stages.run_ingest(stages.plan([str(src)], 2), run, IngestConfig())
    manifests = rundir.ingest_manifests(run)
    t = rundir.read_ingest(run, ["status", "reason"])
    want = artifacts.status_reason_rows(t["status"].to_pylist(), t["reason"].to_pylist())
    assert len(manifests) == 4 and len({r["status"] for r in want}) >= 2, want
    assert artifacts.ingest_status_rows(manifests) == want
    extra = tmp_path / "extra.parquet"  # reasons that are null and empty, and repeats
    pq.write_table(pa.table({"status": ["rejected", "accepted", "accepted", "rejected"],
                             "reason": ["", None, None, "corrupt"]}), extra)  # fmt: skip
    both = pa.concat_tables([t, pq.read_table(extra).cast(t.schema)])
    want = artifacts.status_reason_rows(both["status"].to_pylist(), both["reason"].to_pylist())
    assert artifacts.ingest_status_rows([*manifests, extra]) == want
