"""lvd.tools.features: patch maps at any multiple of the patch (registers excluded), CLS equal to
the curation embed stage's vectors, the three weight formats alike at the native size."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lvd.curation.embed import EmbedConfig, Embedder
from lvd.tools.features import (
    FeatureConfig,
    extract_batch,
    full_pixels,
    load_model,
    patch_features,
    to_tensor,
)


def reference_tokens(model, x_1CHW: torch.Tensor) -> torch.Tensor:
    """All final-norm tokens [T, D] of one image, [CLS, registers, patches], run block by block."""
    with torch.no_grad():
        x = model.prepare_tokens(x_1CHW)
        for block in model.blocks:
            x = block(x)
        return model.norm(x)[0]


@pytest.mark.parametrize("size", [56, 98, 112])
def test_patch_map_shape_and_order_without_registers(tiny_backbone, photos, size):
    model, R = tiny_backbone.model, tiny_backbone.model.num_register_tokens
    assert R == 4
    img = dict(photos)["china"]  # 427 x 640 landscape
    cls_D, patches_hwD = patch_features(model, img, size)
    h, w = size // 14, round(640 * size / 427 / 14)
    assert cls_D.shape == (192,) and cls_D.dtype == np.float32
    assert patches_hwD.shape == (h, w, 192)
    # patch (i, j) is token 1 + R + i * w + j of the model's own sequence: registers are not in the map
    tokens = reference_tokens(model, to_tensor(full_pixels(img, size, 14))[None]).numpy()
    assert tokens.shape[0] == 1 + R + h * w
    np.testing.assert_allclose(cls_D, tokens[0], atol=1e-5)
    np.testing.assert_allclose(patches_hwD.reshape(h * w, -1), tokens[1 + R :], atol=1e-5)
    assert not np.allclose(patches_hwD[0, 0], tokens[1])  # the first register is not patch (0, 0)


def test_square_crop_and_portrait_grids(tiny_backbone, photos):
    model = tiny_backbone.model
    portrait = dict(photos)["coffee"].transpose(Image.Transpose.ROTATE_90)  # 400 wide, 600 high
    _, crop_hwD = patch_features(model, portrait, 112, crop=True)
    _, full_hwD = patch_features(model, portrait, 112)
    assert crop_hwD.shape == (8, 8, 192)
    assert full_hwD.shape == (round(600 * 112 / 400 / 14), 8, 192)  # 12 rows, 8 columns


def test_size_not_a_multiple_of_the_patch_is_refused(tiny_backbone, photos):
    with pytest.raises(ValueError, match="multiple of the backbone's patch size 14: use e.g. 112"):
        patch_features(tiny_backbone.model, photos[0][1], 120)
    with pytest.raises(ValueError, match="size <= resize"):
        FeatureConfig(size=224, resize=200)


def test_cls_equals_the_curation_embedder(tiny_backbone, photos):
    """The curation embed stage (tested against torchvision's transforms) is the reference:
    its float16 unit vectors are our CLS, normalised, at the same resize and crop."""
    images = [img for _, img in photos]
    ours = extract_batch(tiny_backbone.model, images, FeatureConfig(size=112, batch_size=3)).cls_BD
    blobs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        blobs.append(buf.getvalue())
    ref = Embedder(tiny_backbone.model, EmbedConfig(resize=128, crop=112, batch_size=4, decode_threads=1))
    want = ref.embed_images(blobs).astype(np.float32)
    ours_unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    np.testing.assert_allclose(ours_unit, want, atol=2e-3)


def test_every_weight_format_gives_the_same_features_at_the_native_size(tiny_backbone, photos):
    img = photos[0][1]
    want_cls, want_patches = patch_features(tiny_backbone.model, img, tiny_backbone.native)
    for spec in (tiny_backbone.lvd, tiny_backbone.official, tiny_backbone.hf):
        cls_D, patches_hwD = patch_features(load_model(spec, device="cpu"), img, tiny_backbone.native)
        np.testing.assert_allclose(cls_D, want_cls, atol=1e-4)
        np.testing.assert_allclose(patches_hwD, want_patches, atol=1e-4)


def test_missing_model_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass an HF Dinov2 folder, an official DINOv2"):
        load_model(tmp_path / "nope")
