"""ingest -> dedup -> [shard everything] -> ledger on the current Ray, without Prefect: what
`lvd curate` does without an embedder or copy detection, for the fault and security tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from lvd.curation import ledger, runner
from lvd.curation.dedup import DedupConfig
from lvd.curation.ingest import IngestConfig
from lvd.curation.shards import ShardConfig
from lvd.curation.stages.ingest_dedup import plan, run_dedup, run_ingest
from lvd.curation.stages.select import run_shards


def curate_without_prefect(
    inputs: list[str],
    run_dir: Path,
    *,
    partition_size: int,
    ingest_cfg: IngestConfig,
    dedup_cfg: DedupConfig,
    rcfg: runner.RunnerConfig = runner.RunnerConfig(),
    shard_cfg: ShardConfig | None = None,
    shard: bool = False,
) -> pa.Table:
    """Returns the ledger."""
    run_ingest(plan(inputs, partition_size), run_dir, ingest_cfg, rcfg)
    run_dedup(run_dir, dedup_cfg, rcfg)
    if shard:
        run_shards(run_dir, shard_cfg or ShardConfig(), rcfg)
    return ledger.write_ledger(run_dir)
