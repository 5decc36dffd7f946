"""Activation quantization and the elementwise ops around it: one eager twin and one Triton kernel each.

Which path runs (``VQX_QUANT_IMPL``, or `use_impl`):
- ``auto`` (default): the Triton kernel for CUDA tensors in bf16 or fp32 when triton imports and the kernel
  passed its check on this device (below); the eager twin otherwise: CPU, no triton, fp16, under
  torch.compile (which traces the eager twin and fuses it itself), or a kernel that failed its check.
- ``eager``: always the eager twin (PyTorch ops, the reference arithmetic).
- ``triton``: always the kernel, failing loudly if its check fails (tests; with TRITON_INTERPRET=1 it
  runs on CPU tensors through Triton's interpreter).

The eager twins are the exact op sequences of diffusers' Wan block and of `QuantLinear` (quantizer math
in fp32, `numbers.quantize`). Each kernel is checked once per configuration and device, on its first use,
against its twin on adversarial rows (zeros, ties, outliers, subnormal and huge values, NaN/Inf; the
fused GELU on all 65,536 bf16 inputs): bit for bit, or it is not used. `report()` lists the checks.

Under torch.compile the eager twin is traced. Inductor's Triton division is approximate unless
``TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING=1``; only then are compiled codes the reference codes.
"""

from __future__ import annotations

import functools
import os
import warnings
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .numbers import NumberGrid
from .scheme import TensorScheme, fake_quantize, quantize

IMPLS = ("auto", "eager", "triton")
_impl = os.environ.get("VQX_QUANT_IMPL", "auto")
_checks: dict[tuple, bool] = {}
_report: list[dict] = []
_GELU_VARIANT: dict[str, int | None] = {}  # device -> variant that matches F.gelu on every bf16 input
# Triton's CPU interpreter runs a program per row in Python: there the checks sample every 16th bf16 value.
_BF16_STRIDE = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 1


class QuantizedActivation(NamedTuple):
    """Per-token codes for an 8-bit GEMM: codes [M, K] (int8 / float8_e4m3fn), scale [M, 1] fp32."""

    codes: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size  # the activation's shape (leading dims, K)
    dtype: torch.dtype  # the activation's dtype (the layer's output dtype)


class QuantSpec(NamedTuple):
    """How a linear quantizes its input: its activation scheme, optional 1/s smoothing, and what it needs
    ("fake": the dequantized activation in the model dtype, "codes": a `QuantizedActivation`, per-token
    schemes only), and the calibrated scale of a static scheme."""

    act: TensorScheme
    smooth_inv: torch.Tensor | None
    mode: str
    static_scale: torch.Tensor | None = None

    @property
    def grid(self) -> NumberGrid:
        return self.act.grid_

    @property
    def per_token(self) -> bool:
        """Dynamic per-token scales: what the Triton kernels and the 8-bit GEMMs compute."""
        return self.act.granularity == "token" and self.act.dynamic


@contextmanager
def use_impl(name: str):
    """Temporarily force a path ("auto", "eager", "triton")."""
    global _impl
    if name not in IMPLS:
        raise ValueError(f"unknown quantization impl {name!r}; valid: {', '.join(IMPLS)}")
    old, _impl = _impl, name
    try:
        yield
    finally:
        _impl = old


def report() -> list[dict]:
    """Every kernel check run in this process: configuration, device and whether it matched bit for bit."""
    return list(_report)


# ----------------------------------------------------------------------------------------------------
# eager twins (the reference arithmetic)


def _smooth(x: torch.Tensor, smooth_inv: torch.Tensor | None) -> torch.Tensor:
    return x if smooth_inv is None else (x.float() * smooth_inv).to(x.dtype)


