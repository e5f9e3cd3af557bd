"""Part-2 stages that compare embeddings: embed, copy detection, decontamination.

Layout inside a run folder R (the pool run, or a seed / eval-set run under RUN/seeds/<name>,
RUN/eval/<name>):
- `R/embed/part-NNNNNN.done.json`: one marker per ingest partition embedded; the vectors
  themselves in `R/vectors/` (`lvd.curation.vectors` store, keyed by uid);
- `R/copydetect/duplicates.parquet` (`dedup.DUPLICATES_SCHEMA`): pHash groups of the dedup
  stage unioned with embedding copy edges (`dedup.resolve`); `method` says which one tied each
  image in; it supersedes `R/dedup/duplicates.parquet` in the ledger;
- `R/decontam/decontaminated.parquet` (`DECONTAM_SCHEMA` + `eval_set`): pool images removed
  because their duplicate component touches an eval-set image.
Each global stage is one `runner.WholeStage` whose fingerprint digests the markers of the stages
it reads, so a changed input or config upstream reruns it and nothing else does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvd.curation import actor_runner, runner, stages
from lvd.curation.copydetect import CopyDetectConfig, embedding_edges
from lvd.curation.decontam import DEFAULT_THRESHOLD, components_from_duplicates, contaminated
from lvd.curation.dedup import DUPLICATES_SCHEMA, EdgeSet, resolve
from lvd.curation.embed import EmbedConfig, Embedder, embed_part
from lvd.curation.vectors import open_vectors

DECONTAM_FILE = "decontaminated.parquet"


def digest(*dirs: Path) -> str:
    """Digest of every done-marker under `dirs`: the identity of what a later stage reads."""
    h = hashlib.sha256()
    for d in dirs:
        for m in sorted(Path(d).glob(f"*{runner.MARKER_SUFFIX}")):
            h.update(f"{d.name}/{m.name}\n".encode() + m.read_bytes())
    return h.hexdigest()


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
    for index, m in sorted(stages.ingest_markers(run_dir).items()):
        blobs = run_dir / "ingest" / m["outputs"]["blobs"]
        units.append(EmbedUnit(index=index, fingerprint=f"{m['fingerprint']}:{m['config_hash']}", blobs=str(blobs)))
    return units


def spec_fingerprint(spec: str | Path) -> str:
    """Path, size and mtime of the weight files behind `spec`: new weights at the same path
    re-embed everything (reading the bytes to hash them would cost a model load each run)."""
    path = Path(spec)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return runner.config_hash([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()])


def run_embed(
    run_dir: Path, spec: str, cfg: EmbedConfig, acfg: actor_runner.ActorConfig = actor_runner.ActorConfig(),
    progress: runner.ProgressFn | None = None,
) -> runner.StageReport:
    """Embed every accepted blob of `run_dir` into `run_dir/vectors` (one part per partition)."""
    return actor_runner.map_with_actors(
        MakeEmbedder(str(spec), cfg), EmbedFn(str(run_dir / "vectors")), embed_units(run_dir),
        run_dir / "embed", cfg_hash=runner.config_hash(str(spec), spec_fingerprint(spec), cfg), acfg=acfg, progress=progress,
    )


@dataclass(frozen=True)
class CopyDetectFn:
    run_dir: str
    cfg: CopyDetectConfig

    def __call__(self, unit: runner.WholeStage) -> dict[str, pa.Table]:
        run = Path(self.run_dir)
        t = stages.unique_accepted(run)
        uids = np.asarray(t["uid"].to_pylist(), dtype=object)
        pixels = t["width"].to_numpy().astype(np.int64) * t["height"].to_numpy().astype(np.int64)
        vecs = open_vectors(run / "vectors").get(uids)
        edges = [phash_star_edges(uids, pq.read_table(run / "dedup" / "duplicates.parquet")),
                 embedding_edges(vecs, self.cfg)]
        return {"": resolve(uids, pixels, edges)}


def phash_star_edges(uids: np.ndarray, dups: pa.Table) -> EdgeSet:
    """The dedup stage's groups as edges (member -> representative, its distance): the same
    components, representatives and linking distances as the pHash edges that made them."""
    pos = {u: i for i, u in enumerate(uids.tolist())}
    a = np.array([pos[u] for u in dups["uid"].to_pylist()], np.int64)
    b = np.array([pos[u] for u in dups["duplicate_of"].to_pylist()], np.int64)
    return EdgeSet("phash", np.minimum(a, b), np.maximum(a, b), dups["distance"].to_numpy().astype(np.float64))


def run_copydetect(run_dir: Path, cfg: CopyDetectConfig, rcfg: runner.RunnerConfig = runner.RunnerConfig()) -> runner.StageReport:
    unit = runner.WholeStage(fingerprint=digest(run_dir / "dedup", run_dir / "embed"), stem="duplicates")
    return runner.map_partitions(
        CopyDetectFn(str(run_dir), cfg), [unit], run_dir / "copydetect", cfg_hash=runner.config_hash(cfg), runner=rcfg
    )


def duplicates(run_dir: Path) -> pa.Table:
    """The run's final duplicate table: copy detection's when it ran, else dedup's."""
    for stage in ("copydetect", "dedup"):
        if (p := run_dir / stage / "duplicates.parquet").exists():
            return pq.read_table(p)
    return DUPLICATES_SCHEMA.empty_table()


