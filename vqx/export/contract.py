"""The lightx2v checkpoint contract as data (docs: lightx2v-contract.md): scheme names, the checkpoint's
``config.json``, and the tensors (name, kind, dtype, shape) a Wan2.1 model of a given config must hold.

Names come from the model adapter (`vqx.models.wan`'s layer table); shapes come from diffusers' own
`WanTransformer3DModel` built on the meta device, so nothing here restates the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.adapter import LayerSelection, adapter_for
from ..quant import formats
from ..quant.scheme import Scheme

# Every lightx2v scheme that reads a per-channel symmetric checkpoint with per-token dynamic activations.
SCHEMES = {
    "int8": ["int8-vllm", "int8-sgl", "int8-q8f", "int8-triton", "int8-torchao"],
    "fp8": ["fp8-vllm", "fp8-sgl", "fp8-q8f", "fp8-triton", "fp8-torchao"],
}
# The pre-2025-10 API named the same kernels by mm_type.
LEGACY_MM_TYPE = {
    "int8": "W-int8-channel-sym-A-int8-channel-sym-dynamic-Vllm",
    "fp8": "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm",
}
# The schemes lightx2v's per-channel loaders read (docs/lightx2v-contract.md), by lightx2v scheme family.
# A scheme is matched by what it is (weights and activations), not by its name.
LIGHTX2V_SCHEMES: dict[str, Scheme] = {"int8": formats.SCHEMES["w8a8"], "fp8": formats.SCHEMES["fp8"]}


def lightx2v_family(scheme: Scheme | None) -> str | None:
    """The lightx2v scheme family that loads ``scheme`` ("int8" / "fp8"), or None."""
    if scheme is None:
        return None
    return next((fam for fam, s in LIGHTX2V_SCHEMES.items()
                 if (s.weight, s.activation) == (scheme.weight, scheme.activation)), None)


CODE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
CODE_QMAX = {"int8": 127.0, "fp8": 448.0}
ADVANCED_PTQ = "advanced_ptq"
SMOOTH_VECTORS = ("affine_norm1", "affine_norm3")
# The original Wan2.1 config.json keys (model_type added); lightx2v merges this file into its config.
WAN_CONFIG_KEYS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim", "text_len", "eps")
WAN_TEXT_LEN = 512  # UMT5 context length: fixed in Wan (diffusers' attention hard-codes it for I2V)
WAN_TEXT_DIM = 4096
WAN_IMAGE_DIM = 1280
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def stored_dtype(held: torch.dtype, export_dtype: torch.dtype) -> torch.dtype:
    """The dtype a float tensor is exported in: fp32 where the evaluated model holds it in fp32 (Wan's
    modulation, time embedding, affine norms: the bits the fake-quant model computed with), else ``export.dtype``."""
    return torch.float32 if held == torch.float32 else export_dtype


def held_in_fp32(diffusers_name: str, model_dtype: torch.dtype) -> bool:
    """Whether a diffusers Wan model loaded in ``model_dtype`` holds this tensor in fp32 (diffusers keeps
    `WanTransformer3DModel._keep_in_fp32_modules` in fp32, matched by module name)."""
    from diffusers import WanTransformer3DModel

    keep = set(WanTransformer3DModel._keep_in_fp32_modules)
    return model_dtype == torch.float32 or bool(keep.intersection(diffusers_name.split(".")))


def scheme_of_dtype(dtype: torch.dtype) -> str | None:
    return next((s for s, d in CODE_DTYPES.items() if d == dtype), None)


def wan_config(transformer_config: dict, task: str, smoothing: bool) -> dict:
    """The checkpoint's config.json: Wan2.1's own keys from diffusers' transformer config, the task, and
    ``quant_method: advanced_ptq`` exactly when the checkpoint holds affine_norm smoothing vectors."""
    c = transformer_config
    heads = int(c["num_attention_heads"])
    out = {
        "_class_name": "WanModel",
        "model_type": task,
        "dim": heads * int(c["attention_head_dim"]),
        "ffn_dim": int(c["ffn_dim"]),
        "num_heads": heads,
        "num_layers": int(c["num_layers"]),
        "in_dim": int(c["in_channels"]),
        "out_dim": int(c["out_channels"] or c["in_channels"]),
        "freq_dim": int(c["freq_dim"]),
        "text_len": WAN_TEXT_LEN,
        "eps": float(c["eps"]),
    }
    if smoothing:
        out["quant_method"] = ADVANCED_PTQ
    return out


def check_wan_config(cfg: object) -> list[str]:
    """Problems with a checkpoint config.json, one line each."""
    if not isinstance(cfg, dict):
        return ["config.json is not a JSON object"]
    problems = [f"config.json lacks '{k}'" for k in (*WAN_CONFIG_KEYS, "model_type") if k not in cfg]
    if problems:
        return problems
    if cfg["model_type"] not in ("t2v", "i2v"):
        problems.append(f"config.json model_type={cfg['model_type']!r} is not valid; valid: t2v, i2v")
    for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim"):
        if not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] <= 0:
            problems.append(f"config.json {k}={cfg[k]!r} must be a positive integer")
    if not problems and cfg["dim"] % cfg["num_heads"]:
        problems.append(f"config.json dim={cfg['dim']} is not a multiple of num_heads={cfg['num_heads']}")
    if cfg.get("quant_method") not in (None, ADVANCED_PTQ):
        problems.append(f"config.json quant_method={cfg['quant_method']!r} is not valid; valid: {ADVANCED_PTQ} or absent")
    return problems


def diffusers_config(wan_cfg: dict, text_dim: int = WAN_TEXT_DIM, image_dim: int = WAN_IMAGE_DIM,
                     patch_size: tuple[int, ...] = (1, 2, 2)) -> dict:
    """Arguments of diffusers' WanTransformer3DModel for a Wan2.1 config.json. Wan2.1 fixes text_dim, the
    CLIP width and the patch; they can be read off tensor shapes for other (tiny) models."""
    i2v = wan_cfg["model_type"] == "i2v"
    dim, heads = wan_cfg["dim"], wan_cfg["num_heads"]
    return dict(
        patch_size=tuple(patch_size), num_attention_heads=heads, attention_head_dim=dim // heads,
        in_channels=wan_cfg["in_dim"], out_channels=wan_cfg["out_dim"], text_dim=text_dim,
        freq_dim=wan_cfg["freq_dim"], ffn_dim=wan_cfg["ffn_dim"], num_layers=wan_cfg["num_layers"],
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=float(wan_cfg["eps"]),
        image_dim=image_dim if i2v else None, added_kv_proj_dim=dim if i2v else None,
    )


def meta_transformer(diffusers_kwargs: dict):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel(**diffusers_kwargs)


@dataclass(frozen=True)
class Expected:
    kind: str  # "codes" | "scale" | "float" | "smooth" | "lowbit" (a low-bit scheme's tensor: exactly ``dtype``)
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None


def quantized_linears(model: torch.nn.Module) -> list[str]:
    """Native names of every quantized linear (lightx2v's quantized mode quantizes every block linear)."""
    return [t.native_name for t in adapter_for(model).quant_targets(model, LayerSelection())]


def expected_tensors(diffusers_kwargs: dict, smoothing: bool, lowbit: str | None = None) -> dict[str, Expected]:
    """Every tensor of a lightx2v checkpoint for this architecture: native name -> kind and shape. ``lowbit``: the
    low-bit scheme (lightx2v's name) whose tensors each block linear holds instead of int8/fp8 codes and scales."""
    from .lightx2v_lowbit_read import expected_linear

    model = meta_transformer(diffusers_kwargs)
    adapter = adapter_for(model)
    linears = set(quantized_linears(model))
    out: dict[str, Expected] = {}
    for key, t in model.state_dict().items():
        name = adapter.native_key(key)
        prefix, _, leaf = name.rpartition(".")
        if prefix in linears and leaf == "weight" and lowbit is not None:
            for suffix, (dtype, shape) in expected_linear(lowbit, *t.shape).items():
                out[f"{prefix}.{suffix}"] = Expected("lowbit", shape, dtype)
        elif prefix in linears and leaf == "weight":
            out[name] = Expected("codes", tuple(t.shape))
            out[f"{prefix}.weight_scale"] = Expected("scale", (t.shape[0], 1))
        else:
            out[name] = Expected("float", tuple(t.shape))
    if smoothing:
        dim = diffusers_kwargs["num_attention_heads"] * diffusers_kwargs["attention_head_dim"]
        for i in range(diffusers_kwargs["num_layers"]):
            for vec in SMOOTH_VECTORS:
                for leaf in ("weight", "bias"):
                    out[f"blocks.{i}.{vec}.{leaf}"] = Expected("smooth", (dim,))
    return out


def run_configs(scheme: str, ckpt_dir: str, smoothing: bool) -> dict[str, dict]:
    """Ready lightx2v run-config fragments (merge into a Wan2.1 run config whose model_path is the
    original Wan2.1 folder): the current API and the ``mm_config`` form lightx2v read from 2025-06-16 to
    2025-10-17 (which loads a folder only through its ``*.index.json``: the exporter writes one for every layout)."""
    extra = {"quant_method": ADVANCED_PTQ} if smoothing else {}
    if scheme not in SCHEMES:  # a low-bit scheme: named as such; the pre-2025-10 mm_config API had none of them
        return {"lightx2v_config.json": {"dit_quantized": True, "dit_quant_scheme": scheme,
                                         "dit_quantized_ckpt": ckpt_dir, **extra}}
    return {
        "lightx2v_config.json": {"dit_quantized": True, "dit_quant_scheme": f"{scheme}-vllm",
                                 "dit_quantized_ckpt": ckpt_dir, **extra},
        "lightx2v_config_pre2025-10.json": {"dit_quantized_ckpt": ckpt_dir,
                                            "mm_config": {"mm_type": LEGACY_MM_TYPE[scheme]}, **extra},
    }
