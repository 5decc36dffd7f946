"""Wan2.1 computed the way lightx2v computes it, from native checkpoint tensors: one block (`block_forward`,
what `vqx verify-export` checks) or the whole transformer (`model_forward`, tested against outputs of
lightx2v's own model code in tests/data/lightx2v).

Written from lightx2v's source (ModelTC/LightX2V f8aee98: WanPreInfer, WanTransformerInfer, WanPostInfer with
``torch_sdpa`` attention, ``torch_complex_rope``, torch LayerNorm and modulate, the sgl-kernel RMSNorm's torch
fallback; docs/lightx2v-contract.md §3, §5), independently of vqx's fake quant:
- the loader casts every floating tensor to lightx2v's dtype and recasts ``weight_scale`` to fp32;
- ``dtype`` is lightx2v's infer dtype, which is also its sensitive-layer dtype (``SENSITIVE_LAYER_DTYPE`` unset):
  bfloat16 in production; float32 is lightx2v with its DTYPE mapped to fp32, the mode verify-export compares in;
- each quantized linear quantizes its input per token, dynamically and symmetrically, multiplies codes with
  ``torch._int_mm`` (int32) or fp8 ``torch._scaled_mm``, scales by ``sx * weight_scale`` and adds the bias.
  ``kernel`` picks whose activation quantizer and epilogue: ``vllm`` (the ``*-vllm`` schemes vqx's run
  configs name, and vqx's kernel backend) or ``torchao`` (the ``*-torchao`` schemes, which run on CPU);
- with advanced_ptq, the modulated LayerNorms read the smoothing vectors: h = LN(x)(1+scale)a + shift b.
Both GEMMs run on CPU in torch >= 2.4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..quant.numbers import div_exact
from . import contract

BF16 = torch.bfloat16
KERNELS = ("vllm", "torchao")


def loader_cast(tensors: dict[str, torch.Tensor], code_keys: set[str], dtype: torch.dtype = BF16,
                ) -> dict[str, torch.Tensor]:
    """What lightx2v holds after loading: codes as stored, scales fp32 (cast through ``dtype`` first), every
    other float tensor in ``dtype``."""
    out = {}
    for k, t in tensors.items():
        if k in code_keys:
            out[k] = t
        elif k.endswith(".weight_scale"):
            out[k] = t.to(dtype).float()
        elif t.is_floating_point():
            out[k] = t.to(dtype)
        else:
            out[k] = t
    return out


def act_quant(x: torch.Tensor, scheme: str, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes and scales [M, 1] of rows x [M, K]."""
    if kernel == "torchao" and scheme == "int8":
        # torchao quantize_activation_per_token_absmax: the scale stays in x's dtype (bf16 in production),
        # eps 1e-5, codes round(x * (1/scale)) clamped to +-127.
        sx = torch.clamp(x.abs().amax(dim=-1, keepdim=True) / 127.0, min=1e-5)
        return torch.clamp(torch.round(x * (1.0 / sx)), -127, 127).to(torch.int8), sx
    if kernel == "torchao":
        # lightx2v's act_quant_fp8_perchannel_sym_torchao: x / scale is computed (and rounded) in x's dtype,
        # then cast to e4m3: two roundings in bf16 mode.
        sx = torch.clamp(x.abs().amax(dim=-1, keepdim=True), min=1e-8) / 448.0
        return torch.clamp(x / sx, -448, 448).to(torch.float8_e4m3fn), sx.float()
    xf = x.float()
    qmax = contract.CODE_QMAX[scheme]
    amax = xf.abs().amax(dim=-1, keepdim=True)
    sx = torch.where(amax > 0, div_exact(amax, qmax), torch.ones_like(amax))
    if scheme == "int8":
        return torch.clamp(torch.round(xf / sx), -128, 127).to(torch.int8), sx
    return torch.clamp(xf / sx, -448.0, 448.0).to(torch.float8_e4m3fn), sx


