"""Partitioned copy detection (lvd.curation.scale.copyscale) gives the single task's outputs.

A run of real photos (scikit-image), their hash-level copies (dedup groups), crops, overlays and
mirror images (verified and mirrored-hash links), with a proposer vector folder: the single task
(`stages.copy.run_copydetect`) and the partitioned path write the same duplicates.parquet and
the same counts, deciding by local features or by a copy model's cosine (a TorchScript file the
test makes, embedded by the copy-embed stage), on the session's Ray and (slow) on a 3-node
`ray.cluster_utils.Cluster`. The
per-image candidate bound is checked alone against `copydetect.bounded_candidates`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import skimage.data
import torch
from _models import TinyDescriptor
from PIL import Image

from lvd.curation import copies, rundir
from lvd.curation import copydetect as cd
from lvd.curation.guard import MassRemovalError
from lvd.curation.scale import copyscale
from lvd.curation.scale.shardindex import ShardConfig
from lvd.curation.vectors import write_vectors

# calibration on 8 sampled images (2 with known copies) keeps the test short; both paths share it
CFG = cd.CopyDetectConfig(k=8, max_verify=6, max_remove=0.95, calib_images=8, calib_copy_images=2)
SCALE = copyscale.CopyScaleConfig(part_rows=5, lsh_buckets=3, groups=3, partitions=3, uid_buckets=3, order_ranges=4)
TIMINGS = ("seconds_", "partitioned")
COSINE = 0.9  # this random descriptor's cosines: links, and chains that split


def make_run(root: Path) -> tuple[Path, Path]:
    """Ingest, hash dedup and copy features of a pool with copies of every kind, and a proposer
    folder (the global descriptors plus noise, float16, in two parts of shuffled order)."""
    from lvd.curation.dedup import DedupConfig
    from lvd.curation.ingest import IngestConfig
    from lvd.curation.stages import copy as stages_copy
    from lvd.curation.stages import ingest_dedup as stages

    src = root / "in"
    src.mkdir(parents=True)
    catalog = {o.name: o for o in copies.bench_catalog(0)}
    for name in ("astronaut", "camera", "coins", "chelsea", "clock"):
        o = catalog[name]
        (src / f"{name}.jpg").write_bytes(copies.encode_original(o.image))
        for kind in ("resized", "recompressed", "crop40", "flipped", "overlay"):
            data, _ = copies.make_bench_copy(o, kind)
            (src / f"{name}__{kind}.img").write_bytes(data)
    # a chain for split_chains: two halves of a photo (no shared pixels, the largest images)
    # and the whole photo, smaller, linked with each: the halves end up in two stars
    img = Image.fromarray(skimage.data.immunohistochemistry())
    w, h = img.size
    for name, box, side in (("cells_left", (0, 0, w * 9 // 20, h), 900), ("cells_right", (w * 11 // 20, 0, w, h), 800)):
        half = img.crop(box)
        (src / f"{name}.png").write_bytes(_png(half.resize((side, round(side * half.size[1] / half.size[0])))))
    (src / "cells_whole.jpg").write_bytes(copies.encode_original(img.resize((w // 2, h // 2))))
    run = root / "run"
    stages.run_ingest(stages.plan([str(src)], 9), run, IngestConfig())
    stages.run_dedup(run, DedupConfig())
    stages_copy.run_copyfeat(run)
    pool = stages_copy.read_features(run)
    rng = np.random.default_rng(0)
    vecs = pool.glob + rng.normal(0, 0.05, pool.glob.shape).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    order = rng.permutation(len(vecs))
    prop = root / "proposer"
    half = len(order) // 2
    for part, rows in enumerate((order[:half], order[half:])):
        write_vectors(prop, part, pool.uids[rows].tolist(), vecs[rows].astype(np.float16))
    return run, prop


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def both_paths(run: Path, prop: Path, cfg=CFG, scale=SCALE) -> tuple[Path, Path]:
    """The run copied twice; the single task on one, the partitioned path on the other."""
    from lvd.curation.stages import copy as stages_copy

    single, parted = run.parent / "single", run.parent / "parted"
    for d in (single, parted):
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(run, d)
    stages_copy.run_copydetect(single, cfg, proposers=[prop])  # below PARTITIONED_MIN_IMAGES: one task
    stages_copy.run_copydetect(parted, cfg, proposers=[prop], partitioned=True, scale=scale)
    return single, parted


def same_outputs(single: Path, parted: Path) -> dict:
    a = pq.read_table(single / "copydetect" / "duplicates.parquet")
    b = pq.read_table(parted / "copydetect" / "duplicates.parquet")
    assert a.num_rows > 0
    assert b.equals(a), a.to_pandas().compare(b.to_pandas()) if a.num_rows == b.num_rows else (a.num_rows, b.num_rows)
    sa, sb = (rundir.copydetect_output(r, "stats") for r in (single, parted))
    strip = lambda s: {k: v for k, v in s.items() if not k.startswith(TIMINGS)}  # noqa: E731
    assert strip(sb) == strip(sa) and sb["partitioned"] and "partitioned" not in sa  # each path ran
    assert rundir.copydetect_output(parted, "calibration") == rundir.copydetect_output(single, "calibration")
    return sa


@pytest.fixture(scope="module")
def paths(ray_local, tmp_path_factory):
    run, prop = make_run(tmp_path_factory.mktemp("copyscale"))
    return (run, prop, *both_paths(run, prop))


def test_partitioned_copy_detection_equals_the_single_task(paths):
    stats = same_outputs(*paths[2:])
    # every candidate source, decision kind and the chain split took part: the equality means something
    assert stats["hash_candidates"] > 0 and stats["phash_links"] > 0 and stats["decided_links"] > 0
    assert stats["candidates"] > stats["decided_links"]
    assert stats["components_split"] >= 1 and stats["split_checks"] >= 1
    assert stats["images"] > 5 * SCALE.part_rows  # 7 ranges, pairs across ranges


def guard_error(run: Path, prop: Path, partitioned: bool, max_remove: float) -> MassRemovalError:
    """The error of copy detection refusing at `max_remove` (nothing written), unwrapped."""
    from lvd.curation.stages import copy as stages_copy

    cfg = replace(CFG, max_remove=max_remove)
    with pytest.raises(Exception) as info:
        stages_copy.run_copydetect(run, cfg, proposers=[prop], partitioned=partitioned, scale=SCALE)
    err = getattr(info.value, "cause", None) or info.value  # both raise it through a Ray task
    assert isinstance(err, MassRemovalError), repr(info.value)
    assert not (run / "copydetect" / "duplicates.parquet").exists()
    return err


def test_the_guard_trips_the_same_way(paths, tmp_path):
    """At max_remove 0.3 the partitioned path refuses with the single task's message: the same
    counts and the same largest groups (members in pool order), computed here from the single
    task's table (the slow cluster test runs both paths into the guard)."""
    run, prop, single, _ = paths
    shutil.copytree(run, tmp_path / "run")
    err = guard_error(tmp_path / "run", prop, True, 0.3)
    dups = pq.read_table(single / "copydetect" / "duplicates.parquet").to_pydict()
    uids = rundir.unique_accepted(single)["uid"].to_pylist()
    pos = {u: i for i, u in enumerate(uids)}
    groups: dict[str, set[int]] = {}
    for u, rep in zip(dups["uid"], dups["duplicate_of"]):
        groups.setdefault(rep, {pos[rep]}).add(pos[u])
    big = sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))[:4]
    cal = cd.Calibration.from_dict(rundir.copydetect_output(single, "calibration"))
    largest = [[uids[i] for i in g[:8]] for g in big]
    want = MassRemovalError(
        "copy detection", len(dups["uid"]), len(uids), 0.3, "--max-remove-fraction", largest, cal.summary() + ". "
    )
    assert str(err) == str(want) and err.largest == want.largest  # the pictures the flow shows come from .largest


