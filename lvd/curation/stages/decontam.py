"""Decontamination as runner work: remove the pool's copies of eval-set images.

`R/decontam/decontaminated.parquet`: pool images removed because they, or a member of their
duplicate group, are copies of an eval-set image (`uid`, `matched_eval_uid`, `similarity`
(1 - distance, as in `stages.copy`), `eval_set`, `method`). Candidates come from hashes, the
model-free global descriptor and any proposing embedder; pairs are decided by the copy
detection's calibrated `Decider`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from lvd.curation import copydetect as cd
from lvd.curation import rundir, runner
from lvd.curation.guard import check_removal
from lvd.curation.scale import shardindex
from lvd.curation.stages.copy import Decider, PoolFeatures, calibration, duplicates, read_features
from lvd.curation.vectors import open_vectors

DECONTAM_SCHEMA = pa.schema([
    ("uid", pa.string()), ("matched_eval_uid", pa.string()), ("similarity", pa.float64()),
    ("eval_set", pa.string()), ("method", pa.string()),
])  # fmt: skip


@dataclass(frozen=True)
class DecontamFn:
    run_dir: str
    eval_dirs: dict[str, str]  # eval-set name -> its run folder
    cfg: cd.CopyDetectConfig
    proposers: tuple[tuple[str, dict[str, str]], ...]  # (pool vectors, {eval set: its vectors})
    copy_model: tuple[str, dict] | None

    def __call__(self, unit: runner.WholeStage) -> dict[str, pa.Table]:
        run, cfg = Path(self.run_dir), self.cfg
        cal = calibration(run)
        if cal is None:
            raise RuntimeError(f"{run}/copydetect has no calibration: run copy detection before decontamination")
        pool = read_features(run)
        ev, set_of = _eval_features({k: Path(v) for k, v in self.eval_dirs.items()})
        n, e = len(pool.uids), len(ev.uids)
        if not n or not e:
            return {"": DECONTAM_SCHEMA.empty_table()}
        qa, pb = cd.cross_hash_candidates(ev.nhash, pool.nhash, pool.nhash_flip, cfg.hash_radius)
        lists = [(ev.glob, pool.glob)]
        for pool_dir, eval_vecs in self.proposers:
            # the pool's vectors stay in their folder (sharded over Ray when large); the eval set is small
            pool_knn = partial(shardindex.knn_lists, pool_dir, pool.uids)
            lists.append((_eval_vectors(ev.uids, set_of, eval_vecs), pool_knn))
        copy_pool = copy_eval = None
        if self.copy_model:
            copy_pool = open_vectors(rundir.vectors_dir(run, "copyembed")).get(pool.uids)
            copy_eval = _eval_vectors(
                ev.uids, set_of, {k: str(rundir.vectors_dir(Path(v), "copyembed")) for k, v in self.eval_dirs.items()}
            )
            lists.append((copy_eval, copy_pool))
        q, p = [qa], [pb]
        for eq, pv in lists:
            search = pv if callable(pv) else partial(cd.knn_lists, np.asarray(pv))
            ids = search(cfg.k, np.asarray(eq), exclude_self=False)
            rows = np.repeat(np.arange(e), ids.shape[1])
            q.append(rows[ids.ravel() >= 0])
            p.append(ids.ravel()[ids.ravel() >= 0])
        key = np.unique(np.concatenate(q) * n + np.concatenate(p))
        q_rows, p_rows = key // n, key % n
        # one table of eval rows then pool rows, so one decider scores eval-pool pairs
        feats = ev.feats + pool.feats
        vecs = None if copy_pool is None else np.concatenate([copy_eval, copy_pool]).astype(np.float32)
        decider = Decider(feats, vecs, cal, cfg)
        scores = decider.scores(q_rows, p_rows + e)
        hit = decider.links(scores)
        best: dict[int, tuple[float, int]] = {}
        for qi, pi, s in zip(q_rows[hit].tolist(), p_rows[hit].tolist(), scores[hit].tolist()):
            if pi not in best or s > best[pi][0]:
                best[pi] = (s, qi)
        out = _with_components(pool.uids, best, duplicates(run), ev.uids, set_of, decider)
        check_removal(
            "decontamination",
            out.num_rows,
            n,
            cfg.max_remove,
            largest=[[str(pool.uids[r]) for r in list(best)[:8]]],
            detail=cal.summary() + f"; {len(best)} pool images matched {e} eval images. ",
        )
        return {"": out}


def _with_components(uids, best, dups: pa.Table, eval_uids, set_of, decider: Decider) -> pa.Table:
    """Every member of a group one of whose members matched, naming the group's best match."""
    rep = dict(zip(dups["uid"].to_pylist(), dups["duplicate_of"].to_pylist()))
    label = [rep.get(u, u) for u in uids.tolist()]
    group_best: dict[str, tuple[float, int]] = {}
    for pi, (s, qi) in sorted(best.items()):
        g = label[pi]
        if g not in group_best or s > group_best[g][0]:
            group_best[g] = (s, qi)
    rows = []
    for i, u in enumerate(uids.tolist()):
        hit = best.get(i) or group_best.get(label[i])
        if hit is None:
            continue
        s, qi = hit
        sim = 1.0 - float(decider.distance(np.array([s]))[0])
        rows.append(
            {
                "uid": u,
                "matched_eval_uid": str(eval_uids[qi]),
                "similarity": sim,
                "eval_set": set_of[str(eval_uids[qi])],
                "method": decider.method,
            }
        )
    return pa.Table.from_pylist(rows, schema=DECONTAM_SCHEMA).sort_by([("uid", "ascending")])


