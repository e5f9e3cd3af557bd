"""Hugging Face export and import: `transformers.AutoModel` reads our folders and gives our
outputs on real photos; `load_hf` round-trips without transformers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from lvd.pretrain.models import vit_tiny
from lvd.pretrain.models.hf import export_hf, load_hf
from lvd.pretrain.models.load import load_backbone
from lvd.pretrain.models.strict import StateDictMismatch

SIZE = 56  # native size of the test models (4 x 4 patches)


def real_images(size: int) -> torch.Tensor:
    """Three photos from scikit-image, resized and ImageNet-normalised, as (3, 3, size, size)."""
    from skimage import data

    photos = [data.astronaut(), data.rocket(), data.coffee()]
    x = torch.stack(
        [
            F.interpolate(
                torch.from_numpy(p[..., :3]).permute(2, 0, 1)[None].float() / 255,
                size=(size, size),
                mode="bilinear",
                antialias=True,
            )[0]
            for p in photos
        ]
    )
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


def random_model(**overrides):
    torch.manual_seed(0)
    model = vit_tiny(img_size=SIZE, depth=2, **overrides)
    with torch.no_grad():  # LayerScale 1e-5 would hide any mistake in the blocks
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model.eval()


VARIANTS = {
    "plain": {},
    "registers": {"num_register_tokens": 4},
    "swiglu": {"ffn": "swiglu"},
    "no_layerscale_no_qkv_bias": {"layerscale_init": None, "qkv_bias": False},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_reads_our_export(tmp_path, variant):
    model = random_model(**VARIANTS[variant])
    export_hf(model, tmp_path)
    hf = transformers.AutoModel.from_pretrained(tmp_path).eval()
    R = model.num_register_tokens
    assert type(hf).__name__ == ("Dinov2WithRegistersModel" if R else "Dinov2Model")
    x = real_images(SIZE)
    with torch.no_grad():
        ours, theirs = model(x), hf(pixel_values=x)
    torch.testing.assert_close(ours.cls_BD, theirs.pooler_output, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.patches_BND, theirs.last_hidden_state[:, 1 + R :], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.registers_BRD, theirs.last_hidden_state[:, 1 : 1 + R], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["plain", "registers", "swiglu"])
def test_load_hf_round_trip_is_exact(tmp_path, variant):
    model = random_model(**VARIANTS[variant])
    export_hf(model, tmp_path)
    loaded = load_hf(tmp_path).eval()
    x = real_images(SIZE)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.cls_BD, b.cls_BD) and torch.equal(a.patches_BND, b.patches_BND)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("variant", ["plain", "registers"])
def test_loaded_folder_matches_transformers_at_other_sizes(tmp_path, variant):
    """`load_hf` adopts HF's position-embedding resizing, so it agrees off the native size too;
    a model with our training default (offset 0.1) is only close there."""
    model = random_model(**VARIANTS[variant])
    export_hf(model, tmp_path)
    hf = transformers.AutoModel.from_pretrained(tmp_path).eval()
    loaded = load_hf(tmp_path).eval()
    R = model.num_register_tokens
    for size in (98, 42):
        x = real_images(size)
        with torch.no_grad():
            theirs = hf(pixel_values=x).last_hidden_state[:, 1 + R :]
            torch.testing.assert_close(loaded(x).patches_BND, theirs, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(model(x).patches_BND, theirs, atol=1e-4)


def test_transformers_save_pretrained_folder_loads(tmp_path):
    """transformers' own save (whatever weight names this version writes) reads back."""
    model = random_model(ffn="swiglu", num_register_tokens=2)
    export_hf(model, tmp_path / "ours")
    transformers.AutoModel.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    loaded = load_backbone(tmp_path / "theirs")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_transformers5_weight_names_load(tmp_path):
    """The q_proj / o_proj / gate_proj+up_proj names of transformers 5 modules are accepted."""
    model = random_model(ffn="swiglu")
    export_hf(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    renamed = {}
    for k, v in sd.items():
        if ".mlp.weights_in." in k:
            gate, up = v.chunk(2)
            renamed[k.replace("weights_in", "gate_proj")], renamed[k.replace("weights_in", "up_proj")] = gate, up
            continue
        for a, b in (
            ("attention.attention.query", "attention.q_proj"),
            ("attention.attention.key", "attention.k_proj"),
            ("attention.attention.value", "attention.v_proj"),
            ("attention.output.dense", "attention.o_proj"),
            ("mlp.weights_out", "mlp.down_proj"),
        ):
            k = k.replace(a, b)
        renamed[k] = v.contiguous()
    save_file(renamed, tmp_path / "model.safetensors")
    loaded = load_hf(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_config_fields(tmp_path):
    export_hf(random_model(num_register_tokens=4), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "dinov2_with_registers" and cfg["num_register_tokens"] == 4
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (192, 2, 3)
    assert (cfg["image_size"], cfg["patch_size"], cfg["mlp_ratio"], cfg["use_swiglu_ffn"]) == (SIZE, 14, 4, False)


def test_load_hf_is_strict(tmp_path):
    export_hf(random_model(), tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("encoder.layer.1.norm2.bias")
    sd["encoder.layer.0.extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    expected = r"missing keys: \[.blocks.1.norm2.bias.\]; unexpected keys: \[.hf:encoder.layer.0.extra.weight.\]"
    with pytest.raises(StateDictMismatch, match=expected):
        load_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "vit"}))
    with pytest.raises(ValueError, match="model_type"):
        load_hf(tmp_path)
