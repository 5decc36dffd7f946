"""One Wan2.1 block computed the way lightx2v computes it, from native checkpoint tensors.

Written from lightx2v's source (docs/lightx2v-contract.md §3, §5), independently of vqx's fake quant:
- the loader casts every floating tensor to bf16 and recasts ``weight_scale`` to fp32;
- each quantized linear quantizes its input per token, dynamically and symmetrically (absmax/127 or
  absmax/448 per row), multiplies codes with ``torch._int_mm`` (int32 accumulate) or ``torch._scaled_mm``
  (fp8, fp32 accumulate), scales by ``sx * weight_scale`` and adds the bias, output bf16;
- with advanced_ptq, the modulated LayerNorms read the smoothing vectors: h = LN(x)(1+scale)a + shift b.
Both GEMMs run on CPU in torch >= 2.4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.numbers import div_exact
from . import contract

BF16 = torch.bfloat16


def loader_cast(tensors: dict[str, torch.Tensor], code_keys: set[str]) -> dict[str, torch.Tensor]:
    """What lightx2v holds after loading: codes as stored, scales fp32, every other float tensor bf16."""
    out = {}
    for k, t in tensors.items():
        if k in code_keys:
            out[k] = t
        elif k.endswith(".weight_scale"):
            out[k] = t.to(BF16).float()
        elif t.is_floating_point():
            out[k] = t.to(BF16)
        else:
            out[k] = t
    return out


def quant_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor,
                 scheme: str) -> torch.Tensor:
    """y = (quant(x) @ weight.T) * sx * weight_scale.T + bias, per-token dynamic activations; bf16 out."""
    shape = x.shape
    xf = x.reshape(-1, shape[-1]).float()
    qmax = contract.CODE_QMAX[scheme]
    amax = xf.abs().amax(dim=-1, keepdim=True)
    sx = torch.where(amax > 0, div_exact(amax, qmax), torch.ones_like(amax))
    if scheme == "int8":
        xq = torch.clamp(torch.round(xf / sx), -128, 127).to(torch.int8)
        acc = torch._int_mm(xq, weight.t())
        y = (acc.float() * sx * weight_scale.t() + bias.float()).to(BF16)
    else:
        xq = torch.clamp(xf / sx, -448.0, 448.0).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=weight_scale.t(), bias=bias.to(BF16),
                             out_dtype=BF16)
    return y.reshape(*shape[:-1], -1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (Wan's complex rope). x [L, H, d]; cos/sin [L, 1, d], pairs interleaved."""
    xf = x.float().unflatten(-1, (-1, 2))
    c, s = cos[..., 0::2].float(), sin[..., 0::2].float()
    out = torch.stack([xf[..., 0] * c - xf[..., 1] * s, xf[..., 0] * s + xf[..., 1] * c], dim=-1)
    return out.flatten(-2).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Lq, H, d], k/v [Lk, H, d] -> [Lq, H*d]."""
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    return o[0].transpose(0, 1).flatten(1)


def block_forward(t: dict[str, torch.Tensor], index: int, x: torch.Tensor, temb: torch.Tensor,
                  context: torch.Tensor, context_img: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  num_heads: int, eps: float, scheme: str) -> torch.Tensor:
    """Block ``index`` on one sample: x [L, D] bf16, temb [6, D] fp32 (time projection), context [Lc, D],
    context_img [Li, D] (I2V), cos/sin [L, 1, head_dim]. ``t`` holds the block's tensors after `loader_cast`."""
    p = f"blocks.{index}."
    dim = x.shape[-1]
    head_dim = dim // num_heads

    def mm(h, name):
        return quant_linear(h, t[p + name + ".weight"], t[p + name + ".weight_scale"], t[p + name + ".bias"], scheme)

    def modulated(h, vec, shift, scale):
        n = F.layer_norm(h.float(), (dim,), eps=eps)
        if p + vec + ".weight" in t:  # advanced_ptq smoothing vectors
            return (n * ((1 + scale) * t[p + vec + ".weight"].float()) + shift * t[p + vec + ".bias"].float()).to(BF16)
        return (n * (1 + scale) + shift).to(BF16)

    shift, scale, gate, c_shift, c_scale, c_gate = (t[p + "modulation"].float()[0] + temb.float()).chunk(6, dim=0)

    # self-attention
    h = modulated(x, "affine_norm1", shift, scale)
    q = rms_norm(mm(h, "self_attn.q"), t[p + "self_attn.norm_q.weight"], eps).view(-1, num_heads, head_dim)
    k = rms_norm(mm(h, "self_attn.k"), t[p + "self_attn.norm_k.weight"], eps).view(-1, num_heads, head_dim)
    v = mm(h, "self_attn.v").view(-1, num_heads, head_dim)
    o = attention(rope(q, cos, sin), rope(k, cos, sin), v)
    x = (x.float() + mm(o, "self_attn.o").float() * gate).to(BF16)

    # cross-attention (native norm3 is the affine LayerNorm before it)
    h = F.layer_norm(x.float(), (dim,), t[p + "norm3.weight"].float(), t[p + "norm3.bias"].float(), eps).to(BF16)
    q = rms_norm(mm(h, "cross_attn.q"), t[p + "cross_attn.norm_q.weight"], eps).view(-1, num_heads, head_dim)
    k = rms_norm(mm(context, "cross_attn.k"), t[p + "cross_attn.norm_k.weight"], eps).view(-1, num_heads, head_dim)
    v = mm(context, "cross_attn.v").view(-1, num_heads, head_dim)
    o = attention(q, k, v)
    if context_img is not None:
        k_img = rms_norm(mm(context_img, "cross_attn.k_img"), t[p + "cross_attn.norm_k_img.weight"], eps)
        v_img = mm(context_img, "cross_attn.v_img")
        o = o + attention(q, k_img.view(-1, num_heads, head_dim), v_img.view(-1, num_heads, head_dim))
    x = x + mm(o, "cross_attn.o")

    # feed-forward
    h = modulated(x, "affine_norm3", c_shift, c_scale)
    y = mm(F.gelu(mm(h, "ffn.0"), approximate="tanh"), "ffn.2")
    return (x.float() + y.float() * c_gate).to(BF16)