def test_pool_size_picks_the_path(paths):
    run = paths[0]
    assert copyscale.chooses(run, None, min_images=10) and not copyscale.chooses(run, None, min_images=10**6)
    assert copyscale.chooses(run, None, ("copy-model.pt", {}), min_images=10)  # cosine decisions partition too
    assert copyscale.chooses(run, True) and not copyscale.chooses(run, False, min_images=10)


def copy_model_paths(run: Path, prop: Path, root: Path, scale=SCALE) -> dict:
    """With --copy-model (a TorchScript descriptor embedded into RUN/copyvec by the real
    copy-embed stage): the single task and the partitioned path on copies of `run` give the
    same outputs; their stats, and the candidates of the same run without the model."""
    from lvd.curation.embed import EmbedConfig
    from lvd.curation.stages import copy as stages_copy
    from lvd.curation.stages import embed as stages_embed

    torch.manual_seed(0)
    model = root / "sscd_like.torchscript.pt"
    torch.jit.script(TinyDescriptor()).save(str(model))
    ecfg = EmbedConfig(resize=64, crop=64, batch_size=8, decode_threads=1)
    base = root / "model-run"
    shutil.copytree(run, base)
    stages_embed.run_embed(base, str(model), ecfg, stage="copyembed")
    copy_model = (str(model), dataclasses.asdict(ecfg))
    # a user threshold (reported as a calibrated one would be); room for the copy model's neighbours
    cfg = replace(CFG, threshold=COSINE, max_verify=16)
    single, parted, local = root / "model-single", root / "model-parted", root / "model-local"
    for d in (single, parted, local):
        shutil.copytree(base, d)
    stages_copy.run_copydetect(local, replace(cfg, threshold=None), proposers=[prop], partitioned=False)
    stages_copy.run_copydetect(single, cfg, proposers=[prop], copy_model=copy_model, partitioned=False)
    stages_copy.run_copydetect(parted, cfg, proposers=[prop], copy_model=copy_model, partitioned=True, scale=scale)
    stats = same_outputs(single, parted)
    dups = pq.read_table(parted / "copydetect" / "duplicates.parquet")
    return dict(stats, local_candidates=rundir.copydetect_output(local, "stats")["candidates"],
                methods=sorted(set(dups["method"].to_pylist())))  # fmt: skip


