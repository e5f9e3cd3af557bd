"""Heads and losses against hand-computed values and float64 reference algorithms."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lvd.pretrain.losses import DINOHead, DINOLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp


def official_sinkhorn_float64(logits_BK: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """The official direct-exp algorithm, single process, in float64 (exp(250) is finite there)."""
    q_KB = torch.exp(logits_BK.double() / temp).T
    n_protos, n_rows = q_KB.shape
    q_KB = q_KB / q_KB.sum()
    for _ in range(n_iterations):
        q_KB = q_KB / q_KB.sum(dim=1, keepdim=True) / n_protos
        q_KB = q_KB / q_KB.sum(dim=0, keepdim=True) / n_rows
    return (q_KB * n_rows).T


# ---------------------------------------------------------------- DINO loss
def test_dino_loss_uniform_teacher_and_student_is_log_k():
    K, B = 7, 5
    loss = DINOLoss(K)(torch.zeros(2, B, K), torch.zeros(8, B, K), torch.full((2, B, K), 1.0 / K))
    assert loss.item() == pytest.approx(math.log(K), rel=1e-6)


def test_dino_loss_hand_example_skips_same_crop_pairs():
    # student temp 0.1: logits 0.1*log(p) give softmax p
    student = torch.tensor([[[0.0, 0.0]], [[0.1 * math.log(3.0), 0.0]]])  # crop0 p=(.5,.5), crop1 p=(.75,.25)
    teacher = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    loss = DINOLoss(2)(student, None, teacher)
    # pairs: (s0, t1) = ln 2, (s1, t0) = -ln 0.75; same-crop pairs are excluded
    assert loss.item() == pytest.approx((math.log(2) - math.log(0.75)) / 2, rel=1e-6)


def test_dino_loss_matches_pairwise_loop():
    torch.manual_seed(0)
    G, L, B, K = 3, 4, 6, 11
    s_g, s_l = torch.randn(G, B, K), torch.randn(L, B, K)
    t = torch.softmax(torch.randn(G, B, K), dim=-1)
    terms = []
    for si, s in enumerate(list(s_g) + list(s_l)):
        for ti in range(G):
            if si < G and si == ti:
                continue
            terms.append(-(t[ti] * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean())
    expected = torch.stack(terms).mean()
    assert DINOLoss(K)(s_g, s_l, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_center_is_ema_of_mean_teacher_logits_and_centres_softmax():
    loss = DINOLoss(3, center_momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    loss.update_center(logits)
    assert torch.allclose(loss.center, torch.tensor([[0.2, 0.2, 0.2]]))
    probs = loss.softmax_center_teacher(torch.tensor([[0.2, 0.2, 1.2]]), teacher_temp=1.0)
    e = math.e
    assert torch.allclose(probs, torch.tensor([[1 / (2 + e), 1 / (2 + e), e / (2 + e)]]), atol=1e-6)
    assert "center" in loss.state_dict()


# ---------------------------------------------------------------- Sinkhorn-Knopp
@pytest.mark.parametrize("log_space", [False, True])
def test_sinkhorn_matches_official_algorithm_and_marginals(log_space):
    torch.manual_seed(0)
    logits = torch.randn(32, 16) * 0.1
    q = sinkhorn_knopp(logits, temp=0.05, n_iterations=3, log_space=log_space)
    assert torch.allclose(q.double(), official_sinkhorn_float64(logits, 0.05, 3), atol=1e-5)
    assert torch.allclose(q.sum(dim=1), torch.ones(32), atol=1e-5)  # each sample: a distribution
    # prototypes: approximately B/K after 3 iterations, exactly after many
    q_many = sinkhorn_knopp(logits, temp=0.05, n_iterations=200, log_space=log_space)
    assert torch.allclose(q_many.sum(dim=0), torch.full((16,), 32 / 16), atol=1e-4)


@pytest.mark.parametrize("log_space", [False, True])
def test_sinkhorn_is_stable_for_large_logits(log_space):
    # logits 10 at temperature 0.04: exp(250) overflows float32 in the official version
    logits = torch.zeros(8, 4)
    logits[:, 0] = 10.0
    logits[::2, 1] = 10.0
    assert not torch.isfinite(torch.exp(logits / 0.04)).all()
    q = sinkhorn_knopp(logits, temp=0.04, n_iterations=3, log_space=log_space)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.double(), official_sinkhorn_float64(logits, 0.04, 3), atol=1e-5)
    assert torch.allclose(q.sum(dim=1), torch.ones(8), atol=1e-5)
    q_many = sinkhorn_knopp(logits, temp=0.04, n_iterations=500, log_space=log_space)
    assert torch.allclose(q_many.sum(dim=0), torch.full((4,), 2.0), atol=1e-3)


def test_sinkhorn_falls_back_to_log_space_when_a_row_underflows():
    # row 1 is 250 below the column maxima everywhere: exp underflows to 0 for the whole row
    logits = torch.tensor([[10.0, 10.0, 9.0], [0.0, 0.0, 0.0], [10.0, 9.0, 10.0]])
    q = sinkhorn_knopp(logits, temp=0.04)
    assert torch.isfinite(q).all()
    assert torch.equal(q, sinkhorn_knopp(logits, temp=0.04, log_space=True))
    assert torch.allclose(q.double(), official_sinkhorn_float64(logits, 0.04, 3), atol=1e-5)
    # by hand, one iteration: column sums are ~(2, 1, 1) e^250, so row 1 is
    # (1/2, 1, 1) e^0 normalised = (0.2, 0.4, 0.4) (corrections are below e^-25)
    q1 = sinkhorn_knopp(logits, temp=0.04, n_iterations=1)
    assert torch.allclose(q1[1], torch.tensor([0.2, 0.4, 0.4]), atol=1e-6)


def test_sinkhorn_hand_example_equal_logits_are_uniform():
    q = sinkhorn_knopp(torch.full((3, 5), 4.0), temp=0.04)
    assert torch.allclose(q, torch.full((3, 5), 0.2))


# ---------------------------------------------------------------- iBOT
def test_ibot_weights_each_crop_by_one_over_its_masked_tokens():
    # 3 global crops: crop A has 1 masked token, crop B 2, crop C none (still counts in n_crops)
    p = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.25, 0.75]])
    student = 0.1 * torch.log(p)
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    weights = torch.tensor([1.0, 0.5, 0.5])
    loss = iBOTPatchLoss(2)(student, teacher, weights, n_crops=3)
    expected = (math.log(2) + (math.log(4) - math.log(0.75)) / 2) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ibot_center_and_sinkhorn_shapes():
    loss = iBOTPatchLoss(5)
    t = torch.randn(9, 5)
    assert loss.sinkhorn_knopp_teacher(t, 0.04).shape == (9, 5)
    loss.update_center(t)
    assert torch.allclose(loss.center, 0.1 * t.mean(0, keepdim=True))


# ---------------------------------------------------------------- KoLeo
def test_koleo_four_points_on_a_square():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    # nearest neighbour distance sqrt(2) for each point
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-6)


def test_koleo_asymmetric_points_and_scale_invariance():
    deg = torch.tensor([0.0, 60.0, 180.0]) * math.pi / 180
    x = torch.stack([deg.cos(), deg.sin()], dim=1) * torch.tensor([[1.0], [3.0], [0.5]])
    # d(0,60 deg)=1 for both; the 180 deg point's nearest is 60 deg at sqrt(3)
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(3) / 6, abs=1e-6)


def test_koleo_gradient_is_finite_for_duplicate_vectors():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    KoLeoLoss()(x).backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- head
def test_dino_head_shape_and_prototype_normalisation():
    torch.manual_seed(0)
    head = DINOHead(32, out_dim=50, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(7, 32)
    y = head(x)
    assert y.shape == (7, 50)
    assert y.abs().max() <= 1.0 + 1e-6  # cosine of unit bottleneck and unit prototypes
    # reference: torch's weight_norm with gain fixed at 1 on the same direction weights
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 50, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original1.copy_(head.last_layer.weight)
        ref.parametrizations.weight.original0.fill_(1.0)
        z = F.normalize(head.mlp(x), dim=-1)
        assert torch.allclose(head.last_layer(z), ref(z), atol=1e-6)
        head.last_layer.weight.mul_(7.0)  # the weight's scale must not matter
    assert torch.allclose(head(x), y, atol=1e-6)
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [64, 64, 16]


# ---------------------------------------------------------------- two ranks (gloo)
def _two_rank_worker(rank: int, port: int, logits: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = logits.chunk(2)[rank]
        q = sinkhorn_knopp(rows, temp=0.04, n_iterations=3)
        q_log = sinkhorn_knopp(rows, temp=0.04, n_iterations=3, log_space=True)
        loss = DINOLoss(logits.shape[1])
        loss.update_center(rows)
        out[rank] = (q, q_log, loss.center.clone())
    finally:
        dist.destroy_process_group()


def test_sinkhorn_and_center_across_two_ranks_equal_single_process():
    torch.manual_seed(1)
    logits = torch.randn(11, 6) * 3  # uneven: 6 rows on rank 0, 5 on rank 1
    port = 29500 + os.getpid() % 1000
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_two_rank_worker, args=(port, logits, out), nprocs=2, join=True)
        q = torch.cat([out[0][0], out[1][0]])
        q_log = torch.cat([out[0][1], out[1][1]])
        centers = [out[0][2], out[1][2]]
    assert torch.allclose(q, sinkhorn_knopp(logits, temp=0.04, n_iterations=3), atol=1e-6)
    assert torch.allclose(q_log, q, atol=1e-6)
    for c in centers:
        assert torch.allclose(c, 0.1 * logits.mean(0, keepdim=True), atol=1e-6)