@dataclass(frozen=True)
class DecontamFn:
    run_dir: str
    eval_dirs: dict[str, str]  # eval-set name -> its run folder
    threshold: float

    def __call__(self, unit: runner.WholeStage) -> dict[str, pa.Table]:
        run = Path(self.run_dir)
        uids = np.asarray(stages.unique_accepted(run)["uid"].to_pylist(), dtype=object)
        pool = open_vectors(run / "vectors").get(uids)
        eval_uids, eval_vecs, set_of = eval_vectors({k: Path(v) for k, v in self.eval_dirs.items()})
        comps = components_from_duplicates(uids, duplicates(run))
        out = contaminated(pool, eval_vecs, comps, self.threshold, pool_uids=uids, eval_uids=eval_uids)
        sets = [set_of[u] for u in out["matched_eval_uid"].to_pylist()]
        return {"": out.append_column("eval_set", pa.array(sets, pa.string()))}


def eval_vectors(eval_dirs: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Every accepted eval image once (first set by name wins): uids, vectors, uid -> set."""
    set_of: dict[str, str] = {}
    for name in sorted(eval_dirs):
        for u in stages.unique_accepted(eval_dirs[name])["uid"].to_pylist():
            set_of.setdefault(u, name)
    uids = np.asarray(list(set_of), dtype=object)
    parts = [open_vectors(eval_dirs[n] / "vectors").get([u for u in uids if set_of[u] == n]) for n in sorted(eval_dirs)]
    order = [u for n in sorted(eval_dirs) for u in uids if set_of[u] == n]
    vecs = np.concatenate(parts) if parts else np.zeros((0, 1), np.float16)
    return np.asarray(order, dtype=object), vecs, set_of


def run_decontam(
    run_dir: Path, eval_dirs: dict[str, Path], threshold: float = DEFAULT_THRESHOLD,
    rcfg: runner.RunnerConfig = runner.RunnerConfig(),
) -> runner.StageReport:
    dirs = [run_dir / "copydetect", run_dir / "embed"] + [eval_dirs[n] / "embed" for n in sorted(eval_dirs)]
    unit = runner.WholeStage(fingerprint=digest(*dirs), stem="decontaminated")
    fn = DecontamFn(str(run_dir), {k: str(v) for k, v in eval_dirs.items()}, threshold)
    return runner.map_partitions(
        fn, [unit], run_dir / "decontam", cfg_hash=runner.config_hash(threshold, sorted(eval_dirs)), runner=rcfg
    )


def decontaminated(run_dir: Path) -> pa.Table | None:
    p = run_dir / "decontam" / DECONTAM_FILE
    return pq.read_table(p) if p.exists() else None


def candidates(run_dir: Path) -> list[str]:
    """uids still in the running after dedup, copy detection and decontamination, sorted."""
    uids = set(stages.unique_accepted(run_dir)["uid"].to_pylist())
    uids -= set(duplicates(run_dir)["uid"].to_pylist())
    if (dec := decontaminated(run_dir)) is not None:
        uids -= set(dec["uid"].to_pylist())
    return sorted(uids)