def check_copy_model_stats(stats: dict) -> None:
    assert stats["method"] == cd.METHOD_MODEL and cd.METHOD_MODEL in stats["methods"], stats
    assert stats["candidates"] > stats["decided_links"] > 0, stats
    assert stats["candidates"] > stats["local_candidates"], stats  # the model's neighbours were proposed
    assert stats["components_split"] >= 1 and stats["split_checks"] >= 1, stats  # the split decides by cosine too


def test_copy_model_decisions_partitioned_equal_the_single_task(paths, tmp_path):
    """The partitioned path proposes with a copy model's vectors, decides and splits by their
    cosine in its own tasks, and writes the single task's table, counts and calibration."""
    check_copy_model_stats(copy_model_paths(paths[0], paths[1], tmp_path))


def test_per_image_bound_is_bounded_candidates():
    """bound_rows over any split of the images into ranges gives bounded_candidates' pairs:
    random hash pairs with tied distances, kNN lists with holes and repeats, hash groups."""
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        m = int(rng.integers(0, 4 * n))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        a, b = np.minimum(a, b), np.maximum(a, b)
        ok = a != b
        key = np.unique(a[ok] * n + b[ok])
        ha, hb = key // n, key % n
        hd = rng.integers(0, 4, len(ha))  # ties: the pair order breaks them
        knn = [np.where(rng.random((n, 5)) < 0.2, -1, rng.integers(0, n, (n, 5))) for _ in range(3)]
        group = rng.integers(0, max(1, n // 2), n) if trial % 2 else None
        max_verify = int(rng.integers(1, 8))
        want = cd.bounded_candidates(n, (ha, hb, hd), knn, max_verify, group=group)
        lab = group
        hrows = pd.DataFrame(
            {"i": np.r_[ha, hb], "j": np.r_[hb, ha], "d": np.r_[hd, hd], "pa": np.r_[ha, ha], "pb": np.r_[hb, hb]}
        )
        krows = pd.DataFrame(
            [(i, int(ids[i, r]), r, li) for li, ids in enumerate(knn) for i in range(n) for r in range(ids.shape[1])],
            columns=["i", "j", "rank", "l"],
        )
        if group is not None:  # without groups nothing is skipped (not even an image itself)
            hrows = hrows[lab[hrows["i"]] != lab[hrows["j"]]]
            krows = krows[(krows["j"] < 0) | (lab[krows["i"]] != lab[krows["j"].clip(lower=0)])]
        cuts = np.sort(rng.integers(0, n, 3))
        got = set()
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n]):
            mine = [t[(t["i"] >= lo) & (t["i"] < hi)] for t in (hrows, krows)]
            pa_, pb_ = copyscale.bound_rows(*mine, max_verify)
            got |= set(zip(pa_.tolist(), pb_.tolist()))
        assert got == set(zip(want[0].tolist(), want[1].tolist())), trial


# ---------------------------------------------------------------- a 3-node cluster


@pytest.mark.slow
def test_partitioned_copy_detection_on_a_3_node_cluster(tmp_path):
    """The same equality with the tasks spread over three 1-CPU nodes (a subprocess: the
    session's Ray is this process's)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=1500
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT ") :])
    assert got["nodes"] >= 3 and got["stats"]["decided_links"] > 0


def _cluster_main(root: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        run, prop = make_run(root)
        sharded = replace(SCALE, knn=ShardConfig(sharded_above=0, n_shards=2))  # kNN on shard actors too
        stats = same_outputs(*both_paths(run, prop, scale=sharded))
        errors = []
        for partitioned in (False, True):
            fresh = root / f"guard-{partitioned}"
            shutil.copytree(run, fresh)
            err = guard_error(fresh, prop, partitioned, 0.3)
            errors.append((str(err), err.largest))
        assert errors[0] == errors[1], errors
        check_copy_model_stats(copy_model_paths(run, prop, root, scale=sharded))
        nodes = len({n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")})
        print("RESULT " + json.dumps({"nodes": nodes, "stats": stats}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    _cluster_main(Path(sys.argv[1]))
