"""Param groups (layer-wise decay, no-decay params, frozen prototypes) and one AdamW step
compared against plain torch.optim.AdamW with hand-written per-parameter settings."""

import pytest
import torch
from torch import nn

from lvd.pretrain.models.vit import vit_tiny
from lvd.pretrain.optim import (
    apply_schedules,
    build_adamw,
    clip_gradients,
    param_groups,
    zero_last_layer_grads,
)

DEPTH, DECAY = 2, 0.5


class ToyHead(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Linear(dim, 8)
        self.last_layer = nn.Linear(8, 16, bias=False)

    def forward(self, x):
        return self.last_layer(self.mlp(x))


def _modules():
    torch.manual_seed(0)
    backbone = vit_tiny(depth=DEPTH, img_size=28, num_register_tokens=2, layerscale_init=1e-5)
    return {"backbone": backbone, "dino_head": ToyHead(backbone.embed_dim)}


def _settings(modules):
    groups = param_groups(modules, depth=DEPTH, layerwise_decay=DECAY, patch_embed_lr_mult=0.2)
    by_id = {}
    for g in groups:
        for p in g["params"]:
            by_id[id(p)] = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
    return groups, {f"{m}.{n}": by_id[id(p)] for m, mod in modules.items() for n, p in mod.named_parameters()}


# (lr multiplier, wd multiplier, is_last_layer), written out by hand for depth 2, decay 0.5:
# embeddings are layer 0 -> 0.5**3, block i is layer i+1 -> 0.5**(2-i), final norm/heads 1.
EXPECTED = {
    "backbone.patch_embed.proj.weight": (0.125 * 0.2, 1.0, False),
    "backbone.patch_embed.proj.bias": (0.125 * 0.2, 0.0, False),
    "backbone.cls_token": (0.125, 0.0, False),
    "backbone.pos_embed": (0.125, 0.0, False),
    "backbone.register_tokens": (0.125, 0.0, False),
    "backbone.mask_token": (0.125, 0.0, False),
    "backbone.blocks.0.attn.qkv.weight": (0.25, 1.0, False),
    "backbone.blocks.0.attn.qkv.bias": (0.25, 0.0, False),
    "backbone.blocks.0.norm1.weight": (0.25, 0.0, False),
    "backbone.blocks.0.ls1.gamma": (0.25, 0.0, False),
    "backbone.blocks.1.mlp.fc1.weight": (0.5, 1.0, False),
    "backbone.norm.weight": (1.0, 0.0, False),
    "dino_head.mlp.weight": (1.0, 1.0, False),
    "dino_head.mlp.bias": (1.0, 0.0, False),
    "dino_head.last_layer.weight": (1.0, 1.0, True),
}


def test_param_group_assignment():
    modules = _modules()
    groups, got = _settings(modules)
    names = set(got)
    for name, expected in EXPECTED.items():
        if name not in names:
            pytest.fail(f"{name} not among the model's parameters: {sorted(names)[:8]}...")
        assert got[name] == pytest.approx(expected), name
    # every parameter is in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(names)
    assert len(groups) < len(names)  # equal settings are merged


def test_one_step_matches_plain_adamw():
    modules = _modules()
    ref = {k: __import__("copy").deepcopy(m) for k, m in modules.items()}
    lr, wd = 1e-2, 0.04
    opt = build_adamw(
        param_groups(modules, depth=DEPTH, layerwise_decay=DECAY, patch_embed_lr_mult=0.2), beta1=0.9, beta2=0.999
    )
    apply_schedules(opt, lr=lr, weight_decay=wd, last_layer_lr=0.0)
    _, settings = _settings(modules)
    ref_params = {f"{m}.{n}": p for m, mod in ref.items() for n, p in mod.named_parameters()}
    # one plain AdamW per parameter, with the settings checked by hand in the test above
    ref_opts = []
    for name, p in ref_params.items():
        lr_mult, wd_mult, is_last = settings[name]
        ref_opts.append(
            torch.optim.AdamW([p], lr=0.0 if is_last else lr * lr_mult, weight_decay=wd * wd_mult, betas=(0.9, 0.999))
        )

    x = torch.randn(3, 3, 28, 28)
    for ms in (modules, ref):
        out = ms["dino_head"](ms["backbone"](x).cls_BD)
        out.square().mean().backward()
    opt.step()
    for o in ref_opts:
        o.step()
    ours = {f"{m}.{n}": p for m, mod in modules.items() for n, p in mod.named_parameters()}
    before = _modules()
    for name, p in ours.items():
        torch.testing.assert_close(p, ref_params[name], rtol=0, atol=1e-7, msg=name)
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.equal(ours["backbone." + qkv], before["backbone"].get_parameter(qkv))
    last = modules["dino_head"].last_layer.weight
    assert torch.equal(last, ref["dino_head"].last_layer.weight)  # frozen: lr 0


def test_frozen_prototype_grads_dropped_and_clipping():
    modules = _modules()
    opt = build_adamw(
        param_groups(modules, depth=DEPTH, layerwise_decay=DECAY, patch_embed_lr_mult=0.2), beta1=0.9, beta2=0.999
    )
    apply_schedules(opt, lr=1e-3, weight_decay=0.04, last_layer_lr=0.0)
    out = modules["dino_head"](modules["backbone"](torch.randn(2, 3, 28, 28)).cls_BD)
    (1e4 * out.sum()).backward()
    zero_last_layer_grads(opt)
    assert modules["dino_head"].last_layer.weight.grad is None
    norms = clip_gradients(modules, 3.0)
    assert norms["backbone"] > 3.0  # the pre-clip norm is reported
    after = torch.nn.utils.get_total_norm([p.grad for p in modules["backbone"].parameters() if p.grad is not None])
    assert after == pytest.approx(3.0, rel=1e-4)
