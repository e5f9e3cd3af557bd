"""`lvd probe dense` on scikit-image's Middlebury motorcycle pair (left image + disparity).

The left image is cut into 10 full-height strips; even strips train, odd strips are held out
(no pixel in both). Disparity is inf where unknown (7% of pixels); those are ignored. The
baseline is the constant "mean of the training pixels", computed here by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lvd.cli.main import main
from lvd.tools.probe import (
    DenseProbeConfig,
    delta1,
    evaluate_dense_probe,
    patch_targets,
    read_dense_folder,
    read_target,
    rmse,
    train_dense_probe,
)

STRIPS = 10


@pytest.fixture(scope="module")
def motorcycle_strips(tmp_path_factory):
    """(root, train disparities, val disparities) of the strip folders."""
    import skimage.data

    left, _, disparity = skimage.data.stereo_motorcycle()
    root = tmp_path_factory.mktemp("motorcycle")
    width = left.shape[1] // STRIPS
    kept = {"train": [], "val": []}
    for j in range(STRIPS):
        split = "train" if j % 2 == 0 else "val"
        cols = slice(j * width, (j + 1) * width)
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "targets").mkdir(parents=True, exist_ok=True)
        Image.fromarray(left[:, cols]).save(root / split / "images" / f"strip{j:02d}.png")
        np.save(root / split / "targets" / f"strip{j:02d}.npy", disparity[:, cols])
        kept[split].append(disparity[:, cols])
    return root, kept["train"], kept["val"]


def test_lvd_probe_dense_beats_the_mean_on_held_out_strips(tiny_backbone, motorcycle_strips, tmp_path, capsys):
    root, train_maps, val_maps = motorcycle_strips
    out = tmp_path / "metrics.json"
    assert (
        main(
            [
                "probe",
                "dense",
                "--model",
                str(tiny_backbone.lvd),
                "--train",
                str(root / "train"),
                "--val",
                str(root / "val"),
                "--target",
                "disparity",
                "--size",
                "168",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    train_px = np.concatenate([m[np.isfinite(m)] for m in train_maps]).astype(np.float64)
    val_px = np.concatenate([m[np.isfinite(m)] for m in val_maps]).astype(np.float64)
    assert metrics["pixels"] == len(val_px)
    assert metrics["mean_rmse"] == pytest.approx(np.sqrt(np.mean((val_px - train_px.mean()) ** 2)), rel=1e-5)
    assert metrics["delta1"] is None  # disparity: RMSE only
    assert "mean predictor" in capsys.readouterr().out
    with capsys.disabled():
        print(f"\ndisparity RMSE: probe {metrics['rmse']:.2f}, mean predictor {metrics['mean_rmse']:.2f}")
    assert metrics["rmse"] < 0.9 * metrics["mean_rmse"]


def test_mlp_head_depth_metrics(tiny_backbone, motorcycle_strips):
    """The MLP head, and depth-style reporting (delta1) on the same maps."""
    root, _, _ = motorcycle_strips
    cfg = DenseProbeConfig(target="depth", head="mlp", hidden=64, size=112, steps=200)
    train, val = read_dense_folder(root / "train"), read_dense_folder(root / "val")
    probe = train_dense_probe(tiny_backbone.model, train, cfg)
    metrics = evaluate_dense_probe(tiny_backbone.model, probe, val, cfg)
    print(
        f"MLP: RMSE {metrics.rmse:.2f} vs {metrics.mean_rmse:.2f}, d1 {metrics.delta1:.3f} vs {metrics.mean_delta1:.3f}"
    )
    assert metrics.rmse < metrics.mean_rmse
    assert 0 <= metrics.mean_delta1 <= 1 and 0 <= metrics.delta1 <= 1


def test_rmse_and_delta1_by_hand():
    truth = np.array([1.0, 2.0, 4.0, 10.0])
    pred = np.array([1.2, 2.6, 3.0, -1.0])
    assert rmse(pred, truth) == pytest.approx(np.sqrt((0.04 + 0.36 + 1.0 + 121.0) / 4))
    # ratios 1.2 (in), 1.3 (out), 4/3 (out), negative prediction (out)
    assert delta1(pred, truth) == pytest.approx(0.25)


def test_patch_targets_average_valid_pixels():
    target = np.array(
        [[1, 3, 5, 5], [np.nan, 2, 5, 5], [np.nan, np.nan, 7, np.nan], [np.nan, 4, np.nan, np.nan]], np.float32
    )
    got = patch_targets(target, 2, 2, min_valid=0.5)
    np.testing.assert_allclose(got[0], [2.0, 5.0])  # (1 + 3 + 2) / 3, all four valid
    assert np.isnan(got[1, 0])  # 1 of 4 valid < 0.5
    assert np.isnan(got[1, 1])  # 1 of 4 valid
    np.testing.assert_allclose(patch_targets(target, 2, 2, min_valid=0.25)[1], [4.0, 7.0])


def test_read_target_formats(tmp_path):
    png = np.array([[0, 256], [512, 65535]], np.uint16)
    Image.fromarray(png).save(tmp_path / "d.png")
    got = read_target(tmp_path / "d.png", png_scale=256.0)
    assert np.isnan(got[0, 0])  # 0 = no measurement
    np.testing.assert_allclose(got.ravel()[1:], [1.0, 2.0, 65535 / 256])
    np.save(tmp_path / "d.npy", np.array([[np.inf, -1.0], [0.5, np.nan]]))
    got = read_target(tmp_path / "d.npy", png_scale=1.0)
    assert np.isnan(got[0, 0]) and np.isnan(got[0, 1]) and np.isnan(got[1, 1]) and got[1, 0] == 0.5


def test_folder_and_config_errors(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no image"):
        read_dense_folder(tmp_path)
    Image.new("RGB", (28, 28)).save(tmp_path / "images" / "a.png")
    with pytest.raises(FileNotFoundError, match="targets/a.npy"):
        read_dense_folder(tmp_path)
    with pytest.raises(ValueError, match="target="):
        DenseProbeConfig(target="normals")
    with pytest.raises(ValueError, match="head="):
        DenseProbeConfig(head="dpt")