def gemm(xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor,
         scheme: str, kernel: str, dtype: torch.dtype) -> torch.Tensor:
    """(xq @ weight.T) * sx * weight_scale.T + bias of per-token codes xq [M, K] and scales sx [M, 1], in ``dtype``."""
    if scheme == "int8":
        acc = torch._int_mm(xq, weight.t())
        if kernel == "torchao":  # int_scaled_matmul: acc.to(sx.dtype) * sx (bf16 in production), then w_scale fp32
            return ((acc.to(sx.dtype) * sx) * weight_scale.t().float()).to(dtype) + bias
        return (acc.float() * sx * weight_scale.t() + bias.float()).to(dtype)
    if dtype == torch.float32:
        # fp32 mode: exact products, fp32 sums on every device (Hopper's fp8 MMA accumulates with fewer bits)
        return (xq.float() @ weight.float().t()) * sx * weight_scale.t() + bias
    return torch._scaled_mm(xq, weight.t(), scale_a=sx.float(), scale_b=weight_scale.t(), bias=bias.to(dtype),
                            out_dtype=dtype, use_fast_accum=kernel == "torchao")


def quant_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor,
                 scheme: str, kernel: str = "vllm") -> torch.Tensor:
    """y = (quant(x) @ weight.T) * sx * weight_scale.T + bias with per-token dynamic activations, in x's dtype."""
    shape = x.shape
    xq, sx = act_quant(x.reshape(-1, shape[-1]), scheme, kernel)
    return gemm(xq, sx, weight, weight_scale, bias, scheme, kernel, x.dtype).reshape(*shape[:-1], -1)


