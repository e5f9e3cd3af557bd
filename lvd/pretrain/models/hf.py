"""Export to and load from Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` folders.

We write the weight names the facebook/dinov2-* Hub repositories use (`attention.attention.query`,
`attention.output.dense`, `mlp.weights_in` ...): transformers 4.x loads them as they are, and
transformers 5 renames them on load (its conversion mapping splits `weights_in` into gate/up).
`load_hf` reads either that layout or the transformers-5 names (`q_proj`, `o_proj`, `gate_proj`)
and needs only safetensors, not transformers.

Position embeddings at other sizes: HF resizes with `size=(h, w)` (no 0.1 offset), without
antialias for Dinov2Model and with antialias for Dinov2WithRegistersModel. At the native size
(`image_size`) no resizing happens and HF matches us exactly; elsewhere an exported model's HF
outputs differ slightly from ours unless our `interpolate_offset` was 0 and antialias as above.
`load_hf` builds the model with HF's settings, so a loaded folder reproduces HF everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lvd.pretrain.models.strict import StateDictMismatch, load_strict
from lvd.pretrain.models.vit import VisionTransformer, ViTConfig

WEIGHTS_NAME = "model.safetensors"
_TOP = {  # ours -> HF, outside the blocks
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_BLOCK = {  # ours -> HF, inside block N (qkv is split separately)
    "norm1": "norm1",
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w12": "mlp.weights_in",
    "mlp.w3": "mlp.weights_out",
    "ls2.gamma": "layer_scale2.lambda1",
}
_TRANSFORMERS5 = {  # transformers-5 save names -> Hub names
    ".attention.q_proj.": ".attention.attention.query.",
    ".attention.k_proj.": ".attention.attention.key.",
    ".attention.v_proj.": ".attention.attention.value.",
    ".attention.o_proj.": ".attention.output.dense.",
    ".mlp.down_proj.": ".mlp.weights_out.",
}


def hf_config(config: ViTConfig) -> dict:
    if config.mlp_ratio != int(config.mlp_ratio):
        raise ValueError(f"HF Dinov2Config stores mlp_ratio as an int; {config.mlp_ratio} cannot be exported")
    registers = config.num_register_tokens > 0
    out = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "mlp_ratio": int(config.mlp_ratio),
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "image_size": config.img_size,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias,
        "layerscale_value": config.layerscale_init if config.layerscale_init is not None else 1.0,
        "use_swiglu_ffn": config.ffn == "swiglu",
        "drop_path_rate": 0.0,
        "torch_dtype": "float32",
    }
    if registers:
        out["num_register_tokens"] = config.num_register_tokens
    return out


def to_hf_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    out = {_TOP[k]: sd.pop(k) for k in list(sd) if k in _TOP}
    for i in range(model.config.depth):
        ours, hf = f"blocks.{i}.", f"encoder.layer.{i}."
        for suffix in ("weight", "bias"):
            if f"{ours}attn.qkv.{suffix}" in sd:
                for name, part in zip(("query", "key", "value"), sd.pop(f"{ours}attn.qkv.{suffix}").chunk(3)):
                    out[f"{hf}attention.attention.{name}.{suffix}"] = part.contiguous()
        for k in [k for k in sd if k.startswith(ours)]:
            renamed = _rename_block_key(k[len(ours) :], _BLOCK)
            if renamed is None:
                raise StateDictMismatch(f"no Hugging Face name for block parameter {k!r}")
            out[hf + renamed] = sd.pop(k)
        if model.config.layerscale_init is None:  # HF always has LayerScale: ones is the identity
            out[f"{hf}layer_scale1.lambda1"] = torch.ones(model.embed_dim)
            out[f"{hf}layer_scale2.lambda1"] = torch.ones(model.embed_dim)
    assert not sd, f"unmapped parameters: {sorted(sd)}"
    return out


def _rename_block_key(key: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if key == src or key.startswith(src + "."):
            return dst + key[len(src) :]
    return None


def export_hf(model: VisionTransformer, out_dir: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` loadable by `transformers.AutoModel`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
    save_file(to_hf_state_dict(model), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def config_from_hf(hf: dict) -> ViTConfig:
    model_type = hf.get("model_type")
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(f"config.json model_type={model_type!r}: only dinov2 and dinov2_with_registers load")
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("layer_norm_eps", 1e-6) != 1e-6:
        raise ValueError("only hidden_act='gelu' and layer_norm_eps=1e-6 (the DINOv2 values) are supported")
    registers = hf.get("num_register_tokens", 4) if model_type == "dinov2_with_registers" else 0
    return ViTConfig(
        img_size=_single(hf.get("image_size", 224)),
        patch_size=_single(hf.get("patch_size", 14)),
        in_chans=hf.get("num_channels", 3),
        embed_dim=hf["hidden_size"],
        depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        mlp_ratio=float(hf.get("mlp_ratio", 4)),
        ffn="swiglu" if hf.get("use_swiglu_ffn", False) else "mlp",
        num_register_tokens=registers,
        layerscale_init=hf.get("layerscale_value", 1.0),
        qkv_bias=hf.get("qkv_bias", True),
        interpolate_offset=0.0,  # reproduce HF's resizing, see the module docstring
        interpolate_antialias=registers > 0,
    )


def _single(value) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square image_size/patch_size {value} is not supported")
        return int(value[0])
    return int(value)


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    hf_sd = dict(hf_sd)
    for k in list(hf_sd):
        if ".mlp.gate_proj." in k:  # transformers-5 layout: fuse gate and up back into weights_in
            up = hf_sd.pop(k.replace(".gate_proj.", ".up_proj."))
            hf_sd[k.replace(".gate_proj.", ".weights_in.")] = torch.cat([hf_sd.pop(k), up])
    for k in list(hf_sd):
        new = next((k.replace(a, b) for a, b in _TRANSFORMERS5.items() if a in k), k)
        hf_sd[new] = hf_sd.pop(k)
    out = {ours: hf_sd.pop(hf) for ours, hf in _TOP.items() if hf in hf_sd}
    for i in range(depth):
        ours, hf = f"blocks.{i}.", f"encoder.layer.{i}."
        for suffix in ("weight", "bias"):
            parts = [hf_sd.pop(f"{hf}attention.attention.{n}.{suffix}", None) for n in ("query", "key", "value")]
            if all(p is not None for p in parts):
                out[f"{ours}attn.qkv.{suffix}"] = torch.cat(parts)
        inverse = {v: k for k, v in _BLOCK.items()}
        for k in [k for k in hf_sd if k.startswith(hf)]:
            renamed = _rename_block_key(k[len(hf) :], inverse)
            if renamed is not None:  # unknown names stay behind and are reported below
                out[ours + renamed] = hf_sd.pop(k)
    out.update({f"hf:{k}": v for k, v in hf_sd.items()})  # strict loading reports these by HF name
    return out


def load_hf(folder: str | Path) -> VisionTransformer:
    """Build and strictly load a `VisionTransformer` from a HF Dinov2 folder (no transformers needed)."""
    folder = Path(folder)
    config = config_from_hf(json.loads((folder / "config.json").read_text()))
    model = VisionTransformer.from_config(config)
    sd = from_hf_state_dict(_read_weights(folder), config.depth)
    sd.setdefault("mask_token", torch.zeros(1, config.embed_dim))  # HF use_mask_token=False omits it
    load_strict(model, sd, source=f"Hugging Face folder {folder}")
    return model


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.exists():  # sharded save
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(folder / f)).items()}
    if not (folder / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"{folder} has config.json but no {WEIGHTS_NAME} (only safetensors is supported)")
    return load_file(str(folder / WEIGHTS_NAME))
