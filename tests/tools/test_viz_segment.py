"""`lvd viz` and `lvd segment` on real photos with the tiny backbone of conftest.py.

References: attention maps against Hugging Face transformers' own attention weights, PCA against
scikit-learn's PCA, similarity and grid reduction against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lvd.cli.main import main
from lvd.tools.features import load_model
from lvd.tools.segment import mask_to_grid, prototype, segment, similarity_map
from lvd.tools.viz import foreground_pca_rgb, oriented_first_component, patch_maps


def _photo(photos, name: str) -> Image.Image:
    return dict(photos)[name]


def _panels(picture: Image.Image, width: int, height: int) -> list[np.ndarray]:
    a = np.asarray(picture)
    return [a[r : r + height, c : c + width] for r in range(0, a.shape[0], height) for c in range(0, a.shape[1], width)]


def test_lvd_viz_writes_a_nontrivial_picture(tiny_backbone, photos, tmp_path):
    _photo(photos, "astronaut").save(tmp_path / "astronaut.png")
    out = tmp_path / "pics" / "viz.png"
    assert (
        main(
            [
                "viz",
                "--model",
                str(tiny_backbone.lvd),
                "--image",
                str(tmp_path / "astronaut.png"),
                "--out",
                str(out),
                "--size",
                "112",
            ]
        )
        == 0
    )
    picture = Image.open(out)
    # astronaut is square: 112 x 112 panels, a top row of 4 and one row of the 3 heads (+ 1 blank)
    assert picture.size == (4 * 112, 2 * 112)
    panels = _panels(picture, 112, 112)
    for i in range(7):  # input, mean attention, foreground, PCA, three heads
        assert panels[i].std() > 5, f"panel {i} is (nearly) constant"
    assert panels[7].max() == 0  # the blank after the last head
    fg = panels[2][..., 0]
    assert set(np.unique(fg)) == {0, 255}  # foreground mask has both classes


def test_attention_matches_transformers(tiny_backbone, photos):
    """Per-head CLS attention (registers excluded) equals the attention weights HF computes,
    at a non-square size that is not the native one (position embeddings interpolated)."""
    import transformers  # a test dependency ([test] extra): the reference must run, not skip

    hf = transformers.AutoModel.from_pretrained(tiny_backbone.hf, attn_implementation="eager").eval()
    ours = load_model(tiny_backbone.hf, device="cpu")
    maps = patch_maps(ours, _photo(photos, "chelsea"), size=70)  # 451 x 300 -> 112 x 70
    assert maps.image.size == (112, 70) and maps.attention_Khw.shape == (3, 5, 8)
    x = torch.from_numpy(np.asarray(maps.image, np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        attn_BHTT = hf(pixel_values=x, output_attentions=True).attentions[-1]
    theirs_Khw = attn_BHTT[0, :, 0, 1 + 4 :].reshape(3, 5, 8).numpy()
    np.testing.assert_allclose(maps.attention_Khw, theirs_Khw, atol=1e-5)
    assert (maps.attention_Khw.sum((1, 2)) < 1).all()  # the CLS and register shares are left out


def test_pca_maps_match_sklearn(tiny_backbone, photos):
    from sklearn.decomposition import PCA

    _, patches_hwD = _features(tiny_backbone, _photo(photos, "coffee"), 112)
    h, w, D = patches_hwD.shape
    flat = patches_hwD.reshape(-1, D).astype(np.float64)
    first = oriented_first_component(torch.from_numpy(patches_hwD)).numpy().ravel()
    ref = PCA(1).fit_transform(flat)[:, 0]
    np.testing.assert_allclose(np.abs(first), np.abs(ref / ref.std(ddof=1)), rtol=1e-3, atol=1e-3)
    border = np.ones((h, w), bool)
    border[1:-1, 1:-1] = False
    assert first.reshape(h, w)[border].mean() <= first.reshape(h, w)[~border].mean()

    fg = torch.from_numpy(first.reshape(h, w) > 0)
    rgb = foreground_pca_rgb(torch.from_numpy(patches_hwD), fg).numpy()
    assert (rgb[~fg.numpy()] == 0).all()
    ref3 = PCA(3).fit_transform(flat[fg.numpy().ravel()])
    for k in range(3):  # each channel is its component min-max scaled, up to the sign
        scaled = (ref3[:, k] - ref3[:, k].min()) / np.ptp(ref3[:, k])
        got = rgb[fg.numpy()][:, k]
        assert min(np.abs(got - scaled).max(), np.abs(got - (1 - scaled)).max()) < 1e-3


def _features(tiny_backbone, image, size):
    from lvd.tools.features import patch_features

    return patch_features(tiny_backbone.model, image, size)


def _pasted(photos) -> tuple[Image.Image, np.ndarray]:
    """chelsea (a real photo) pasted onto a flat grey background, and its rectangle mask."""
    canvas = Image.new("RGB", (448, 336), (128, 128, 128))
    canvas.paste(_photo(photos, "chelsea").resize((224, 168), Image.Resampling.BICUBIC), (112, 84))
    mask = np.zeros((336, 448), bool)
    mask[84 : 84 + 168, 112 : 112 + 224] = True
    return canvas, mask


def test_lvd_segment_finds_a_pasted_photo_in_itself(tiny_backbone, photos, tmp_path):
    scene, mask = _pasted(photos)
    scene.save(tmp_path / "scene.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    out, mask_out = tmp_path / "seg.png", tmp_path / "segment-mask.png"
    assert (
        main(
            [
                "segment",
                "--model",
                str(tiny_backbone.official),
                "--reference",
                str(tmp_path / "scene.png"),
                "--mask",
                str(tmp_path / "mask.png"),
                "--target",
                str(tmp_path / "scene.png"),
                "--out",
                str(out),
                "--mask-out",
                str(mask_out),
                "--size",
                "168",
            ]
        )
        == 0
    )
    got = np.asarray(Image.open(mask_out)) > 0
    assert got.shape == mask.shape
    iou = (got & mask).sum() / (got | mask).sum()
    assert iou > 0.8, f"IoU {iou:.3f}"
    picture = np.asarray(Image.open(out))
    assert picture.shape[0] == 224 and picture.std() > 5


def test_segment_threshold_option(tiny_backbone, photos):
    scene, mask = _pasted(photos)
    auto = segment(tiny_backbone.model, scene, mask, scene, size=168)
    assert auto.reference_patches == 6 * 8  # at 168 the scene is 12 x 16 patches of 28 px, the photo 6 x 8
    everything = segment(tiny_backbone.model, scene, mask, scene, size=168, threshold=-1.0)
    assert everything.mask_HW.all() and everything.threshold == -1.0
    np.testing.assert_array_equal(everything.similarity_HW, auto.similarity_HW)
    assert auto.similarity_HW.max() <= 1 + 1e-5 and auto.similarity_HW.shape == (336, 448)


def test_mask_to_grid_keeps_patches_at_least_half_covered():
    mask = np.zeros((28, 42), bool)  # 2 x 3 patches of 14
    mask[:14, :7] = True  # patch (0, 0): exactly half
    mask[14:, 14:20] = True  # patch (1, 1): 6/14 of it
    mask[:, 28:] = True  # column 2: full
    np.testing.assert_array_equal(mask_to_grid(mask, 2, 3), [[True, False, True], [False, False, True]])


def test_similarity_is_cosine_to_the_mean_of_unit_features():
    patches = np.array([[[3.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-2.0, 0.0]]], np.float32)  # 2 x 2 x 2
    proto = prototype(patches, np.array([[True, True], [False, False]]))
    np.testing.assert_allclose(proto, [2**-0.5, 2**-0.5], rtol=1e-6)  # mean of (1,0), (0,1)
    sim = similarity_map(patches, proto, (2, 2))  # same size: no resampling
    np.testing.assert_allclose(sim, [[2**-0.5, 2**-0.5], [1.0, -(2**-0.5)]], rtol=1e-5)


def test_segment_rejects_bad_masks(tiny_backbone, photos):
    scene, mask = _pasted(photos)
    with pytest.raises(ValueError, match="reference's size"):
        segment(tiny_backbone.model, scene, mask[:100], scene, size=112)
    with pytest.raises(ValueError, match="covers no patch"):
        segment(tiny_backbone.model, scene, np.zeros_like(mask), scene, size=112)
