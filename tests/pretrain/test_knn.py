"""k-NN: a hand-computed example, sklearn as reference, and the labelled-folder round trip."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lvd.pretrain.knn import knn_predict, knn_top1, list_labelled_folder


def test_hand_computed_weighted_vote():
    # Training points on the unit circle; query at angle 0.
    angles = torch.tensor([0.1, 0.2, 1.5, 3.0])
    train = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(train, labels, query, num_classes=2, k=3, temperature=0.5)
    # top 3 by cosine: angles 0.1 (class 0), 0.2 (class 1), 1.5 (class 1)
    w = [math.exp(math.cos(a) / 0.5) for a in (0.1, 0.2, 1.5)]
    assert scores[0, 0].item() == pytest.approx(w[0], rel=1e-5)
    assert scores[0, 1].item() == pytest.approx(w[1] + w[2], rel=1e-5)
    assert scores.argmax(1).item() == 1  # two weaker votes beat the single closest one


def test_matches_sklearn_weighted_knn():
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g)
    ytr = torch.randint(0, 5, (400,), generator=g)
    yva = torch.randint(0, 5, (150,), generator=g)
    xtr = centers[ytr] + 1.2 * torch.randn(400, 16, generator=g)
    xva = centers[yva] + 1.2 * torch.randn(150, 16, generator=g)
    k, t = 20, 0.07
    ours = knn_top1(xtr, ytr, xva, yva, k=k, temperature=t)

    ntr, nva = F.normalize(xtr, dim=1).double().numpy(), F.normalize(xva, dim=1).double().numpy()
    # cosine distance d = 1 - sim, so exp(sim / T) = exp((1 - d) / T)
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights=lambda d: np.exp((1 - d) / t)).fit(
        ntr, ytr.numpy()
    )
    expected = float((ref.predict(nva) == yva.numpy()).mean())
    assert ours == pytest.approx(expected)
    assert 0.3 < ours < 1.0  # a real signal, not a degenerate answer


def test_labelled_folder(tmp_path):
    from lvd.datasets import write_labelled_folder

    images = np.random.default_rng(0).integers(0, 255, (6, 28, 28), dtype=np.uint8)
    write_labelled_folder(images, np.array([0, 1, 0, 2, 1, 0]), tmp_path / "f", size=32)
    folder = list_labelled_folder(tmp_path / "f")
    # labels 0/1/2 are t-shirt (3 images), trouser (2), pullover (1); classes sort by name
    assert folder.classes == ["pullover", "t-shirt", "trouser"]
    assert folder.labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert [p.parent.name for p in folder.paths] == ["pullover"] + ["t-shirt"] * 3 + ["trouser"] * 2
    with pytest.raises(ValueError, match="no images"):
        list_labelled_folder(tmp_path / "missing")
