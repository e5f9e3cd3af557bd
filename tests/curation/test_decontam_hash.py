"""Decontamination's hash decision (`stages.decontam.hash_matches`): an (eval image, pool image)
pair the hash dedup's own rules link is a copy without local features. Soft low-texture images
(LFW faces upscaled to 120 px, as on an untuned dump) get fewer ORB inliers than a calibrated
threshold even against their own byte-identical copy; their hashes still match.

Records come from the real ingest (`ingest_item`); no Ray. The end-to-end case (both paths of
the stage, byte-equal, the face family removed) is in tests/curation/test_decontam_scale.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from _images import face_copies, lfw, png

from lvd.curation.dedup import DedupConfig, find_near_duplicates
from lvd.curation.ingest import INGEST_SCHEMA, IngestConfig, ingest_item
from lvd.curation.sources import RawItem
from lvd.curation.stages import decontam

# LFW rows 100-199 are non-face patches: at 120 px their identical copies get 0-13 ORB inliers
# (threshold on the untuned dump: 25); rows 0-99, faces, get ~200
EVAL_FACES = (100, 124, 166)  # eval images (106: its brightened copy is no hash dedup link)
LOOKALIKES = [*range(10, 40), *range(101, 160, 2)]  # other rows: faces and patches of one size and look


def records(items: list[tuple[str, bytes]]) -> pa.Table:
    rows = []
    for name, data in items:
        rec, _ = ingest_item(RawItem(name, data, None), IngestConfig())
        assert rec["status"] == "accepted", (name, rec["reason"])
        rows.append(rec)
    return pa.Table.from_pylist(rows, schema=INGEST_SCHEMA)


@pytest.fixture(scope="module")
def faces():
    ev = records([(f"eval{i}", png(lfw(i))) for i in EVAL_FACES])
    items = [(f"look{i}", png(lfw(i))) for i in LOOKALIKES]
    for i in EVAL_FACES:
        items += [(f"copy{i}:{kind}", data) for kind, data in face_copies(lfw(i)).items()]
    pool = records(items)
    return ev, pool, [r.split(":")[0] for r in pool["source"].to_pylist()]


def test_soft_face_copies_linked_and_lookalike_faces_not(faces):
    ev, pool, name = faces
    q, p = decontam.hash_matches(ev, pool, DedupConfig())
    got = sorted((EVAL_FACES[a], name[b], pool["source"][b].as_py().split(":")[1]) for a, b in zip(q, p))
    want = sorted((i, f"copy{i}", kind) for i in EVAL_FACES for kind in ("same", "q20", "bright"))
    assert got == want
    # the identical file is one uid: eval and pool share it
    same = [b for a, b in zip(q, p) if pool["source"][b].as_py().endswith(":same")]
    assert {pool["uid"][b].as_py() for b in same} <= set(ev["uid"].to_pylist())


def test_the_pairs_are_those_dedup_links_in_one_pool(faces):
    """The hash dedup's relation: on the union of both tables `find_near_duplicates` puts every
    found pair in one group, and (here, where its groups are an image and its copies) every
    (eval, pool) pair of one group is found."""
    ev, pool, _ = faces
    q, p = decontam.hash_matches(ev, pool, DedupConfig())
    both = pa.concat_tables(
        [ev, pool.filter(pa.array([u not in set(ev["uid"].to_pylist()) for u in pool["uid"].to_pylist()]))]
    )
    dups = find_near_duplicates(both, DedupConfig())
    rep = dict(zip(dups["uid"].to_pylist(), dups["duplicate_of"].to_pylist()))
    group = lambda u: rep.get(u, u)  # noqa: E731
    for a, b in zip(q, p):
        assert group(ev["uid"][a].as_py()) == group(pool["uid"][b].as_py())
    linked = {(a, b) for a, b in zip(q.tolist(), p.tolist())}
    for a, eu in enumerate(ev["uid"].to_pylist()):
        for b, pu in enumerate(pool["uid"].to_pylist()):
            if group(eu) == group(pu):
                assert (a, b) in linked, (eu, pool["source"][b].as_py())


def test_search_is_exact_against_all_pairs(faces):
    """The pigeonhole search (`_code_pairs`) finds every pair within each channel's radius: the
    same pairs as comparing every eval code with every pool code (done here, on a small pool)."""
    ev, pool, _ = faces
    for code in decontam.dedup.candidate_codes(DedupConfig()):
        c = decontam.Code(code.column, code.radius, code.channel, code.variants)
        q, p = decontam._code_pairs(ev, pool, c)
        ve, vp = decontam.code_versions(ev, c), decontam.code_versions(pool, c)
        d_ev = np.bitwise_count(ve[:, None, :, None, :] ^ vp[None, :, None, :, :]).sum(-1)  # [e, n, ke, kp]
        near = (d_ev[:, :, 0, :] <= code.radius).any(-1) | (d_ev[:, :, :, 0] <= code.radius).any(-1)
        want = np.argwhere(near)
        assert np.array_equal(np.stack([q, p], 1), want), code


def test_empty_sides():
    ev = records([("e", png(lfw(0)))])
    for a, b in ((ev, ev.slice(0, 0)), (ev.slice(0, 0), ev)):
        q, p = decontam.hash_matches(a, b, DedupConfig())
        assert len(q) == len(p) == 0