def quant_linear_pertensor(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           input_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """lightx2v's ``fp8-pertensor`` apply: codes ``clamp(x / input_scale, -448, 448)`` in e4m3 with the calibrated
    fp32 ``input_scale`` [1] (x / a 1-element tensor divides in fp32), then ``torch._scaled_mm`` with per-tensor scales,
    a bf16 bias and fast accumulation; an fp32 model takes the bf16 GEMM and casts back."""
    shape = x.shape
    xq = torch.clamp(x.reshape(-1, shape[-1]) / input_scale.float().reshape(1), -448, 448).to(torch.float8_e4m3fn)
    mm_dtype = torch.bfloat16 if x.dtype == torch.float32 and bias is not None else x.dtype
    y = torch._scaled_mm(xq, weight.t(), scale_a=input_scale.float().reshape(1), scale_b=weight_scale.float().reshape(1),
                         bias=None if bias is None else bias.to(mm_dtype), out_dtype=mm_dtype, use_fast_accum=True)
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def linear(x: torch.Tensor, t: dict, name: str) -> torch.Tensor:
    """lightx2v's float MMWeight: addmm(bias, x, W^T) in x's dtype."""
    return torch.addmm(t[name + ".bias"], x, t[name + ".weight"].t())


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The sgl-kernel RMSNorm's torch fallback (lightx2v's default rms_norm_type without sgl_kernel): in x's dtype."""
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def rope_freqs(head_dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """WanPreInfer's rope table for a (frames, height, width) token grid: [L, 1, head_dim/2] complex64."""
    def params(dim, n=1024, theta=10000):
        f = torch.outer(torch.arange(n), 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim)))
        return torch.polar(torch.ones_like(f), f)

    d, c = head_dim, head_dim // 2
    freqs = torch.cat([params(d - 4 * (d // 6)), params(2 * (d // 6)), params(2 * (d // 6))], dim=1)
    parts = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    table = torch.cat([parts[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                       parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                       parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1)
    return table.reshape(f * h * w, 1, -1)


def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """torch_complex_rope: channel pairs of x [L, H, d] times the complex table, in fp32, back to x's dtype."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * freqs).flatten(-2).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch_sdpa: q [Lq, H, d], k/v [Lk, H, d] -> [Lq, H*d]."""
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    return o[0].transpose(0, 1).flatten(1)


# block_forward's ``scheme`` for a low-bit checkpoint: ``t`` then holds each linear's weight dequantized (fp32 codes x
# scales, `lightx2v_lowbit_read`); a low-bit GEMM multiplies exactly those values with the dequantized activation
# (NVFP4's alpha = 1 / (global scales) and the MX / block scales are factors of the same products), in fp32 here.
LOWBIT = "lowbit"


def block_forward(t: dict[str, torch.Tensor], index: int, x: torch.Tensor, embed0: torch.Tensor,
                  context: torch.Tensor, context_img: torch.Tensor | None, freqs: torch.Tensor,
                  num_heads: int, eps: float, scheme: str, kernel: str = "vllm", lockstep=None) -> torch.Tensor:
    """Block ``index`` on one sample, in x's dtype: x [L, D], embed0 [6, D] (the time projection), context
    [Lc, D] (text tokens), context_img [Li, D] (I2V image tokens), freqs from `rope_freqs`. ``t`` holds the
    block's tensors after `loader_cast` with the same dtype. ``lockstep(name, h)``, when given, returns the
    (codes, scales) each quantized linear multiplies instead of quantizing ``h`` itself (`block_compare`; with
    ``scheme`` LOWBIT the dequantized activation)."""
    p = f"blocks.{index}."
    dim = x.shape[-1]
    n, d = num_heads, dim // num_heads

    def mm(h, name):
        if scheme == LOWBIT:  # dequantized weights; the activation as the lockstep gives it (h: weight-only)
            a = h if lockstep is None else lockstep(name, h)
            return F.linear(a, t[p + name + ".weight"], t[p + name + ".bias"])
        w = (t[p + name + ".weight"], t[p + name + ".weight_scale"], t[p + name + ".bias"])
        if lockstep is None:
            return quant_linear(h, *w, scheme, kernel)
        xq, sx = lockstep(name, h)
        return gemm(xq, sx, *w, scheme, kernel, h.dtype).reshape(*h.shape[:-1], -1)

    def modulated(h, vec, shift, scale):
        out = layer_norm(h, eps)
        if p + vec + ".weight" in t:  # advanced_ptq: LN(x) * ((1 + scale) a) + shift b
            return out * ((1 + scale) * t[p + vec + ".weight"]) + shift * t[p + vec + ".bias"]
        return out * (1 + scale) + shift

    shift, scale, gate, c_shift, c_scale, c_gate = (m.squeeze() for m in (t[p + "modulation"] + embed0).chunk(6, dim=1))

    h = modulated(x, "affine_norm1", shift, scale)
    q = rms_norm(mm(h, "self_attn.q"), t[p + "self_attn.norm_q.weight"], eps).view(-1, n, d)
    k = rms_norm(mm(h, "self_attn.k"), t[p + "self_attn.norm_k.weight"], eps).view(-1, n, d)
    v = mm(h, "self_attn.v").view(-1, n, d)
    x = x + mm(attention(rope(q, freqs), rope(k, freqs), v), "self_attn.o") * gate

    # cross-attention (native norm3 is the affine LayerNorm before it)
    h = layer_norm(x, eps, t[p + "norm3.weight"], t[p + "norm3.bias"])
    q = rms_norm(mm(h, "cross_attn.q"), t[p + "cross_attn.norm_q.weight"], eps).view(-1, n, d)
    k = rms_norm(mm(context, "cross_attn.k"), t[p + "cross_attn.norm_k.weight"], eps).view(-1, n, d)
    o = attention(q, k, mm(context, "cross_attn.v").view(-1, n, d))
    if context_img is not None:
        k_img = rms_norm(mm(context_img, "cross_attn.k_img"), t[p + "cross_attn.norm_k_img.weight"], eps)
        o = o + attention(q, k_img.view(-1, n, d), mm(context_img, "cross_attn.v_img").view(-1, n, d))
    x = x + mm(o, "cross_attn.o")

    h = modulated(x, "affine_norm3", c_shift, c_scale)
    y = mm(F.gelu(mm(h, "ffn.0"), approximate="tanh"), "ffn.2")
    return x + y * c_gate


def sinusoidal(dim: int, t: torch.Tensor) -> torch.Tensor:
    """lightx2v's sinusoidal_embedding_1d (pow(10000, -i/half); diffusers computes exp(-log(10000) i/half))."""
    half = dim // 2
    t = t.to(torch.float32)
    s = torch.outer(t, torch.pow(10000, -torch.arange(half).to(t).div(half)))
    return torch.cat([torch.cos(s), torch.sin(s)], dim=1)


def model_forward(t: dict[str, torch.Tensor], wan_cfg: dict, latents: torch.Tensor, timestep: torch.Tensor,
                  context: torch.Tensor, scheme: str, kernel: str = "vllm", clip: torch.Tensor | None = None,
                  y: torch.Tensor | None = None, dtype: torch.dtype = BF16) -> dict[str, torch.Tensor]:
    """One conditional pass of WanModel.infer: latents [C, F, H, W], timestep [1], context [Lt, text_dim],
    I2V clip [257, image_dim] and y [4 + C, F, H, W]. ``t``: every tensor after `loader_cast`. Returns the flow
    prediction ``out`` [C_out, F, H, W] and the trace (``tokens``, ``temb6``, ``blocks.N``), all fp32."""
    eps, dim, patch = float(wan_cfg["eps"]), int(wan_cfg["dim"]), tuple(t["patch_embedding.weight"].shape[2:])
    x = latents if y is None else torch.cat([latents, y], dim=0)
    x = F.conv3d(x.to(dtype)[None], t["patch_embedding.weight"], t["patch_embedding.bias"], stride=patch)
    grid = tuple(x.shape[2:])
    x = x.flatten(2).transpose(1, 2).squeeze(0).contiguous()
    embed = linear(F.silu(linear(sinusoidal(int(wan_cfg["freq_dim"]), timestep.flatten()).to(dtype), t,
                                 "time_embedding.0")), t, "time_embedding.2")
    embed0 = linear(F.silu(embed), t, "time_projection.1").unflatten(1, (6, dim)).squeeze(0)
    ctx = linear(F.gelu(linear(context.to(dtype), t, "text_embedding.0"), approximate="tanh"), t, "text_embedding.2")
    ctx_img = None
    if clip is not None:  # image projection, LayerNorm eps 1e-6 (diffusers' WanImageEmbedding uses 1e-5)
        c = layer_norm(clip.to(dtype), 1e-6, t["img_emb.proj.0.weight"], t["img_emb.proj.0.bias"])
        c = linear(F.gelu(linear(c, t, "img_emb.proj.1")), t, "img_emb.proj.3")
        ctx_img = layer_norm(c, 1e-6, t["img_emb.proj.4.weight"], t["img_emb.proj.4.bias"])
    trace = {"tokens": x.float(), "temb6": embed0.float()}
    freqs = rope_freqs(dim // int(wan_cfg["num_heads"]), grid).to(x.device)
    for i in range(int(wan_cfg["num_layers"])):
        x = block_forward(t, i, x, embed0, ctx, ctx_img, freqs, int(wan_cfg["num_heads"]), eps, scheme, kernel)
        trace[f"blocks.{i}"] = x.float()
    shift, scale = (t["head.modulation"] + embed.unsqueeze(1)).chunk(2, dim=1)
    x = layer_norm(x, 1e-6) * (1 + scale.squeeze()) + shift.squeeze()
    x = linear(x, t, "head.head")
    c_out = t["head.head.weight"].shape[0] // math.prod(patch)
    x = x[: math.prod(grid)].view(*grid, *patch, c_out)
    out = torch.einsum("fhwpqrc->cfphqwr", x).reshape(c_out, *(g * q for g, q in zip(grid, patch)))
    return {"out": out.float(), **trace}
