"""The numeric check of a lightx2v export: for random block inputs, each block computed (a) the way lightx2v
computes it from the exported files (`lightx2v_math`) and (b) by the fake-quant diffusers block: the evaluated
model's own block when the exporter calls this, else a diffusers block rebuilt from config.json with the exported
float tensors and QuantLinears made from the exported codes and scales. The error is relative to the block's
update (output - input, which is what quantization changes), and must stay within the tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models.adapter import adapter_for, set_submodule
from ..quant.linear import QuantLinear
from ..runtime import resolve_device, torch_dtype
from . import contract, lightx2v_math
from .checks import Report, TensorFiles, names

# Max relative error of a block's update between lightx2v's GEMMs and the fake-quant block. The two differ
# by rounding order only (one bf16 rounding of an fp32-accumulated GEMM vs bf16 dequantized operands), but a
# tiny difference in front of the next per-token quantizer flips some codes, so a correct export measures
# 0.015-0.04 (tiny and 1.3B-wide blocks, int8 and fp8). Export bugs measure 0.17 (one bias dropped) to 0.9+
# (smoothing vectors missing or inverted, q/k swapped).
DEFAULT_TOLERANCE = 0.1
GRID = (2, 4, 6)  # latent frames, height, width after patching: 48 tokens
TEXT_TOKENS_T2V = 64  # T2V cross-attention accepts any context length; I2V needs Wan's 512
IMAGE_TOKENS = 32  # > 16: torch._int_mm on CUDA needs more than 16 rows
@dataclass
class BlockInputs:
    x: torch.Tensor  # [1, L, D] bf16
    temb: torch.Tensor  # [1, 6, D] fp32
    context: torch.Tensor  # [1, Lc, D] bf16
    context_img: torch.Tensor | None  # [1, Li, D] bf16
    cos: torch.Tensor  # [1, L, 1, head_dim]
    sin: torch.Tensor

    def to(self, device) -> "BlockInputs":
        return BlockInputs(*(None if t is None else t.to(device) for t in
                             (self.x, self.temb, self.context, self.context_img, self.cos, self.sin)))


def block_inputs(dkw: dict, seed: int, text_len: int) -> BlockInputs:
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    dim = dkw["num_attention_heads"] * dkw["attention_head_dim"]
    i2v = dkw.get("added_kv_proj_dim") is not None
    g = torch.Generator().manual_seed(seed)
    f, h, w = GRID
    x = torch.randn(1, f * h * w, dim, generator=g).to(torch.bfloat16)
    temb = torch.randn(1, 6, dim, generator=g) * 0.5
    context = torch.randn(1, text_len if i2v else min(text_len, TEXT_TOKENS_T2V), dim, generator=g).to(torch.bfloat16)
    context_img = torch.randn(1, IMAGE_TOKENS, dim, generator=g).to(torch.bfloat16) if i2v else None
    pt, ph, pw = dkw["patch_size"]
    rope = WanRotaryPosEmbed(dkw["attention_head_dim"], dkw["patch_size"], 1024)
    cos, sin = rope(torch.empty(1, 1, f * pt, h * ph, w * pw, device="meta"))
    return BlockInputs(x, temb, context, context_img, cos.float(), sin.float())


def run_diffusers_block(block: torch.nn.Module, inp: BlockInputs) -> torch.Tensor:
    device = next(block.parameters()).device
    i = inp.to(device)
    ctx = i.context if i.context_img is None else torch.cat([i.context_img, i.context], dim=1)  # image tokens first
    return block(i.x, ctx, i.temb, (i.cos, i.sin)).float().cpu()


class RebuiltTransformer:
    """diffusers' WanTransformer3DModel from config.json (meta device), materialized one block at a time from
    the export: float tensors as stored, quantized linears as QuantLinears of the exported codes and scales."""

    def __init__(self, tf: TensorFiles, dkw: dict, fmt, model_dtype: torch.dtype, report: Report):
        from diffusers import WanTransformer3DModel

        self.tf, self.fmt, self.dtype = tf, fmt, model_dtype
        self.keep_fp32 = set(WanTransformer3DModel._keep_in_fp32_modules)
        self.model = contract.meta_transformer(dkw)
        self.adapter = adapter_for(self.model)
        to_diffusers = self.adapter.diffusers_key
        rest = {to_diffusers(k): self._cast(to_diffusers(k), tf.get(k)) for k in tf.where if not k.startswith("blocks.")}
        result = self.model.load_state_dict(rest, strict=False, assign=True)
        missing = [k for k in result.missing_keys if not k.startswith("blocks.")]
        if missing or result.unexpected_keys:
            report.problems.append(f"non-block tensors do not map back onto diffusers' model: missing {names(missing)}, "
                                   f"unexpected {names(result.unexpected_keys)}")

    def _cast(self, diffusers_name: str, t: torch.Tensor) -> torch.Tensor:
        keep = self.keep_fp32.intersection(diffusers_name.split("."))
        return t.to(torch.float32 if keep else self.dtype)

    def block(self, index: int) -> torch.nn.Module:
        p = f"blocks.{index}."
        keys = [k for k in self.tf.where if k.startswith(p)]
        native = {k: self.tf.get(k) for k in keys}
        linears = {f"{p}{n}": local for local, n in self.adapter.block_linears(self.model).items()}
        state, smooth = {}, {}
        for k, t in native.items():
            rest = k[len(p):]
            if rest.startswith("affine_norm"):
                smooth[rest.split(".")[0]] = t.float()
                continue
            if k.endswith(".weight_scale"):
                continue
            name = self.adapter.diffusers_key(k)[len(p):]
            prefix = k.rpartition(".")[0]
            if prefix in linears and k.endswith(".weight"):  # dequantized exactly as QuantLinear does
                t = (t.float() * native[prefix + ".weight_scale"].float()).to(self.dtype)
            else:
                t = self._cast(name, t)
            state[name] = t
        block = self.adapter.blocks(self.model)[index]
        block.load_state_dict(state, strict=True, assign=True)
        folds = {n: g.fold for g in self.adapter.input_groups(self.model) if g.kind == "runtime" for n in g.linears}
        for prefix, local in linears.items():
            q = QuantLinear(block.get_submodule(local), self.fmt, native[prefix + ".weight"].float(),
                            native[prefix + ".weight_scale"].float())
            if folds.get(local) in smooth:  # the exact 1/s vector, as the evaluated QuantLinear held it
                del q.input_smooth_inv
                q.register_buffer("input_smooth_inv", smooth[folds[local]].contiguous())
            set_submodule(block, local, q)
        return block

    def release(self, index: int) -> None:
        self.adapter.blocks(self.model)[index].to_empty(device="meta")


def _model_dtype(manifest: dict) -> torch.dtype:
    name = ((manifest.get("run_config") or {}).get("model") or {}).get("dtype", "bfloat16")
    return torch_dtype(name, default=torch.bfloat16)


def relative_update_error(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> float:
    """||out - ref|| / ||ref - x||: the difference relative to what the block adds to its input."""
    out, ref, x = out.float().reshape(-1), ref.float().reshape(-1), x.float().reshape(-1)
    denom = (ref - x).norm()
    err = (out - ref).norm()
    return float(err / denom) if denom > 0 else float(err)


def spread(n: int, k: int | None) -> list[int]:
    """``k`` block indices evenly spread over ``n`` (first and last included); all when k is None or >= n."""
    if k is None or k >= n:
        return list(range(n))
    if k <= 1:
        return [0]
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def _lightx2v_block(tensors: dict, i: int, inp: BlockInputs, wan_cfg: dict, scheme: str, device) -> torch.Tensor:
    t = {k: v.to(device) for k, v in tensors.items()}
    d = inp.to(device)
    out = lightx2v_math.block_forward(
        t, i, d.x[0], d.temb[0], d.context[0], None if d.context_img is None else d.context_img[0], d.cos[0], d.sin[0],
        wan_cfg["num_heads"], float(wan_cfg["eps"]), scheme)
    return out.float().cpu()


def compare_blocks(tf: TensorFiles, wan_cfg: dict, dkw: dict, scheme: str, manifest: dict, report: Report,
                    seed: int, reference: torch.nn.Module | None, device: str | None,
                    max_blocks: int | None) -> None:
    fmt = contract.LIGHTX2V_SCHEMES[scheme]
    inp = block_inputs(dkw, seed, int(wan_cfg["text_len"]))
    rebuilt = None if reference is not None else RebuiltTransformer(tf, dkw, fmt, _model_dtype(manifest), report)
    if report.problems:
        return
    if device in (None, "auto") and reference is not None:
        dev = next(reference.parameters()).device
    else:
        dev = resolve_device(device or "auto", "--device=")
    n = wan_cfg["num_layers"]
    code_keys = {f"{name}.weight" for name in contract.quantized_linears(contract.meta_transformer(dkw))}
    for i in tqdm(spread(n, max_blocks), desc="verify", unit="block", leave=False):
        tensors = lightx2v_math.loader_cast({k: tf.get(k) for k in tf.where if k.startswith(f"blocks.{i}.")}, code_keys)
        try:
            ours = _lightx2v_block(tensors, i, inp, wan_cfg, scheme, dev)
        except RuntimeError as e:  # e.g. fp8 _scaled_mm needs sm89+: the same math on CPU
            if dev.type == "cpu":
                raise
            report.notes.append(f"lightx2v's {scheme} GEMMs do not run on {dev} ({str(e).splitlines()[0][:120]}); "
                                f"compared on CPU")
            dev = torch.device("cpu")
            ours = _lightx2v_block(tensors, i, inp, wan_cfg, scheme, dev)
        if reference is not None:
            theirs = run_diffusers_block(adapter_for(reference).blocks(reference)[i], inp)
        else:
            theirs = run_diffusers_block(rebuilt.block(i).to(dev), inp)
            rebuilt.release(i)
        err = relative_update_error(ours, theirs[0], inp.x[0])
        report.block_errors[i] = err
        if not math.isfinite(err) or err > report.tolerance:
            report.problems.append(f"blocks.{i}: lightx2v's math on the exported tensors differs from the fake-quant "
                                   f"block by {err:.3g} (relative to the block's update; tolerance {report.tolerance:g})")
