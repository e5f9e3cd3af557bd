"""Loading official DINOv2 torch-hub state dicts.

`official_state_dict` writes random weights under the key names and shapes of
facebookresearch/dinov2 (`DinoVisionTransformer`, `NestedTensorBlock`, `MemEffAttention`,
`Mlp`, `SwiGLUFFNFused`, `LayerScale`), written out by hand from that code rather than taken
from our model. The reference for the forward pass is timm's ViT, which loads the same dict
through its own DINOv2 converter (`checkpoint_filter_fn`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lvd.pretrain.models.layers import swiglu_hidden_dim
from lvd.pretrain.models.load import load_backbone
from lvd.pretrain.models.official import (
    build_official,
    load_official_state_dict,
    official_config_from_state_dict,
)
from lvd.pretrain.models.strict import StateDictMismatch
from lvd.pretrain.models.vit import VisionTransformer

D, DEPTH, GRID = 128, 3, 4  # 2 heads of 64, 56 px native


def real_images(size: int) -> torch.Tensor:
    """Three photos from scikit-image, resized and ImageNet-normalised, as (3, 3, size, size)."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    x = torch.stack(
        [
            F.interpolate(
                torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255,
                size=(size, size),
                mode="bilinear",
                antialias=True,
            )[0]
            for p in photos
        ]
    )
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


def official_state_dict(*, ffn="mlp", registers=0, chunks=0, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05, shift=0.0):
        return torch.randn(*shape, generator=gen) * scale + shift

    sd = {
        "cls_token": rnd(1, 1, D, scale=1.0),
        "pos_embed": rnd(1, 1 + GRID * GRID, D, scale=1.0),
        "mask_token": rnd(1, D),
        "patch_embed.proj.weight": rnd(D, 3, 14, 14),
        "patch_embed.proj.bias": rnd(D),
    }
    if registers:
        sd["register_tokens"] = rnd(1, registers, D, scale=1.0)
    for i in range(DEPTH):
        # block_chunks > 0: chunk c holds blocks [c*size, (c+1)*size) under their global index
        b = f"blocks.{i // (DEPTH // chunks)}.{i}." if chunks else f"blocks.{i}."
        sd |= {
            b + "norm1.weight": rnd(D, shift=1.0),
            b + "norm1.bias": rnd(D),
            b + "attn.qkv.weight": rnd(3 * D, D),
            b + "attn.qkv.bias": rnd(3 * D),
            b + "attn.proj.weight": rnd(D, D),
            b + "attn.proj.bias": rnd(D),
            b + "ls1.gamma": rnd(D, scale=0.5),
            b + "norm2.weight": rnd(D, shift=1.0),
            b + "norm2.bias": rnd(D),
            b + "ls2.gamma": rnd(D, scale=0.5),
        }
        if ffn == "mlp":
            sd |= {
                b + "mlp.fc1.weight": rnd(4 * D, D),
                b + "mlp.fc1.bias": rnd(4 * D),
                b + "mlp.fc2.weight": rnd(D, 4 * D),
                b + "mlp.fc2.bias": rnd(D),
            }
        else:
            hidden = (int(4 * D * 2 / 3) + 7) // 8 * 8  # SwiGLUFFNFused
            sd |= {
                b + "mlp.w12.weight": rnd(2 * hidden, D),
                b + "mlp.w12.bias": rnd(2 * hidden),
                b + "mlp.w3.weight": rnd(D, hidden),
                b + "mlp.w3.bias": rnd(D),
            }
    sd |= {"norm.weight": rnd(D, shift=1.0), "norm.bias": rnd(D)}
    return sd


