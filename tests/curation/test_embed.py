"""Embedder: one set of weights in all three formats gives the same vectors on real photos;
preprocessing equals torchvision's Resize + CenterCrop + Normalize; errors name the image."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from lvd.curation.embed import EmbedConfig, EmbedDecodeError, Embedder

CROP, RESIZE = 112, 128  # the backbone's native size: no position-embedding interpolation
CFG = EmbedConfig(resize=RESIZE, crop=CROP, batch_size=3, decode_threads=2)


def random_backbone():
    """The `tiny` recipe's ViT-Ti/14 (4 registers) at 112 px, random weights with LayerScale
    raised to 0.3 so that every block (not just the patch embedding) shapes the output."""
    from lvd.pretrain.recipes import tiny

    recipe = tiny()
    recipe = replace(recipe, crops=replace(recipe.crops, global_size=CROP))
    torch.manual_seed(0)
    model = recipe.backbone.build(img_size=CROP).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.3)
    return recipe, model


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The same weights as an lvd checkpoint (run folder), an official .pth and an HF folder."""
    from lvd.pretrain.checkpoint import CheckpointMeta, save_checkpoint
    from lvd.pretrain.models.hf import export_hf

    root = tmp_path_factory.mktemp("weights")
    recipe, model = random_backbone()
    sd = model.state_dict()
    meta = CheckpointMeta(step=1, data_batches=0, world_size=1, recipe=recipe.to_dict())
    save_checkpoint(root / "run", {"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, meta, keep=1)
    torch.save(sd, root / "dinov2_vitt14_reg4_pretrain.pth")
    export_hf(model, root / "hf")
    return model, {"lvd": root / "run", "official": root / "dinov2_vitt14_reg4_pretrain.pth", "hf": root / "hf"}


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, np.ndarray]]:
    from skimage import data

    return [
        ("astronaut", data.astronaut()),
        ("coffee", data.coffee()),
        ("chelsea", data.chelsea()),
        ("rocket", data.rocket()),
        ("camera", data.camera()),
    ]  # camera: grayscale


def reference(model, arrays) -> np.ndarray:
    """torchvision's DINOv2 eval transform and a plain forward, float32, normalised."""
    import torchvision.transforms as T

    tf = T.Compose(
        [
            T.Resize(RESIZE, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(CROP),
            T.ToTensor(),
            T.Normalize(CFG.mean, CFG.std),
        ]
    )
    x = torch.stack([tf(Image.fromarray(a).convert("RGB")) for a in arrays])
    with torch.no_grad():
        cls = model(x).cls_BD
    return torch.nn.functional.normalize(cls, dim=-1).numpy()


def test_matches_torchvision_reference_on_png(weights, photos):
    model, _ = weights
    emb = Embedder(model, CFG)
    vecs = emb.embed_images([encode(a, "PNG") for _, a in photos])
    assert vecs.dtype == np.float16 and vecs.shape == (len(photos), 192)
    np.testing.assert_allclose(np.linalg.norm(vecs.astype(np.float32), axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(vecs.astype(np.float32), reference(model, [a for _, a in photos]), atol=1e-3)
    # distinct photos are not all the same vector (the model is not degenerate)
    sims = vecs.astype(np.float32) @ vecs.astype(np.float32).T
    assert sims[~np.eye(len(photos), dtype=bool)].min() < 0.99


def test_three_weight_formats_give_the_same_vectors(weights, photos):
    _, specs = weights
    blobs = [encode(a, "JPEG", quality=90) for _, a in photos]
    vecs = {kind: Embedder(spec, CFG).embed_images(blobs).astype(np.float32) for kind, spec in specs.items()}
    np.testing.assert_allclose(vecs["official"], vecs["lvd"], atol=1e-3)
    np.testing.assert_allclose(vecs["hf"], vecs["lvd"], atol=1e-3)


def test_embed_blobs_keeps_uids_and_names_an_undecodable_one(weights, photos):
    model, _ = weights
    emb = Embedder(model, replace(CFG, decode_threads=1))
    blobs = [encode(a, "PNG") for _, a in photos[:3]]
    table = pa.table({"uid": ["u2", "u0", "u1"], "data": pa.array(blobs, pa.binary())})
    uids, vecs = emb.embed_blobs(table)
    assert uids.tolist() == ["u2", "u0", "u1"]
    np.testing.assert_array_equal(vecs, emb.embed_images(blobs))
    # the bad blob sits in the second batch (decoded ahead on the prefetch thread)
    datas = blobs + [blobs[0], blobs[1][:200]]
    broken = pa.table({"uid": ["a", "b", "c", "d", "bad"], "data": pa.array(datas, pa.binary())})
    with pytest.raises(EmbedDecodeError, match="cannot decode image bad"):
        emb.embed_blobs(broken)
    assert emb.embed_images([]).shape == (0, 192)
    with pytest.raises(ValueError, match=r"\['data'\]"):
        emb.embed_blobs(table.select(["uid"]))


def test_embed_part_writes_a_vector_store_part(weights, photos, tmp_path):
    import pyarrow.parquet as pq

    from lvd.curation.embed import embed_part
    from lvd.curation.vectors import open_vectors

    model, _ = weights
    emb = Embedder(model, CFG)
    blobs = [encode(a, "JPEG", quality=90) for _, a in photos]
    uids = [f"uid{i}" for i in range(len(blobs))]
    pq.write_table(
        pa.table({"uid": uids, "data": pa.array(blobs, pa.binary())}),
        tmp_path / "part-000007.blobs.parquet",
        row_group_size=2,
    )
    n = embed_part(emb, tmp_path / "part-000007.blobs.parquet", tmp_path / "vectors", 7, read_rows=2)
    store = open_vectors(tmp_path / "vectors")
    assert n == len(blobs) and store.part_indices == [7] and store.uids.tolist() == uids
    np.testing.assert_array_equal(store.load().vecs_ND, emb.embed_images(blobs))


def test_exif_orientation_and_modes_are_handled(weights, photos):
    model, _ = weights
    emb = Embedder(model, CFG)
    astro = photos[0][1]
    upright = encode(astro, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": store it turned anticlockwise
    buf = io.BytesIO()
    Image.fromarray(astro).transpose(Image.Transpose.ROTATE_90).save(buf, "PNG", exif=exif)
    rgba = np.dstack([astro, np.full(astro.shape[:2], 255, np.uint8)])
    vecs = emb.embed_images([upright, buf.getvalue(), encode(rgba, "PNG")]).astype(np.float32)
    np.testing.assert_allclose(vecs[1], vecs[0], atol=1e-3)  # EXIF applied
    np.testing.assert_allclose(vecs[2], vecs[0], atol=1e-3)  # opaque alpha changes nothing


def test_config_checks():
    _, model = random_backbone()
    with pytest.raises(ValueError, match="multiple of the backbone's patch size 14"):
        Embedder(model, EmbedConfig(resize=128, crop=120))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            Embedder(model, EmbedConfig(device="cuda"))
    with pytest.raises(ValueError, match="crop <= resize"):
        EmbedConfig(resize=200, crop=224)
    with pytest.raises(ValueError, match="dtype"):
        EmbedConfig(dtype="int8")
