"""`lvd curate --worker-memory`: the budget reaches the partitioned stages, changes no output, and a
too-small one is refused before any work (exit 2)."""

from __future__ import annotations

import pytest

from lvd.cli import main as cli
from lvd.curation import ledger as lg
from lvd.curation import testdata
from lvd.curation.scale import budget as B
from lvd.curation.stages.retrieve import RetrieveConfig
from lvd.curation.stages.select import ClusterConfig
from lvd.flows import curate as flow
from lvd.flows import curate_tasks as tasks

BUDGET = B.WorkerBudget.parse("600MiB")


def test_budget_sizes_follow_it_and_no_budget_keeps_todays():
    assert tasks.dedup_sizes(7, None) == (None, None)
    partitioned, shuffle = tasks.dedup_sizes(7, BUDGET)  # a small run: the one task still fits
    assert partitioned is None and shuffle.task_options == {"memory": BUDGET.worker_bytes}
    assert (shuffle.buckets, shuffle.exact_buckets) == (16, 8)  # never below the defaults
    partitioned, shuffle = tasks.dedup_sizes(200_000, BUDGET)  # 200k records x 1.9 KB > 172 MiB
    assert partitioned is True
    assert shuffle.buckets == B.hash_bucket_count(200_000 * B.HASH_KEY_COPIES, BUDGET, record_bytes=B.HASH_KEY_BYTES)
    assert shuffle.buckets > 16 and shuffle.exact_buckets == 8
    assert tasks.dedup_sizes(10**6, BUDGET)[1].exact_buckets == B.hash_bucket_count(10**6, BUDGET) > 8

    cfg = ClusterConfig()
    assert tasks.cluster_sizes(cfg, 10_000, 128, BUDGET) is cfg  # one-task k-means: fingerprint kept
    big = tasks.cluster_sizes(cfg, 4_000_000, 128, BUDGET)
    assert big.rows_per_actor == B.kmeans_shard_rows(BUDGET, 128, 2000)
    rcfg = RetrieveConfig()
    assert tasks.retrieve_sizes(rcfg, 10_000, 128, BUDGET) is rcfg
    knn = tasks.retrieve_sizes(rcfg, 4_000_000, 128, BUDGET).knn
    assert knn.rows_per_shard == B.vector_shard_rows(BUDGET, 128, "ivf")
    assert knn.query_block == B.query_block_rows(BUDGET, 128, rcfg.k)


def _curate(folder, tar, run, *extra) -> int:
    argv = ["curate", "--input", str(folder), "--input", str(tar), "--out", str(run), "--partition-size", "4"]
    return cli.main([*argv, "--no-copy-detection", *extra])


def _rows(run) -> list[dict]:
    return sorted(lg.read_ledger(run).to_pylist(), key=lambda r: r["source"])


def test_worker_memory_reaches_the_stages_and_changes_no_ledger(ray_local, prefect_harness, tmp_path, monkeypatch):
    folder = tmp_path / "dump"
    testdata.write_photo_jpegs(folder / "big", 5, side=160)
    testdata.write_photo_jpegs(folder / "again", 3, side=160)  # the first three again: duplicates
    tar = tmp_path / "hostile.tar"
    testdata.write_hostile_tar(tar)
    assert _curate(folder, tar, tmp_path / "plain") == 0

    seen: dict[str, dict] = {}

    def spy(name, fn):
        def wrapped(*a, **kw):
            seen[name] = kw
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(flow.stages, "run_dedup", spy("dedup", flow.stages.run_dedup))
    monkeypatch.setattr(flow.ledger, "write_parts", spy("ledger", flow.ledger.write_parts))
    # a record costs a worker 30 MB here: the budget's data share holds ~6 of them, so this run
    # (16 records) takes the partitioned shuffle, as a pool of 10^5 records would under 600MiB
    monkeypatch.setattr(B, "HASH_WORK", 30e6 / B.HASH_RECORD_BYTES)
    assert _curate(folder, tar, tmp_path / "budget", "--worker-memory", "600MiB") == 0

    assert seen["dedup"]["partitioned"] is True
    assert seen["dedup"]["shuffle"].task_options == {"memory": 600 * B.MiB}
    assert seen["ledger"] == {"range_rows": B.ledger_range_rows(BUDGET)}
    plain, budget = _rows(tmp_path / "plain"), _rows(tmp_path / "budget")
    assert any(r["status"] == "duplicate" for r in plain)
    assert budget == plain


@pytest.mark.parametrize("size", ["1KiB", "500MiB", "lots"])
def test_too_small_or_bad_worker_memory_exits_2_before_any_work(tmp_path, capsys, size):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["curate", "--input", str(tmp_path), "--out", str(run), "--worker-memory", size])
    assert e.value.code == 2 and not run.exists()
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--worker-memory" in err


def test_the_flow_refuses_a_too_small_budget_before_claiming_the_folder(tmp_path):
    with pytest.raises(ValueError, match="use at least 512 MiB"):
        flow.curate.fn([str(tmp_path)], str(tmp_path / "run"), worker_memory="1KiB")
    assert not (tmp_path / "run").exists()
