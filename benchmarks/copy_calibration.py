"""How far the copy detector's calibration and its inlier floor can be trusted on a dump.

Three measurements, each from the real verification (`localfeat.verify`), no Ray:
1. **the calibrated threshold over calibration seeds**: `copydetect.calibration_sample` draws
   64 of the pool's images by seed; their disjoint parts are the distinct pairs. A threshold
   that moves with the seed rests on a few pairs. The pool is approximated by the dump's
   originals and its copies of kinds the hash dedup does not link (crops, flips, overlays),
   which is what `unique_accepted` holds after hash dedup;
2. **the look-alike tail**: the highest verified scores among *all* pairs of distinct
   originals (ground truth), with inliers counted in source pixels (`Features.up`, as the
   detector does) and in feature pixels (up = 1): what a threshold must stay above so that
   no two distinct originals link;
3. **copies below a threshold**: per copy kind, how many copies score below each candidate
   floor against their original (link level: hash groups and chain splitting not applied).

The dump: `copies.write_bench_dump` (`--seed`), or `--real` (`copy_quality.real_dump`:
Fashion-MNIST train products and LFW faces at 96 px, the untuned check).

Run: .venv/bin/python benchmarks/copy_calibration.py [--seed 0 | --real] [--seeds 12]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from lvd.curation import copies
from lvd.curation import copydetect as cd
from lvd.curation.localfeat import Features, features_row, local_features, verify

NOT_HASHED = ("crop40", "crop8", "flipped", "overlay", "combined", "cropped")  # kinds hash dedup leaves
FLOORS = (12, 15, 18, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="bench dump seed")
    parser.add_argument("--real", action="store_true", help="the untuned real check's dump instead")
    parser.add_argument("--seeds", type=int, default=12, help="calibration seeds tried")
    parser.add_argument("--dump", default=None, help="an existing bench dump (truth.json) instead of building one")
    args = parser.parse_args()
    root = Path(args.dump) if args.dump else Path(tempfile.mkdtemp(prefix="lvd-copycal-")) / "dump"
    if args.real:
        sys.path.insert(0, str(Path(__file__).parent))
        from copy_quality import real_dump

        truth = real_dump(root)
    else:
        truth = copies.BenchTruth.load(root) if args.dump else copies.write_bench_dump(root, seed=args.seed)
    orig = {n: o["file"] for n, o in truth.originals.items()}
    cps = [
        (rel, orig[f["original"]], f["kind"])
        for rel, f in truth.files.items()
        if f["kind"] not in ("original", "broken")
    ]
    cfg = cd.CopyDetectConfig()
    vc = cfg.verify
    print(f"dump: {root} ({len(orig)} originals, {len(cps)} copies)")

    # 1. the calibrated threshold over calibration seeds
    t = time.perf_counter()
    pool = sorted(orig.values()) + sorted(rel for rel, _, kind in cps if kind in NOT_HASHED)
    parts: dict[str, list[int]] = {}

    def part_scores(rel: str) -> list[int]:
        if rel not in parts:
            _, distinct = cd.calibration_pairs([(root / rel).read_bytes()], seed=0, copies_of=0)
            parts[rel] = [verify(local_features(x), local_features(y), vc).score(vc) for x, y in distinct]
        return parts[rel]

    thresholds = []
    for seed in range(args.seeds):
        rows = cd.calibration_sample(pool, cfg.calib_images, seed)
        scores = [s for r in rows for s in part_scores(pool[r])]
        thresholds.append(int(cd.choose_threshold(cd.METHOD_LOCAL, {}, scores, cfg.false_link_rate)))
    print(
        f"1. calibrated threshold over {args.seeds} calibration seeds ({len(pool)} pool images, "
        f"{cfg.calib_images} sampled, false-link rate {cfg.false_link_rate}): {thresholds} "
        f"({time.perf_counter() - t:.0f}s)"
    )

    # 2. the look-alike tail: all pairs of distinct originals
    t = time.perf_counter()
    feats = {rel: Features.from_row(features_row(rel, (root / rel).read_bytes())) for rel in orig.values()}
    names = sorted(orig.values())
    flat = {rel: replace(f, up=1.0) for rel, f in feats.items()}
    pairs = list(itertools.combinations(names, 2))
    source = np.array([verify(feats[a], feats[b], vc).score(vc) for a, b in pairs])
    feature = np.array([verify(flat[a], flat[b], vc).score(vc) for a, b in pairs])
    print(
        f"2. look-alike tail, {len(pairs)} pairs of distinct originals ({time.perf_counter() - t:.0f}s):\n"
        f"   highest scores, source-pixel places (as the detector counts): {sorted(source.tolist())[::-1][:8]}\n"
        f"   highest scores, feature-pixel places:                          {sorted(feature.tolist())[::-1][:8]}\n"
        f"   pairs at or above {FLOORS}: source {[int(np.sum(source >= f)) for f in FLOORS]}, "
        f"feature {[int(np.sum(feature >= f)) for f in FLOORS]}"
    )

    # 3. copies below each floor, per kind (link level)
    below: dict[str, list[int]] = {}
    for rel, o, kind in cps:
        fc = Features.from_row(features_row(rel, (root / rel).read_bytes()))
        below.setdefault(kind, []).append(verify(fc, feats[o], vc).score(vc))
    print(f"3. copies scoring below {FLOORS} against their original (link level):")
    for kind, scores in sorted(below.items()):
        s = np.array(scores)
        print(f"   {kind:13s} n={len(s):4d}  {[int(np.sum(s < f)) for f in FLOORS]}")


if __name__ == "__main__":
    main()