def quantize_eager(x: torch.Tensor, spec: QuantSpec):
    """QuantLinear's activation quantization with the fp32 reference quantizer (`scheme.quantize`)."""
    x = _smooth(x, spec.smooth_inv)
    if spec.mode == "fake":
        return fake_quantize(x, spec.act, spec.static_scale)
    if not spec.per_token:
        raise ValueError(f"activation codes for an 8-bit GEMM are per token; got {spec.act.describe()}")
    codes, scale = quantize(x.reshape(-1, x.shape[-1]), spec.act)
    if spec.grid.storage_dtype == torch.int8:  # int8 cannot hold NaN; the row's NaN scale carries it
        codes = torch.where(torch.isnan(codes), torch.zeros_like(codes), codes)
    k = x.shape[-1]
    return QuantizedActivation(spec.grid.to_storage(codes).reshape(-1, k), scale.reshape(-1, 1), x.shape, x.dtype)


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


def int8_epilogue_eager(acc: torch.Tensor, sx: torch.Tensor, ws_row: torch.Tensor, bias: torch.Tensor | None):
    """lightx2v's int8 epilogue: (acc.float() * sx * weight_scale.T + bias.float()).to(bf16)."""
    y = acc.float() * sx * ws_row
    if bias is not None:
        y = y + bias.to(torch.bfloat16).float()
    return y.to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# dispatch


def _kernels():
    from . import kernels

    return kernels


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        _kernels()
        return True
    except Exception:  # noqa: BLE001 - no triton, or one that cannot load: the eager path serves
        return False


def _dt(dtype: torch.dtype) -> int | None:
    return {torch.bfloat16: 0, torch.float32: 1}.get(dtype)


def _wants_triton(*tensors: torch.Tensor) -> bool:
    if _impl == "eager" or torch.compiler.is_compiling():
        return False
    if _impl == "triton":
        return True
    return all(t.is_cuda for t in tensors) and triton_available()


def _grid_id(spec: QuantSpec) -> int | None:
    """The kernels' grid code, or None when no kernel serves the spec (not int8 / fp8 per token)."""
    return {"int8": 0, "fp8_e4m3": 1}.get(spec.act.grid) if spec.per_token else None


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _launch_opts(block: int) -> dict:
    # About 8-16 fp32 values per thread: a whole row stays in registers (one read of the input).
    # No FMA contraction: a*b+c must round twice, as eager PyTorch does.
    return {"num_warps": 4 if block <= 1024 else 8 if block <= 2048 else 16 if block <= 8192 else 32,
            "enable_fp_fusion": False}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _run_act(x2, *, pre: int, spec: QuantSpec | None, store_h: bool, out_dtype: torch.dtype, scale=None,
             shift=None, rows_per_batch: int = 1, gelu_variant: int = 0):
    """Launch `act_kernel` on rows ``x2`` [M, K]; returns (h or None, q or None, sx or None)."""
    k = _kernels()
    m, kdim = x2.shape
    block = _next_pow2(kdim)
    dev = x2.device
    h = torch.empty((m, kdim), dtype=out_dtype, device=dev) if store_h else None
    q = sx = None
    quant, grid_id, smooth = 0, 0, None
    if spec is not None:
        grid_id = _grid_id(spec)
        smooth = spec.smooth_inv
        if spec.mode == "fake":
            quant, q = 1, torch.empty((m, kdim), dtype=out_dtype, device=dev)
        else:
            quant = 2
            q = torch.empty((m, kdim), dtype=spec.grid.storage_dtype, device=dev)
            sx = torch.empty((m, 1), dtype=torch.float32, device=dev)
    dummy = x2
    qk = q.view(torch.uint8) if q is not None and q.dtype == torch.float8_e4m3fn else q
    k.act_kernel[(m,)](
        _as_bits(x2), x2.stride(0),
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        scale.stride(0) if scale is not None and scale.shape[0] > 1 else 0, rows_per_batch,
        smooth if smooth is not None else dummy,
        _as_bits(h) if h is not None else dummy, kdim,
        _as_bits(qk) if qk is not None else dummy, kdim,
        sx if sx is not None else dummy, kdim,
        PRE=pre, DT=_dt(out_dtype), HAS_SMOOTH=smooth is not None, STORE_H=store_h, QUANT=quant,
        GRID=grid_id, GELU=gelu_variant, BLOCK=block, **_launch_opts(block))
    return h, q, sx


