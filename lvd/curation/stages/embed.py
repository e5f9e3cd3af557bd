"""The embed stage: every accepted blob of a run through a backbone, on Ray actors.

Layout inside a run folder R (the pool run, or a seed / eval-set run under RUN/seeds/<name>,
RUN/eval/<name>): `R/embed/part-NNNNNN.done.json`, one marker per ingest partition embedded;
the vectors themselves in `R/vectors/` (`lvd.curation.vectors` store, keyed by uid). A copy
model's descriptors use the same code under `R/copyembed` / `R/copyvec` (`lvd.curation.stages.copy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from lvd.curation import actor_runner, rundir, runner
from lvd.curation.embed import EmbedConfig, Embedder, embed_part

__all__ = ["EmbedFn", "EmbedUnit", "MakeEmbedder", "embed_units", "run_embed", "spec_fingerprint"]


@dataclass(frozen=True, kw_only=True)
class EmbedUnit:
    """One ingest partition's blobs file to embed."""

    index: int
    fingerprint: str
    blobs: str


@dataclass(frozen=True)
class MakeEmbedder:
    """Picklable factory run once inside each actor (the model loads there, on its GPU)."""

    spec: str
    cfg: EmbedConfig

    def __call__(self) -> Embedder:
        return Embedder(self.spec, self.cfg)


@dataclass(frozen=True)
class EmbedFn:
    vectors_dir: str

    def __call__(self, embedder: Embedder, unit: EmbedUnit) -> dict[str, pa.Table]:
        n = embed_part(embedder, unit.blobs, self.vectors_dir, unit.index)
        return {"": pa.table({"vectors": pa.array([n], pa.int64())})}


def embed_units(run_dir: Path) -> list[EmbedUnit]:
    units = []
    blobs_files = rundir.ingest_blob_files(run_dir)
    for index, m in sorted(rundir.ingest_markers(run_dir).items()):
        blobs = blobs_files[index]
        units.append(EmbedUnit(index=index, fingerprint=f"{m['fingerprint']}:{m['config_hash']}", blobs=str(blobs)))
    return units


def spec_fingerprint(spec: str | Path) -> str:
    """Path, size and mtime of the weight files behind `spec`: new weights at the same path
    re-embed everything (reading the bytes to hash them would cost a model load each run)."""
    path = Path(spec)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return runner.config_hash([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()])


def run_embed(
    run_dir: Path,
    spec: str,
    cfg: EmbedConfig,
    acfg: actor_runner.ActorConfig = actor_runner.ActorConfig(),
    progress: runner.ProgressFn | None = None,
    *,
    stage: str = "embed",
) -> runner.StageReport:
    """Embed every accepted blob of `run_dir` into the stage's vector store (one part per
    partition; markers in the stage's folder): `embed` for the embedder, `copyembed` for a copy model."""
    return actor_runner.map_with_actors(
        MakeEmbedder(str(spec), cfg),
        EmbedFn(str(rundir.vectors_dir(run_dir, stage))),
        embed_units(run_dir),
        rundir.stage_dir(run_dir, stage),
        cfg_hash=runner.config_hash(str(spec), spec_fingerprint(spec), cfg),
        acfg=acfg,
        progress=progress,
    )
