"""The DINOv2 ViT: shapes for every size, registers, mask token, position embeddings, drop path,
attention maps and meta-device construction. Parameter counts are checked against timm's
DINOv2 ViTs (built on the meta device, no weights)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from lvd.pretrain.models import ARCHITECTURES, VisionTransformer, vit_giant2, vit_tiny
from lvd.pretrain.models.layers import LayerScale

TIMM_NAMES = {
    "vit_small": "vit_small_patch14_dinov2",
    "vit_base": "vit_base_patch14_dinov2",
    "vit_large": "vit_large_patch14_dinov2",
    "vit_giant2": "vit_giant_patch14_dinov2",
}
WIDTHS = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768, "vit_large": 1024, "vit_giant2": 1536}


@pytest.mark.parametrize("arch", sorted(TIMM_NAMES))
def test_parameter_count_matches_timm_dinov2(arch):
    with torch.device("meta"):
        ours = ARCHITECTURES[arch](img_size=518)
        theirs = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs + WIDTHS[arch]  # timm drops the (training-only) mask token


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_output_shapes_every_size_on_meta(arch):
    with torch.device("meta"):
        model = ARCHITECTURES[arch](num_register_tokens=4)
        out = model(torch.empty(2, 3, 224, 98))
    D = WIDTHS[arch]
    assert model.embed_dim == D and isinstance(model.blocks, torch.nn.ModuleList)
    assert out.cls_BD.shape == (2, D) and out.cls_prenorm_BD.shape == (2, D)
    assert out.registers_BRD.shape == (2, 4, D)
    assert out.patches_BND.shape == (2, 16 * 7, D)


def test_giant_uses_the_official_swiglu_sizes():
    with torch.device("meta"):
        g = vit_giant2()
    assert len(g.blocks) == 40 and g.config.num_heads == 24
    assert g.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536)
    assert g.blocks[0].mlp.w3.weight.shape == (1536, 4096)


def test_real_forward_with_and_without_registers():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 56, 56)
    for R in (0, 4):
        model = vit_tiny(img_size=56, num_register_tokens=R).eval()
        out = model(x)
        assert out.registers_BRD.shape == (2, R, 192) and out.patches_BND.shape == (2, 16, 192)
        assert torch.isfinite(out.patches_BND).all()
        # final norm: CLS is the LayerNorm of the pre-norm CLS
        torch.testing.assert_close(out.cls_BD, model.norm(out.cls_prenorm_BD))
        assert model.last_self_attention(x).shape == (2, 3, 1 + R + 16, 1 + R + 16)


def test_masked_patches_become_mask_token_exactly():
    torch.manual_seed(0)
    model = vit_tiny(img_size=56, num_register_tokens=2).eval()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(3, 3, 56, 56)
    masks_BN = torch.rand(3, 16) < 0.5
    tokens_BTD = model.prepare_tokens(x, masks_BN)
    conv = model.patch_embed.proj
    patches_BND = F.conv2d(x, conv.weight, conv.bias, stride=14).flatten(2).transpose(1, 2)
    pos_ND = model.pos_embed[0, 1:]
    expected_BND = torch.where(masks_BN[..., None], model.mask_token[0] + pos_ND, patches_BND + pos_ND)
    assert torch.equal(tokens_BTD[:, 3:], expected_BND)  # after CLS and 2 registers
    assert torch.equal(tokens_BTD[:, 1:3], model.register_tokens.expand(3, -1, -1))  # no pos embed
    assert torch.equal(tokens_BTD[:, 0], (model.cls_token[0] + model.pos_embed[0, :1]).expand(3, -1))
    with pytest.raises(ValueError, match="masks_BN"):
        model(x, masks_BN[:, :15])


def test_pos_embed_is_identity_at_native_grid():
    model = vit_tiny(img_size=98)
    assert model.interpolate_pos_embed(7, 7) is model.pos_embed
    x = torch.randn(1, 3, 98, 98)
    tokens_BTD = model.prepare_tokens(x)
    patches_BND = model.patch_embed(x)
    assert torch.equal(tokens_BTD[:, 1:], patches_BND + model.pos_embed[:, 1:])


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, False), (0.0, True)])
@pytest.mark.parametrize("hw", [(98, 98), (126, 126), (98, 126), (448, 224)])
def test_pos_embed_resizes_to_any_multiple_of_the_patch(offset, antialias, hw):
    model = vit_tiny(depth=1, interpolate_offset=offset, interpolate_antialias=antialias)
    h, w = hw[0] // 14, hw[1] // 14
    pos_1TD = model.interpolate_pos_embed(h, w)
    assert pos_1TD.shape == (1, 1 + h * w, 192)
    assert torch.equal(pos_1TD[:, 0], model.pos_embed[:, 0])
    # bicubic weights sum to one, so a constant field stays constant
    with torch.no_grad():
        model.pos_embed[:, 1:] = torch.linspace(-1, 1, 192)
    torch.testing.assert_close(model.interpolate_pos_embed(h, w)[0, 1:], torch.linspace(-1, 1, 192).expand(h * w, -1))


def test_patch_grid_rejects_sizes_off_the_patch_grid():
    model = vit_tiny()
    assert model.patch_grid(torch.empty(1, 3, 98, 126)) == (7, 9)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(torch.randn(1, 3, 100, 98))


def test_drop_path_only_acts_in_training():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 56, 56)
    dropping = vit_tiny(img_size=56, drop_path_rate=0.5)
    plain = vit_tiny(img_size=56, drop_path_rate=0.0)
    plain.load_state_dict(dropping.state_dict())
    dropping.eval(), plain.eval()
    assert torch.equal(dropping(x).patches_BND, plain(x).patches_BND)
    dropping.train(), plain.train()
    assert torch.equal(plain(x).patches_BND, plain(x).patches_BND)
    assert not torch.equal(dropping(x).patches_BND, dropping(x).patches_BND)
    # linear decay rule: 0 at the first block, the full rate at the last
    assert dropping.blocks[0].drop_path_rate == 0.0 and dropping.blocks[-1].drop_path_rate == 0.5
    uniform = vit_tiny(drop_path_rate=0.3, drop_path_uniform=True)
    assert {b.drop_path_rate for b in uniform.blocks} == {0.3}


def test_last_self_attention_matches_the_sdpa_path():
    torch.manual_seed(0)
    model = vit_tiny(img_size=56, num_register_tokens=4, layerscale_init=1.0).eval()
    x = torch.randn(2, 3, 56, 56)
    attn_BHTT = model.last_self_attention(x)
    torch.testing.assert_close(attn_BHTT.sum(-1), torch.ones(2, 3, 21))
    # attention weights times values must give what scaled_dot_product_attention gave
    tokens_BTD = model.prepare_tokens(x)
    for block in model.blocks[:-1]:
        tokens_BTD = block(tokens_BTD)
    last = model.blocks[-1]
    _, _, v_BHTd = last.attn._qkv(last.norm1(tokens_BTD))
    via_weights_BTD = (attn_BHTT @ v_BHTd).transpose(1, 2).reshape(2, 21, 192)
    torch.testing.assert_close(last.attn.proj(via_weights_BTD), last.attn(last.norm1(tokens_BTD)), atol=1e-5, rtol=1e-5)


def test_build_on_meta_then_init_weights():
    with torch.device("meta"):
        model = vit_tiny(num_register_tokens=4)
    model.to_empty(device="cpu")
    model.init_weights()
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert torch.equal(model.mask_token, torch.zeros(1, 192))
    assert 0.015 < params["blocks.0.mlp.fc1.weight"].std() < 0.025
    assert params["blocks.0.mlp.fc1.weight"].abs().max() <= 2.0  # trunc normal bounds
    assert torch.equal(params["blocks.0.attn.qkv.bias"], torch.zeros(3 * 192))
    assert all(torch.equal(m.gamma, torch.full((192,), 1e-5)) for m in model.modules() if isinstance(m, LayerScale))
    assert torch.equal(params["norm.weight"], torch.ones(192))


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = vit_tiny(img_size=56, num_register_tokens=2, ffn="swiglu", drop_path_rate=0.1).train()
    masks_BN = torch.zeros(2, 16, dtype=torch.bool)
    masks_BN[:, :5] = True
    out = model(torch.randn(2, 3, 56, 56), masks_BN)
    (out.cls_BD.sum() + out.patches_BND.square().mean() + out.registers_BRD.sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VisionTransformer(embed_dim=100, depth=1, num_heads=3)
    with pytest.raises(ValueError, match="choose one of"):
        vit_tiny(ffn="geglu")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vit_tiny(img_size=100)


def test_gpu_step_benchmark_smoke_runs_on_cpu():
    """benchmarks/gpu_step.py is run by hand on a GPU; its --smoke mode keeps it runnable here."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_step.py"
    done = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("single", "multicrop"))]
    assert [r[:2] for r in rows] == [["single", "2"], ["multicrop", "2"]]
    assert all(float(r[2]) > 0 for r in rows)  # images/s