def _pack(q, sx, shape, dtype, spec: QuantSpec):
    if spec.mode == "fake":
        return q.reshape(shape)
    return QuantizedActivation(q, sx, shape, dtype)


def _kernel_ok(key: tuple, check, strict: bool = True) -> bool:
    """Run ``check`` once per key; a failed check disables that kernel (auto) or raises (forced, ``strict``)."""
    if key not in _checks:
        try:
            ok, detail = check()
        except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or run is not used
            ok, detail = False, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        _checks[key] = ok
        _report.append({"kernel": key[0], "config": [str(k) for k in key[1:]], "bit_exact": ok, **detail})
        if not ok:
            msg = f"vqx Triton kernel {key} does not match its eager twin ({detail}); using the eager path"
            if _impl == "triton" and strict:
                raise RuntimeError(msg)
            warnings.warn(msg, stacklevel=3)
    return _checks[key]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bit pattern everywhere, except that any NaN matches any NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == torch.bool or not (a.is_floating_point()):
        return torch.equal(a, b)
    an, bn = torch.isnan(a.float()), torch.isnan(b.float())
    if not torch.equal(an, bn):
        return False
    iview = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(iview)[~an], b.view(iview)[~bn])


def all_bf16() -> torch.Tensor:
    """Every bf16 bit pattern (NaNs and infinities included)."""
    return torch.arange(-32768, 32768, _BF16_STRIDE, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def probe_rows(k: int, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    """Adversarial activation rows of width ``k``: zeros, outlier channels, NaN/Inf, subnormal and huge
    values, and every finite bf16 value (sorted by magnitude into rows, so each row's quotients x/scale
    sweep its whole grid and land on rounding ties)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.zeros(k), torch.randn(k, generator=g)]
    r = torch.randn(k, generator=g)
    r[k // 3] = 300.0
    rows.append(r)
    for special in (float("nan"), float("inf"), -float("inf")):
        r = torch.randn(k, generator=g)
        r[k // 2] = special
        rows.append(r)
    rows += [torch.randn(k, generator=g) * 1e-39, torch.randn(k, generator=g) * 3e38,
             torch.full((k,), -2.5), torch.randn(k, generator=g) * 1e-3]
    finite = all_bf16().float()
    finite = finite[torch.isfinite(finite)]
    finite = finite[torch.argsort(finite.abs(), stable=True)]
    sign = torch.where(torch.rand(finite.shape, generator=g) < 0.5, -1.0, 1.0)
    finite = finite * sign
    pad = (-finite.numel()) % k
    rows_all = torch.cat([torch.stack(rows).flatten(), finite, torch.zeros(pad)]).reshape(-1, k)
    return rows_all.to(dtype).to(device)


def _check_act_quant(kdim: int, spec: QuantSpec, dtype, device, pre: int):
    def check():
        x = probe_rows(kdim, dtype, device)
        want = quantize_eager(x, spec)
        _, q, sx = _run_act(x, pre=pre, spec=spec, store_h=False, out_dtype=dtype)
        return same_quantization(_pack(q, sx, x.shape, dtype, spec), want), {"rows": x.shape[0]}
    return check


def same_quantization(got, want) -> bool:
    """Bit-equal fake-quantized tensors, or bit-equal codes and scales."""
    if isinstance(want, QuantizedActivation):
        return (isinstance(got, QuantizedActivation) and bits_equal(got.codes, want.codes)
                and bits_equal(got.scale, want.scale))
    return bits_equal(got, want)


def _spec_key(spec: QuantSpec | None):
    if spec is None:
        return (None, None, None)
    return (spec.act, spec.mode, spec.smooth_inv is not None)


def _fast(key: tuple, check, launch, strict: bool = True):
    """``launch()`` through the kernel if its check passed, else None (the caller's eager twin serves). A launch
    that raises disables the kernel (auto) or propagates (forced)."""
    if not _kernel_ok(key, check, strict):
        return None
    try:
        return launch()
    except Exception as e:  # noqa: BLE001
        if _impl == "triton":
            raise
        _checks[key] = False
        _report.append({"kernel": key[0], "config": [str(k) for k in key[1:]], "bit_exact": False,
                        "error": f"launch failed: {type(e).__name__}: {str(e)[:300]}"})
        warnings.warn(f"vqx Triton kernel {key} failed ({type(e).__name__}: {e}); using the eager path", stacklevel=3)
        return None


def quantize_act(x: torch.Tensor, spec: QuantSpec):
    """Per-token quantization of a linear's input (after its 1/s smoothing, if any)."""
    if _wants_triton(x) and _dt(x.dtype) is not None and _grid_id(spec) is not None and x.numel() > 0:
        kdim = x.shape[-1]
        # The check runs the same compiled specialization (K, flags) as the real call.
        out = _fast(("quant", x.device.type, kdim, x.dtype, *_spec_key(spec)),
                    _check_act_quant(kdim, spec, x.dtype, x.device, 0),
                    lambda: _pack(*_run_act(_rows(x), pre=0, spec=spec, store_h=False, out_dtype=x.dtype)[1:],
                                  x.shape, x.dtype, spec))
        if out is not None:
            return out
    return quantize_eager(x, spec)


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
        h_got, _, _ = _run_act(n, pre=pre, spec=None, store_h=True, rows_per_batch=rows, out_dtype=dtype, **mod)
        ok = bits_equal(h_got, h_want)
        if spec is not None:
            _, q, sx = _run_act(n, pre=pre, spec=spec, store_h=False, rows_per_batch=rows, out_dtype=dtype, **mod)
            ok = ok and same_quantization(_pack(q, sx, h_want.shape, dtype, spec), quantize_eager(h_want, spec))
        return ok, {"rows": rows}
    return check


def _fused_pre(kind: str, pre: int, n: torch.Tensor, dtype, spec: QuantSpec | None, scale=None, shift=None):
    """Shared by `modulate` and `cast`: (h, None) or (None, quantized) from the kernel, or None (eager)."""
    if not (_wants_triton(n) and _dt(dtype) is not None and n.dtype == torch.float32 and n.numel() > 0):
        return None
    if spec is not None and _grid_id(spec) is None:
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
        h, q, sx = _run_act(_rows(n), pre=pre, spec=spec, store_h=spec is None, scale=scale, shift=shift,
                            rows_per_batch=rows_per_batch, out_dtype=dtype)
        return (h.reshape(n.shape), None) if spec is None else (None, _pack(q, sx, n.shape, dtype, spec))

    return _fast((kind, n.device.type, kdim, dtype, *_spec_key(spec)),
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


def _gelu_variant(device: torch.device, kdim: int) -> int | None:
    """The kernel GELU variant equal to F.gelu(tanh) on every bf16 input on this device, or None."""
    dkey = f"{device}:{kdim}"
    if dkey not in _GELU_VARIANT:
        _GELU_VARIANT[dkey] = None
        x = all_bf16().to(device)
        pad = (-x.numel()) % kdim
        x = torch.cat([x, torch.zeros(pad, dtype=x.dtype, device=device)]).reshape(-1, kdim)
        want = gelu_eager(x)
        for variant in (0, 1):
            def check(variant=variant):
                h, _, _ = _run_act(x, pre=3, spec=None, store_h=True, gelu_variant=variant, out_dtype=torch.bfloat16)
                return bits_equal(h, want), {"inputs": f"{x.numel() - pad} bf16 values"}
            # Not strict: a variant that differs is expected (at most one matches).
            if _kernel_ok(("gelu", device.type, kdim, variant), check, strict=False):
                _GELU_VARIANT[dkey] = variant
                break
    return _GELU_VARIANT[dkey]


def gelu_quantize(y: torch.Tensor, spec: QuantSpec):
    """``quantize(F.gelu(y, approximate="tanh"))`` in one pass, or None when no exact kernel serves (the
    caller then runs the GELU and quantizes separately). bf16 only: fp32 GELU has too many inputs to check."""
    if not (_wants_triton(y) and y.dtype == torch.bfloat16 and _grid_id(spec) is not None and y.numel() > 0):
        return None
    kdim = y.shape[-1]
    variant = _gelu_variant(y.device, kdim)
    if variant is None:
        return None
    # the quantizer part is `quantize_act`'s: check it the same way
    if not _kernel_ok(("quant", y.device.type, kdim, y.dtype, *_spec_key(spec)),
                      _check_act_quant(kdim, spec, y.dtype, y.device, 0)):
        return None

    def check():
        g = torch.Generator().manual_seed(2)
        x = (torch.randn(16, kdim, generator=g) * 3).to(torch.bfloat16).to(y.device)
        _, q, sx = _run_act(x, pre=3, spec=spec, store_h=False, gelu_variant=variant, out_dtype=torch.bfloat16)
        return same_quantization(_pack(q, sx, x.shape, x.dtype, spec), quantize_eager(gelu_eager(x), spec)), {"rows": 16}

    def launch():
        _, q, sx = _run_act(_rows(y), pre=3, spec=spec, store_h=False, gelu_variant=variant, out_dtype=y.dtype)
        return _pack(q, sx, y.shape, y.dtype, spec)

    return _fast(("gelu_quant", y.device.type, kdim, y.dtype, *_spec_key(spec), variant), check, launch)


def gated_residual(h: torch.Tensor, a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``(h.float() + a.float() * gate).type_as(h)``; h, a [B, L, D], gate fp32 [B, 1, D]."""
    if (_wants_triton(h, a) and _dt(h.dtype) is not None and _dt(a.dtype) is not None and h.dim() == 3
            and h.shape == a.shape and gate.dtype == torch.float32 and gate.dim() == 3 and gate.shape[1] == 1
            and h.is_contiguous() and a.is_contiguous() and h.numel() > 0):
        kdim = h.shape[-1]

        def check():
            g = torch.Generator().manual_seed(3)
            hh = torch.randn(1, 8, kdim, generator=g) * 4
            aa = torch.randn(1, 8, kdim, generator=g) * 4
            hh[0, 0], aa[0, 0] = 0, aa[0, 0] * 1e-38  # subnormal products
            hh, aa = hh.to(h.dtype).to(h.device), aa.to(a.dtype).to(h.device)
            gg = torch.randn(1, 1, kdim, generator=g).to(h.device)
            return bits_equal(_residual_triton(hh, aa, gg), gated_residual_eager(hh, aa, gg)), {}

        out = _fast(("gated_residual", h.device.type, kdim, h.dtype, a.dtype), check,
                    lambda: _residual_triton(h, a, gate))
        if out is not None:
            return out
    return gated_residual_eager(h, a, gate)


def _residual_triton(h, a, gate):
    k = _kernels()
    b, length, kdim = h.shape
    g = gate.reshape(gate.shape[0], kdim)
    if g.stride(-1) != 1:
        g = g.contiguous()
    out = torch.empty_like(h)
    block = _next_pow2(kdim)
    k.gated_residual_kernel[(b * length,)](
        _as_bits(h), _as_bits(a), g, _as_bits(out), kdim, length if gate.shape[0] > 1 else b * length,
        g.stride(0) if gate.shape[0] > 1 else 0, DT=_dt(h.dtype), A_DT=_dt(a.dtype), BLOCK=block,
        **_launch_opts(block))
    return out


def rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """`rope_eager` in one pass over ``x`` (the eager ops make six, with fp32 temporaries)."""
    if (_wants_triton(x, freqs_cos, freqs_sin) and _dt(x.dtype) is not None and x.dim() == 4 and x.is_contiguous()
            and x.numel() > 0 and x.shape[-1] % 2 == 0 and freqs_cos.dtype == freqs_sin.dtype == torch.float32
            and freqs_cos.shape == freqs_sin.shape == (1, x.shape[1], 1, x.shape[3])
            and freqs_cos.is_contiguous() and freqs_sin.is_contiguous()):
        heads, dim = x.shape[2], x.shape[3]

        def check():
            g = torch.Generator().manual_seed(5)
            xx = probe_rows(heads * dim, x.dtype, "cpu", seed=5)[:64].reshape(1, -1, heads, dim)
            n = xx.shape[1]
            ang = torch.randn(1, n, 1, dim, generator=g) * 100
            ang[0, 0] = 0  # cos 1, sin 0: the identity rows
            ang[0, -1] = 2.5  # negative cos: signed zeros of the all-zero padding row
            cc, ss = ang.cos().to(x.device), ang.sin().to(x.device)
            cc[0, 1], ss[0, 1] = 1e-39, -1e-39  # subnormal factors
            xx = xx.to(x.device)
            return bits_equal(_rope_triton(xx, cc, ss), rope_eager(xx, cc, ss)), {}

        out = _fast(("rope", x.device.type, heads, dim, x.dtype), check, lambda: _rope_triton(x, freqs_cos, freqs_sin))
        if out is not None:
            return out
    return rope_eager(x, freqs_cos, freqs_sin)


def _rope_triton(x, freqs_cos, freqs_sin):
    k = _kernels()
    b, s, heads, dim = x.shape
    out = torch.empty_like(x)
    block = _next_pow2(heads * dim // 2)
    k.rope_kernel[(b * s,)](_as_bits(x), freqs_cos, freqs_sin, _as_bits(out), s, heads * dim, dim, DT=_dt(x.dtype),
                            BLOCK=block, **_launch_opts(block))
    return out


def int8_epilogue(acc: torch.Tensor, sx: torch.Tensor, ws_row: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 ``(acc.float() * sx * ws_row + bias)`` of an int32 GEMM result acc [M, N], sx [M, 1], ws_row [1, N]."""
    if _wants_triton(acc) and acc.is_contiguous() and acc.numel() > 0:
        def check():
            g = torch.Generator().manual_seed(4)
            a = torch.randint(-2**31, 2**31 - 1, (40, 72), generator=g, dtype=torch.int64).to(torch.int32)
            a[:, :8] = torch.randint(-3000, 3000, (40, 8), generator=g, dtype=torch.int32)
            s = torch.rand(40, 1, generator=g) * 1e-3
            s[3] = float("nan")
            w = torch.rand(1, 72, generator=g) * 1e-2
            bb = torch.randn(72, generator=g).to(torch.bfloat16) if bias is not None else None
            dev = acc.device
            a, s, w = a.to(dev), s.to(dev), w.to(dev)
            bb = bb.to(dev) if bb is not None else None
            return bits_equal(_epilogue_triton(a, s, w, bb), int8_epilogue_eager(a, s, w, bb)), {}

        out = _fast(("int8_epilogue", acc.device.type, bias is not None), check,
                    lambda: _epilogue_triton(acc, sx, ws_row, bias))
        if out is not None:
            return out
    return int8_epilogue_eager(acc, sx, ws_row, bias)


def _epilogue_triton(acc, sx, ws_row, bias):
    k = _kernels()
    m, n = acc.shape
    out = torch.empty((m, n), dtype=torch.bfloat16, device=acc.device)
    bias16 = bias.to(torch.bfloat16).contiguous() if bias is not None else None
    bm, bn = 64, 128
    k.int8_epilogue_kernel[(triton_cdiv(m, bm), triton_cdiv(n, bn))](
        acc, sx.reshape(-1).contiguous(), ws_row.reshape(-1).contiguous(),
        _as_bits(bias16) if bias16 is not None else acc, _as_bits(out), m, n,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, enable_fp_fusion=False)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
