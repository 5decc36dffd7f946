"""Wan's elementwise ops around its quantized linears: one eager twin and one fused path each.

The eager twins are diffusers' `WanTransformerBlock` / `WanAttnProcessor` op sequences, op for op: the
modulated norm output, the cross-attention norm's cast, the FFN's tanh-GELU, the gated residual update and the
rotary embedding. On CUDA each runs as one Triton kernel (vqx.quant.kernels), fused with the activation
quantization of the linears that read its output where there are any, and only after the kernel matched its
twin bit for bit on this device (vqx.quant.fastpath: the check machinery, ``VQX_QUANT_IMPL``); elsewhere the
twin runs. The fused block (fused.py) says where Wan applies them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...quant import fastpath as fp
from ...quant.fastpath import QuantSpec

# ----------------------------------------------------------------------------------------------------
# eager twins (diffusers' arithmetic)


def modulate_eager(n: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (n * (1 + scale) + shift).to(dtype)


def gelu_eager(y: torch.Tensor) -> torch.Tensor:
    return F.gelu(y, approximate="tanh")


def gated_residual_eager(h: torch.Tensor, a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (h.float() + a.float() * gate).type_as(h)


def rope_eager(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan apply_rotary_emb (WanAttnProcessor), op for op: x [B, S, H, D], freqs [1, S, 1, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


# ----------------------------------------------------------------------------------------------------
# fused paths (activation kernel prologues: 1 modulate, 2 cast, 3 tanh-GELU; see kernels.act_kernel)


def _check_pre(kind: str, pre: int, kdim: int, dtype, device, spec: QuantSpec | None):
    """Check a fused pre-op kernel (modulate / cast) against its twin: h, and the quantized output."""
    def check():
        g = torch.Generator().manual_seed(1)
        rows = 24
        n = torch.randn(rows, kdim, generator=g) * 3
        n[1] = 0
        n[2, 5] = float("nan")
        n[3] *= 1e-30
        n[4] *= 1e30
        n[5] *= 1e-39  # fp32 subnormals: flushing them to zero anywhere would show
        sc = torch.randn(1, kdim, generator=g) * 0.5
        sh = torch.randn(1, kdim, generator=g) * 0.5
        sh[:, : kdim // 2] = 0  # so the subnormal products reach the output
        n, sc, sh = n.to(device), sc.to(device), sh.to(device)
        h_want = modulate_eager(n, sc, sh, dtype) if pre == 1 else n.to(dtype)
        mod = dict(scale=sc, shift=sh) if pre == 1 else {}
        # h through the h-storing specialization, the quantization through the one real calls use
        h_got, _, _ = fp.run_act(n, pre=pre, spec=None, store_h=True, rows_per_batch=rows, out_dtype=dtype, **mod)
        ok = fp.bits_equal(h_got, h_want)
        if spec is not None:
            _, q, sx = fp.run_act(n, pre=pre, spec=spec, store_h=False, rows_per_batch=rows, out_dtype=dtype, **mod)
            ok = ok and fp.same_quantization(fp.pack(q, sx, h_want.shape, dtype, spec), fp.quantize_eager(h_want, spec))
        return ok, {"rows": rows}
    return check


def _fused_pre(kind: str, pre: int, n: torch.Tensor, dtype, spec: QuantSpec | None, scale=None, shift=None):
    """Shared by `modulate` and `cast`: (h, None) or (None, quantized) from the kernel, or None (eager)."""
    if not (fp.wants_triton(n) and fp.dtype_id(dtype) is not None and n.dtype == torch.float32 and n.numel() > 0):
        return None
    if spec is not None and fp.grid_id(spec) is None:
        return None
    kdim = n.shape[-1]
    rows_per_batch = n.numel() // kdim
    if scale is not None:
        if n.dim() != 3 or scale.dim() != 3 or scale.shape[1] != 1:
            return None
        rows_per_batch = n.shape[1]
        scale = scale.reshape(scale.shape[0], kdim)
        shift = shift.reshape(shift.shape[0], kdim)
        if scale.stride(-1) != 1 or shift.stride(-1) != 1 or scale.stride(0) != shift.stride(0):
            scale, shift = scale.contiguous(), shift.contiguous()

    def launch():
        h, q, sx = fp.run_act(fp.as_rows(n), pre=pre, spec=spec, store_h=spec is None, scale=scale, shift=shift,
                              rows_per_batch=rows_per_batch, out_dtype=dtype)
        return (h.reshape(n.shape), None) if spec is None else (None, fp.pack(q, sx, n.shape, dtype, spec))

    return fp.fast((kind, n.device.type, kdim, dtype, *fp.spec_key(spec)),
                   _check_pre(kind, pre, kdim, dtype, n.device, spec), launch)


def modulate(n: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype,
             spec: QuantSpec | None = None):
    """Wan's modulated norm output ``(n * (1 + scale) + shift).to(dtype)`` (n fp32 [B, L, D], scale/shift
    [B, 1, D]). With ``spec``: returns (None, its quantization) from one fused pass when a kernel serves,
    else (h, None) and the caller quantizes h. Without: (h, None)."""
    fused = _fused_pre("modulate", 1, n, dtype, spec, scale, shift)
    if fused is not None:
        return fused
    return modulate_eager(n, scale, shift, dtype), None


def cast(n: torch.Tensor, dtype: torch.dtype, spec: QuantSpec | None = None):
    """``n.to(dtype)`` (the cross-attention norm's output), optionally fused with its quantization."""
    fused = _fused_pre("cast", 2, n, dtype, spec)
    if fused is not None:
        return fused
    return n.to(dtype), None


def _all_bf16_rows(device: torch.device, kdim: int) -> tuple[torch.Tensor, int]:
    """Every bf16 value, zero-padded into rows of ``kdim``; and how many values that is."""
    x = fp.all_bf16().to(device)
    pad = (-x.numel()) % kdim
    return torch.cat([x, torch.zeros(pad, dtype=x.dtype, device=device)]).reshape(-1, kdim), x.numel()


def _gelu_variant(device: torch.device, kdim: int) -> int | None:
    """The kernel GELU variant equal to F.gelu(tanh) on every bf16 input on this device, or None (each variant's
    check runs once; `fp.kernel_ok` remembers it)."""
    for variant in (0, 1):
        def check(variant=variant):
            x, count = _all_bf16_rows(device, kdim)
            h, _, _ = fp.run_act(x, pre=3, spec=None, store_h=True, gelu_variant=variant, out_dtype=torch.bfloat16)
            return fp.bits_equal(h, gelu_eager(x)), {"inputs": f"{count} bf16 values"}
        # Not strict: a variant that differs is expected (at most one matches).
        if fp.kernel_ok(("gelu", device.type, kdim, variant), check, strict=False):
            return variant
    return None


def gelu_quantize(y: torch.Tensor, spec: QuantSpec):
    """``quantize(F.gelu(y, approximate="tanh"))`` in one pass, or None when no exact kernel serves (the
    caller then runs the GELU and quantizes separately). bf16 only: fp32 GELU has too many inputs to check."""
    if not (fp.wants_triton(y) and y.dtype == torch.bfloat16 and fp.grid_id(spec) is not None and y.numel() > 0):
        return None
    kdim = y.shape[-1]
    variant = _gelu_variant(y.device, kdim)
    if variant is None:
        return None
    # the quantizer part is `quantize_act`'s: check it the same way
    if not fp.kernel_ok(("quant", y.device.type, kdim, y.dtype, *fp.spec_key(spec)),
                        fp.check_act_quant(kdim, spec, y.dtype, y.device, 0)):
        return None

    def check():
        g = torch.Generator().manual_seed(2)
        x = (torch.randn(16, kdim, generator=g) * 3).to(torch.bfloat16).to(y.device)
        _, q, sx = fp.run_act(x, pre=3, spec=spec, store_h=False, gelu_variant=variant, out_dtype=torch.bfloat16)
        want = fp.quantize_eager(gelu_eager(x), spec)
        return fp.same_quantization(fp.pack(q, sx, x.shape, x.dtype, spec), want), {"rows": 16}

    def launch():
        _, q, sx = fp.run_act(fp.as_rows(y), pre=3, spec=spec, store_h=False, gelu_variant=variant, out_dtype=y.dtype)
        return fp.pack(q, sx, y.shape, y.dtype, spec)

    return fp.fast(("gelu_quant", y.device.type, kdim, y.dtype, *fp.spec_key(spec), variant), check, launch)


def gated_residual(h: torch.Tensor, a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``(h.float() + a.float() * gate).type_as(h)``; h, a [B, L, D], gate fp32 [B, 1, D]."""
    if (fp.wants_triton(h, a) and fp.dtype_id(h.dtype) is not None and fp.dtype_id(a.dtype) is not None
            and h.dim() == 3 and h.shape == a.shape
            and gate.dtype == torch.float32 and gate.dim() == 3 and gate.shape[1] == 1
            and h.is_contiguous() and a.is_contiguous() and h.numel() > 0):
        kdim = h.shape[-1]

        def check():
            g = torch.Generator().manual_seed(3)
            hh = torch.randn(1, 8, kdim, generator=g) * 4
            aa = torch.randn(1, 8, kdim, generator=g) * 4
            hh[0, 0], aa[0, 0] = 0, aa[0, 0] * 1e-38  # subnormal products
            hh, aa = hh.to(h.dtype).to(h.device), aa.to(a.dtype).to(h.device)
            gg = torch.randn(1, 1, kdim, generator=g).to(h.device)
            return fp.bits_equal(_residual_triton(hh, aa, gg), gated_residual_eager(hh, aa, gg)), {}

        out = fp.fast(("gated_residual", h.device.type, kdim, h.dtype, a.dtype), check,
                      lambda: _residual_triton(h, a, gate))
        if out is not None:
            return out
    return gated_residual_eager(h, a, gate)


def _residual_triton(h, a, gate):
    k = fp.triton_kernels()
    b, length, kdim = h.shape
    g = gate.reshape(gate.shape[0], kdim)
    if g.stride(-1) != 1:
        g = g.contiguous()
    out = torch.empty_like(h)
    block = fp.next_pow2(kdim)
    k.gated_residual_kernel[(b * length,)](
        fp.as_bits(h), fp.as_bits(a), g, fp.as_bits(out), kdim, length if gate.shape[0] > 1 else b * length,
        g.stride(0) if gate.shape[0] > 1 else 0, DT=fp.dtype_id(h.dtype), A_DT=fp.dtype_id(a.dtype), BLOCK=block,
        **fp.launch_opts(block))
    return out


def rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """`rope_eager` in one pass over ``x`` (the eager ops make six, with fp32 temporaries)."""
    if (fp.wants_triton(x, freqs_cos, freqs_sin) and fp.dtype_id(x.dtype) is not None and x.dim() == 4
            and x.is_contiguous() and x.numel() > 0 and x.shape[-1] % 2 == 0
            and freqs_cos.dtype == freqs_sin.dtype == torch.float32
            and freqs_cos.shape == freqs_sin.shape == (1, x.shape[1], 1, x.shape[3])
            and freqs_cos.is_contiguous() and freqs_sin.is_contiguous()):
        heads, dim = x.shape[2], x.shape[3]

        def check():
            g = torch.Generator().manual_seed(5)
            xx = fp.probe_rows(heads * dim, x.dtype, "cpu", seed=5)[:64].reshape(1, -1, heads, dim)
            n = xx.shape[1]
            ang = torch.randn(1, n, 1, dim, generator=g) * 100
            ang[0, 0] = 0  # cos 1, sin 0: the identity rows
            ang[0, -1] = 2.5  # negative cos: signed zeros of the all-zero padding row
            cc, ss = ang.cos().to(x.device), ang.sin().to(x.device)
            cc[0, 1], ss[0, 1] = 1e-39, -1e-39  # subnormal factors
            xx = xx.to(x.device)
            return fp.bits_equal(_rope_triton(xx, cc, ss), rope_eager(xx, cc, ss)), {}

        out = fp.fast(("rope", x.device.type, heads, dim, x.dtype), check,
                      lambda: _rope_triton(x, freqs_cos, freqs_sin))
        if out is not None:
            return out
    return rope_eager(x, freqs_cos, freqs_sin)


def _rope_triton(x, freqs_cos, freqs_sin):
    k = fp.triton_kernels()
    b, s, heads, dim = x.shape
    out = torch.empty_like(x)
    block = fp.next_pow2(heads * dim // 2)
    k.rope_kernel[(b * s,)](fp.as_bits(x), freqs_cos, freqs_sin, fp.as_bits(out), s, heads * dim, dim,
                            DT=fp.dtype_id(x.dtype), BLOCK=block, **fp.launch_opts(block))
    return out
