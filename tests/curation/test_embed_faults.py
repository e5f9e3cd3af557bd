"""A killed embedding actor or a removed Ray node does not change the embeddings.

The embed stage keeps one model per Ray actor (`actor_runner`); here the actor process dies
(`os._exit`, a real death, not an exception) while embedding one partition. Ray restarts the
actor (`max_restarts`) and resubmits the unit (`max_task_retries`); the vectors written must be
byte-identical to an undisturbed run, and every partition must carry its done-marker.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from _node_removal import run_with_node_removal
from ray import cloudpickle

from lvd.curation import actor_runner, copies, runner
from lvd.curation.embed import EmbedConfig, Embedder
from lvd.curation.ingest import IngestConfig
from lvd.curation.stages import ingest_dedup as stages
from lvd.curation.stages.embed import EmbedFn, MakeEmbedder, embed_units, run_embed

cloudpickle.register_pickle_by_value(sys.modules[__name__])

EMBED = EmbedConfig(resize=128, crop=112, batch_size=4, decode_threads=1)


@dataclass(frozen=True)
class DieOnce:
    """EmbedFn that kills its actor process the first time it meets partition `victim`."""

    inner: EmbedFn
    victim: int
    flag: str

    def __call__(self, embedder: Embedder, unit) -> dict[str, pa.Table]:
        if unit.index == self.victim and os.path.exists(self.flag):
            os.unlink(self.flag)
            os._exit(1)
        return self.inner(embedder, unit)


@pytest.fixture(scope="module")
def ingested(ray_local, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name, img in copies.real_photos()[:6]:
        (root / f"{name}.jpg").write_bytes(copies.encode_original(img))
    run = tmp_path_factory.mktemp("run")
    stages.run_ingest(stages.plan([str(root)], 2), run, IngestConfig())
    return run


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    from lvd.pretrain.models.hf import export_hf
    from lvd.pretrain.models.vit import vit_tiny

    torch.manual_seed(0)
    return str(export_hf(vit_tiny(img_size=112, depth=2), tmp_path_factory.mktemp("w") / "hf"))


@pytest.fixture(scope="module")
def reference(ingested, backbone, tmp_path_factory) -> Path:
    """The undisturbed embed stage's vectors, computed once for both fault tests."""
    run = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(ingested, run)
    run_embed(run, backbone, EMBED)
    return run / "vectors"


def assert_same_vectors(reference: Path, run: Path) -> None:
    """Every vector file of `reference` exists under RUN/vectors with identical bytes."""
    names = sorted(p.name for p in reference.iterdir())
    assert names and names == sorted(p.name for p in (run / "vectors").iterdir())
    for name in names:
        assert (reference / name).read_bytes() == (run / "vectors" / name).read_bytes(), name


def test_killed_embedding_actor_gives_identical_vectors(ingested, backbone, reference, tmp_path):
    disturbed = tmp_path / "disturbed"
    shutil.copytree(ingested, disturbed)
    flag = tmp_path / "die"
    flag.touch()
    units = embed_units(disturbed)
    assert len(units) == 3
    fn = DieOnce(EmbedFn(str(disturbed / "vectors")), victim=1, flag=str(flag))
    report = actor_runner.map_with_actors(
        MakeEmbedder(backbone, EMBED),
        fn,
        units,
        disturbed / "embed",
        cfg_hash="h",
        acfg=actor_runner.ActorConfig(n_actors=1, max_restarts=2),
    )
    assert not flag.exists(), "the actor never reached the victim partition"
    assert report.ran == [0, 1, 2]
    for u in units:
        assert runner.is_done(disturbed / "embed", u, "h")
    assert_same_vectors(reference, disturbed)


NODE_REMOVAL_WORK = """
import sys
from pathlib import Path
from lvd.curation.embed import EmbedConfig
from lvd.curation.stages.embed import run_embed

def work(progress):
    run, backbone = Path(sys.argv[1]), sys.argv[2]
    cfg = EmbedConfig(resize=128, crop=112, batch_size=4, decode_threads=1)
    return {"ran": run_embed(run, backbone, cfg, progress=progress).ran}
"""


def test_node_removed_mid_embed_gives_identical_vectors(ingested, backbone, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ingested, run)
    result = run_with_node_removal(NODE_REMOVAL_WORK, str(run), backbone, timeout=400)
    done_at_removal, total = result["removed_at"]
    assert done_at_removal < total == 3  # removed mid-stage
    assert result["ran"] == [0, 1, 2]
    assert_same_vectors(reference, run)