def _eval_features(eval_dirs: dict[str, Path]) -> tuple[PoolFeatures, dict[str, str]]:
    """Every accepted eval image once (first set by name wins), and uid -> its set."""
    parts, set_of = [], {}
    for name in sorted(eval_dirs):
        f = read_features(eval_dirs[name])
        keep = [i for i, u in enumerate(f.uids.tolist()) if u not in set_of]
        for i in keep:
            set_of[f.uids[i]] = name
        parts.append((f, keep))
    uids = np.array([f.uids[i] for f, k in parts for i in k], dtype=object)
    feats = [f.feats[i] for f, k in parts for i in k]
    pix = np.array([f.pixels[i] for f, k in parts for i in k], np.int64)
    asp = np.array([f.aspect[i] for f, k in parts for i in k], np.float64)
    glob = np.concatenate([f.glob[k] for f, k in parts]) if parts else np.zeros((0, 144), np.float32)
    nh = np.concatenate([f.nhash[k] for f, k in parts]) if parts else np.zeros((0, 32), np.uint8)
    nf = np.concatenate([f.nhash_flip[k] for f, k in parts]) if parts else np.zeros((0, 32), np.uint8)
    return PoolFeatures(uids, pix, asp, feats, glob, nh, nf), set_of


def _eval_vectors(uids: np.ndarray, set_of: dict[str, str], dirs: dict[str, str]) -> np.ndarray:
    stores = {name: open_vectors(d) for name, d in dirs.items()}
    return (
        np.concatenate([stores[set_of[u]].get([u]) for u in uids.tolist()])
        if len(uids)
        else np.zeros((0, 1), np.float16)
    )


def run_decontam(
    run_dir: Path,
    eval_dirs: dict[str, Path],
    cfg: cd.CopyDetectConfig,
    *,
    proposer: str | None = None,
    copy_model: tuple[str, dict] | None = None,
    rcfg: runner.RunnerConfig = runner.RunnerConfig(),
) -> runner.StageReport:
    """Remove the pool's copies of eval images (`proposer`: the vector folder name, e.g.
    "vectors", of an embedder that also proposes candidates)."""
    names = sorted(eval_dirs)
    dirs = [rundir.stage_dir(run_dir, "copydetect")] + [rundir.stage_dir(eval_dirs[n], "copyfeat") for n in names]
    proposers: tuple = ()
    if proposer:
        proposers = ((str(run_dir / proposer), {n: str(eval_dirs[n] / proposer) for n in names}),)
        dirs += [rundir.stage_dir(d, "embed") for d in (run_dir, *[eval_dirs[n] for n in names])]
    if copy_model:
        dirs += [rundir.stage_dir(d, "copyembed") for d in (run_dir, *[eval_dirs[n] for n in names])]
    unit = runner.WholeStage(fingerprint=rundir.digest(*dirs), stem="decontaminated")
    fn = DecontamFn(str(run_dir), {k: str(v) for k, v in eval_dirs.items()}, cfg, proposers, copy_model)
    return runner.map_partitions(
        fn,
        [unit],
        rundir.stage_dir(run_dir, "decontam"),
        cfg_hash=runner.config_hash(cfg, names, copy_model, proposer),
        runner=rcfg,
    )