def timm_reference(sd: dict[str, torch.Tensor], *, ffn: str, registers: int) -> torch.nn.Module:
    from timm.layers import SwiGLUPacked
    from timm.models import vision_transformer as timm_vit

    kwargs = dict(
        img_size=GRID * 14, patch_size=14, embed_dim=D, depth=DEPTH, num_heads=D // 64, init_values=1e-5, num_classes=0
    )
    if registers:
        kwargs |= dict(reg_tokens=registers, no_embed_class=True)
    if ffn == "swiglu":
        kwargs |= dict(mlp_ratio=2 * swiglu_hidden_dim(D, 4.0) / D, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    model = timm_vit.VisionTransformer(**kwargs)
    model.load_state_dict(timm_vit.checkpoint_filter_fn(dict(sd), model))
    return model.eval()


@pytest.mark.parametrize("ffn,registers", [("mlp", 0), ("mlp", 4), ("swiglu", 0)])
def test_official_weights_give_timm_reference_outputs(ffn, registers):
    sd = official_state_dict(ffn=ffn, registers=registers)
    ours = build_official(sd).eval()
    theirs = timm_reference(sd, ffn=ffn, registers=registers)
    x = real_images(GRID * 14)
    with torch.no_grad():
        out, tokens_BTD = ours(x), theirs.forward_features(x)
    torch.testing.assert_close(out.cls_BD, tokens_BTD[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.registers_BRD, tokens_BTD[:, 1 : 1 + registers], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.patches_BND, tokens_BTD[:, 1 + registers :], atol=1e-4, rtol=1e-4)


def test_config_is_inferred_from_the_tensors():
    cfg = official_config_from_state_dict(official_state_dict(ffn="swiglu", registers=4))
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (56, 14, D, DEPTH, 2)
    assert (cfg.ffn, cfg.mlp_ratio, cfg.num_register_tokens) == ("swiglu", 4.0, 4)
    assert (cfg.interpolate_offset, cfg.interpolate_antialias) == (0.0, True)  # hub reg models
    plain = official_config_from_state_dict(official_state_dict())
    assert (plain.ffn, plain.mlp_ratio, plain.num_register_tokens) == ("mlp", 4.0, 0)
    assert (plain.interpolate_offset, plain.interpolate_antialias) == (0.1, False)


def test_every_key_is_loaded_verbatim():
    sd = official_state_dict(registers=4)
    ours = build_official(sd).state_dict()
    assert ours.keys() == sd.keys()
    assert all(torch.equal(ours[k], v) for k, v in sd.items())


def test_block_chunked_training_layout_loads_like_the_flat_one():
    flat = build_official(official_state_dict(seed=3)).state_dict()
    chunked_sd = official_state_dict(seed=3, chunks=DEPTH)
    assert "blocks.2.2.attn.qkv.weight" in chunked_sd
    chunked = build_official(chunked_sd).state_dict()
    assert all(torch.equal(chunked[k], v) for k, v in flat.items())


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda sd: sd.pop("blocks.1.ls2.gamma"), r"missing keys: \['blocks.1.ls2.gamma'\]"),
        (lambda sd: sd.__setitem__("blocks.0.attn.q_norm.weight", torch.ones(D)), "unexpected keys: .*q_norm"),
        (
            lambda sd: sd.__setitem__("blocks.2.mlp.fc1.bias", torch.zeros(3)),
            r"wrong shapes: .*blocks.2.mlp.fc1.bias: file \(3,\)",
        ),
    ],
)
def test_loading_is_strict(damage, expected):
    model = VisionTransformer.from_config(official_config_from_state_dict(official_state_dict()))
    sd = official_state_dict()
    damage(sd)
    with pytest.raises(StateDictMismatch, match=expected):
        load_official_state_dict(model, sd)


def test_all_problems_are_listed_at_once():
    model = VisionTransformer.from_config(official_config_from_state_dict(official_state_dict()))
    sd = official_state_dict()
    sd.pop("mask_token")
    sd["head.weight"] = torch.zeros(1)
    sd["norm.bias"] = torch.zeros(D + 1)
    with pytest.raises(StateDictMismatch) as err:
        load_official_state_dict(model, sd)
    assert all(s in str(err.value) for s in ("mask_token", "head.weight", "norm.bias"))


def test_registers_must_match_the_model():
    model = VisionTransformer.from_config(official_config_from_state_dict(official_state_dict()))
    with pytest.raises(StateDictMismatch, match="register_tokens"):
        load_official_state_dict(model, official_state_dict(registers=4))


def test_load_backbone_reads_an_official_pth(tmp_path):
    sd = official_state_dict(registers=4)
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    model = load_backbone(tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    assert not model.training and model.num_register_tokens == 4
    assert torch.equal(model.pos_embed, sd["pos_embed"])
    torch.save({"student": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an official DINOv2 backbone"):
        load_backbone(tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a backbone"):
        load_backbone(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "missing.pth")


def test_load_backbone_takes_the_teacher_of_an_official_training_checkpoint(tmp_path):
    """Official training checkpoints: {"model": {"teacher.backbone.blocks.C.N...": ...}} with
    block chunks, beside the student and the heads."""
    teacher, student = official_state_dict(chunks=DEPTH, seed=1), official_state_dict(chunks=DEPTH, seed=2)
    model = {f"teacher.backbone.{k}": v for k, v in teacher.items()}
    model |= {f"student.backbone.{k}": v for k, v in student.items()}
    model["teacher.dino_head.mlp.0.weight"] = torch.zeros(4, D)
    torch.save({"model": model, "iteration": 7}, tmp_path / "model_0000007.pth")
    loaded = load_backbone(tmp_path / "model_0000007.pth")
    assert torch.equal(loaded.blocks[2].attn.qkv.weight, teacher["blocks.2.2.attn.qkv.weight"])
    eval_file = {"teacher": {f"backbone.{k}": v for k, v in teacher.items()} | {"dino_head.w": torch.zeros(1)}}
    torch.save(eval_file, tmp_path / "teacher_checkpoint.pth")
    loaded = load_backbone(tmp_path / "teacher_checkpoint.pth")
    assert torch.equal(loaded.blocks[1].mlp.fc1.weight, teacher["blocks.1.1.mlp.fc1.weight"])
