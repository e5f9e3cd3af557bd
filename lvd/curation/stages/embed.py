"""The embed stage: every accepted blob of a run through a backbone, on Ray actors.

Layout inside a run folder R (the pool run, or a seed / eval-set run under RUN/seeds/<name>,
RUN/eval/<name>): `R/embed/part-NNNNNN.done.json`, one marker per ingest partition embedded;
the vectors themselves in `R/vectors/` (`lvd.curation.vectors` store, keyed by uid). A copy
model's descriptors use the same code under `R/copyembed` / `R/copyvec` (`lvd.curation.stages.copy`).

`run_given` stands in for the embedder when the vectors were computed elsewhere (`--vectors DIR`,
keyed by uid or by source): one Ray task per ingest partition picks the vectors of its accepted
images, checks them and writes the same store part and marker the embedder would. Refused, with
one message naming how many and the first few: an accepted image without a vector, a key given
twice, a vector that is not finite or is zero; a vector not of unit length is L2-normalised.
Nothing is written for a refused partition, so a fixed folder (new mtimes) imports again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from lvd.curation import actor_runner, rundir, runner
from lvd.curation import vectors as vec
from lvd.curation.embed import EmbedConfig, Embedder, embed_part
from lvd.curation.stages.given import import_given

__all__ = ["EmbedFn", "EmbedUnit", "MakeEmbedder", "embed_units", "run_embed", "run_given", "spec_fingerprint"]


@dataclass(frozen=True, kw_only=True)
class EmbedUnit:
    """One ingest partition's blobs file to embed."""

    index: int
    fingerprint: str
    blobs: str
    records: str = ""  # its ingest records (given vectors keyed by source need them)


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
    records = rundir.ingest_manifests(run_dir)  # in partition order
    for (index, m), main in zip(sorted(rundir.ingest_markers(run_dir).items()), records):
        fingerprint = f"{m['fingerprint']}:{m['config_hash']}"
        units.append(EmbedUnit(index=index, fingerprint=fingerprint, blobs=str(blobs_files[index]), records=str(main)))
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


def run_given(
    run_dir: Path, folder: str | Path, progress: runner.ProgressFn | None = None, *, stage: str = "embed"
) -> runner.StageReport:
    """The embed stage's outputs from precomputed vectors in `folder` (see the module doc);
    raises `vectors.GivenVectorsError` naming what is wrong in every partition at once."""
    from lvd.curation.uidranges import ray_map

    given = vec.scan_given(folder)
    units = embed_units(run_dir)
    stage_dir = rundir.stage_dir(run_dir, stage)
    cfg_hash = runner.config_hash("given", str(Path(folder).resolve()), given.identity)
    report, todo = runner.plan_stage(stage_dir, units, cfg_hash, progress=progress)
    out = str(rundir.vectors_dir(run_dir, stage))
    jobs = [
        (given, u.index, u.fingerprint, u.blobs, u.records, str(run_dir), out, str(stage_dir), cfg_hash) for u in todo
    ]
    results = ray_map(import_given, jobs)  # workers import stages.given only (no torch)
    problems: dict[str, list] = {}
    for r in results:
        for what, (n, first) in r["problems"].items():
            had = problems.setdefault(what, [0, []])
            had[0] += n
            had[1] = sorted(set(had[1]) | set(first))[:3]
    if problems:
        said = "; ".join(f"{n} {what} (e.g. {', '.join(first)})" for what, (n, first) in problems.items())
        raise vec.GivenVectorsError(
            f"--vectors {folder} (keyed by {given.key}, D={given.dim}): {said}. Every accepted image needs "
            f"exactly one finite, non-zero vector: embed the missing ones, or leave their files out of the inputs"
        )
    return runner.collect(report, [r["marker"] for r in results], len(units), progress)
