"""Activation quantization, the int8 GEMM epilogue, and the machinery that runs a Triton kernel only where it
matches its eager twin bit for bit.

Every fused op has an eager twin (the reference arithmetic) and a Triton kernel (kernels.py); the ops here
are the model-neutral ones: per-token activation quantization (`quantize_act`) and the int8 epilogue. A model
family's own elementwise ops, which the activation kernel can run fused before the quantization (a
modulated norm, a cast, a tanh-GELU) or which run alone (a gated residual, a rotary embedding), live with the
family (vqx.models.wan.ops) and use `run_act`, `fast` and the probes below.

Which path runs (``VQX_QUANT_IMPL``, or `use_impl`):
- ``auto`` (default): the Triton kernel for CUDA tensors in bf16 or fp32 when triton imports and the kernel
  passed its check on this device (below); the eager twin otherwise: CPU, no triton, fp16, under
  torch.compile (which traces the eager twin and fuses it itself), or a kernel that failed its check.
- ``eager``: always the eager twin (PyTorch ops, the reference arithmetic).
- ``triton``: always the kernel, failing loudly if its check fails (tests; with TRITON_INTERPRET=1 it
  runs on CPU tensors through Triton's interpreter).

The eager twins are the exact op sequences of the model's diffusers block and of `QuantLinear` (quantizer
math in fp32, `numbers.quantize`). Each kernel is checked once per configuration and device, on its first use,
against its twin on adversarial rows (zeros, ties, outliers, subnormal and huge values, NaN/Inf; the
fused GELU on all 65,536 bf16 inputs): bit for bit, or it is not used. `report()` lists the checks.

Under torch.compile the eager twin is traced. Inductor's Triton division is approximate unless
``TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING=1``; only then are compiled codes the reference codes.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from contextlib import contextmanager
from typing import NamedTuple

import torch

from .numbers import NumberGrid
from .scheme import TensorScheme, fake_quantize, quantize, quantize_with

IMPLS = ("auto", "eager", "triton")
_impl = os.environ.get("VQX_QUANT_IMPL", "auto")
_checks: dict[tuple, bool] = {}
_report: list[dict] = []
# Triton's CPU interpreter runs a program per row in Python: there the checks sample every 16th bf16 value.
_BF16_STRIDE = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 1


class QuantizedActivation(NamedTuple):
    """Codes for an 8-bit GEMM: codes [M, K] (int8 / float8_e4m3fn), scale fp32 [M, 1] (per token), [M, K / group]
    (per token group) or [1, 1] (a static per-tensor scale)."""

    codes: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size  # the activation's shape (leading dims, K)
    dtype: torch.dtype  # the activation's dtype (the layer's output dtype)


class QuantSpec(NamedTuple):
    """How a linear quantizes its input: its activation scheme, optional 1/s smoothing, and what it needs
    ("fake": the dequantized activation in the model dtype, "codes": a `QuantizedActivation`, for per-token,
    per-token-group and static per-tensor schemes), and the calibrated value of a `TensorScheme.calibrated` scheme (its static scale, or NVFP4's
    activation global scale)."""

    act: TensorScheme
    smooth_inv: torch.Tensor | None
    mode: str
    static_scale: torch.Tensor | None = None
    static_value: float | None = None  # static_scale as a number (the grouped kernel's NVFP4 range check)

    @property
    def grid(self) -> NumberGrid:
        return self.act.grid_

    @property
    def per_token(self) -> bool:
        """Dynamic per-token scales: what the Triton kernels and the 8-bit GEMMs compute."""
        return self.act.granularity == "token" and self.act.dynamic

    @property
    def static_tensor(self) -> bool:
        """One calibrated scale for the whole tensor (fp8-pertensor's GEMM reads its codes too)."""
        return self.act.granularity == "tensor" and not self.act.dynamic and self.static_scale is not None


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
    x2 = x.reshape(-1, x.shape[-1])
    if spec.static_tensor:
        scale = spec.static_scale.float().reshape(1, 1)
        codes = quantize_with(x2, spec.act, scale)
    elif spec.per_token or (spec.act.granularity == "token_group" and spec.act.dynamic):
        codes, scale = quantize(x2, spec.act)  # [M, 1] per token, [M, K / group] per token group
    else:
        raise ValueError(f"activation codes for an 8-bit GEMM are per token, per token group or static per tensor; "
                         f"got {spec.act.describe()}")
    if spec.grid.storage_dtype == torch.int8:  # int8 cannot hold NaN; the row's NaN scale carries it
        codes = torch.where(torch.isnan(codes), torch.zeros_like(codes), codes)
    return QuantizedActivation(spec.grid.to_storage(codes), scale, x.shape, x.dtype)


def int8_epilogue_eager(acc: torch.Tensor, sx: torch.Tensor, ws_row: torch.Tensor, bias: torch.Tensor | None):
    """lightx2v's int8 epilogue: (acc.float() * sx * weight_scale.T + bias.float()).to(bf16)."""
    y = acc.float() * sx * ws_row
    if bias is not None:
        y = y + bias.to(torch.bfloat16).float()
    return y.to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# dispatch


def triton_kernels():
    from . import kernels

    return kernels


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        triton_kernels()
        return True
    except Exception:  # noqa: BLE001 - no triton, or one that cannot load: the eager path serves
        return False


def dtype_id(dtype: torch.dtype) -> int | None:
    return {torch.bfloat16: 0, torch.float32: 1}.get(dtype)


def wants_triton(*tensors: torch.Tensor) -> bool:
    if _impl == "eager" or torch.compiler.is_compiling():
        return False
    if _impl == "triton":
        return True
    return all(t.is_cuda for t in tensors) and triton_available()


def grid_id(spec: QuantSpec) -> int | None:
    """The kernels' grid code, or None when no kernel serves the spec (not int8 / fp8 per token)."""
    return {"int8": 0, "fp8_e4m3": 1}.get(spec.act.grid) if spec.per_token else None


def as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def launch_opts(block: int) -> dict:
    # About 8-16 fp32 values per thread: a whole row stays in registers (one read of the input).
    # No FMA contraction: a*b+c must round twice, as eager PyTorch does.
    return {"num_warps": 4 if block <= 1024 else 8 if block <= 2048 else 16 if block <= 8192 else 32,
            "enable_fp_fusion": False}


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def run_act(x2, *, pre: int, spec: QuantSpec | None, store_h: bool, out_dtype: torch.dtype, scale=None,
             shift=None, rows_per_batch: int = 1, gelu_variant: int = 0):
    """Launch `act_kernel` on rows ``x2`` [M, K]; returns (h or None, q or None, sx or None)."""
    k = triton_kernels()
    m, kdim = x2.shape
    block = next_pow2(kdim)
    dev = x2.device
    h = torch.empty((m, kdim), dtype=out_dtype, device=dev) if store_h else None
    q = sx = None
    quant, grid, smooth = 0, 0, None
    if spec is not None:
        grid = grid_id(spec)
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
        as_bits(x2), x2.stride(0),
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        scale.stride(0) if scale is not None and scale.shape[0] > 1 else 0, rows_per_batch,
        smooth if smooth is not None else dummy,
        as_bits(h) if h is not None else dummy, kdim,
        as_bits(qk) if qk is not None else dummy, kdim,
        sx if sx is not None else dummy, kdim,
        PRE=pre, DT=dtype_id(out_dtype), HAS_SMOOTH=smooth is not None, STORE_H=store_h, QUANT=quant,
        GRID=grid, GELU=gelu_variant, BLOCK=block, **launch_opts(block))
    return h, q, sx


def pack(q, sx, shape, dtype, spec: QuantSpec):
    if spec.mode == "fake":
        return q.reshape(shape)
    return QuantizedActivation(q, sx, shape, dtype)


def kernel_ok(key: tuple, check, strict: bool = True) -> bool:
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


def check_act_quant(kdim: int, spec: QuantSpec, dtype, device, pre: int):
    def check():
        x = probe_rows(kdim, dtype, device)
        want = quantize_eager(x, spec)
        _, q, sx = run_act(x, pre=pre, spec=spec, store_h=False, out_dtype=dtype)
        return same_quantization(pack(q, sx, x.shape, dtype, spec), want), {"rows": x.shape[0]}
    return check


def same_quantization(got, want) -> bool:
    """Bit-equal fake-quantized tensors, or bit-equal codes and scales."""
    if isinstance(want, QuantizedActivation):
        return (isinstance(got, QuantizedActivation) and bits_equal(got.codes, want.codes)
                and bits_equal(got.scale, want.scale))
    return bits_equal(got, want)


def spec_key(spec: QuantSpec | None):
    if spec is None:
        return (None, None, None)
    return (spec.act, spec.mode, spec.smooth_inv is not None)


def fast(key: tuple, check, launch, strict: bool = True):
    """``launch()`` through the kernel if its check passed, else None (the caller's eager twin serves). A launch
    that raises disables the kernel (auto) or propagates (forced)."""
    if not kernel_ok(key, check, strict):
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
    """Quantization of a linear's input (after its 1/s smoothing, if any): per token, or (fake) per token group
    or with a static scale."""
    if wants_triton(x) and dtype_id(x.dtype) is not None and x.numel() > 0:
        kdim = x.shape[-1]
        # The check runs the same compiled specialization (K, flags) as the real call.
        if grid_id(spec) is not None:
            out = fast(("quant", x.device.type, kdim, x.dtype, *spec_key(spec)),
                       check_act_quant(kdim, spec, x.dtype, x.device, 0),
                       lambda: pack(*run_act(as_rows(x), pre=0, spec=spec, store_h=False, out_dtype=x.dtype)[1:],
                                    x.shape, x.dtype, spec))
        elif (cfg := group_config(spec, kdim)) is not None:
            out = fast(("group_quant", x.device.type, kdim, x.dtype, *spec_key(spec)),
                       check_group_quant(kdim, spec, x.dtype, x.device),
                       lambda: run_group(as_rows(x), spec, x.shape, cfg))
        else:
            out = None
        if out is not None:
            return out
    return quantize_eager(x, spec)


# NVFP4 effective scales s8 / G stay normal fp32 numbers for G <= 2^117 (the smallest e4m3 scale is 2^-9); above,
# the eager path's range check (scheme.choose_scales) must run.
_NVFP4_KERNEL_MAX_GLOBAL = 2.0 ** 117
_GROUP_GRIDS = {"int8": 0, "fp8_e4m3": 1, "int4": 3}
_GROUP_MODES = {"fp32": 0, "bf16": 0, "e4m3": 3}  # e8m0: 1 (ceil) or 2 (floor), by its rule


def group_config(spec: QuantSpec, kdim: int) -> dict | None:
    """The grouped kernel's flags for a spec it serves (fake quantization per token group or with a static per-tensor
    scale; fp8 codes with a static or fp32 group scales for the fp8-pertensor / fp8-b128 GEMMs), else None: other
    codes, a dynamic per-tensor scale, a group that does not divide K (the eager path refuses it), NVFP4 without its
    calibrated global scale or with one beyond the kernel's range."""
    ts, grid = spec.act, spec.grid
    if spec.static_tensor:
        mode, group = 4, kdim
    elif ts.granularity == "token_group" and ts.dynamic:
        group = min(ts.group_size, kdim)
        if kdim % group:
            return None
        mode = {"ceil": 1, "floor": 2}[ts.e8m0_rule] if ts.scale_dtype == "e8m0" else _GROUP_MODES[ts.scale_dtype]
        if mode == 3 and (spec.static_value is None or not spec.static_value <= _NVFP4_KERNEL_MAX_GLOBAL):
            return None
    else:
        return None
    code = 2 if grid.minifloat else _GROUP_GRIDS.get(grid.name)
    if code is None or (spec.mode == "codes" and not (grid.name == "fp8_e4m3" and mode in (0, 4))):
        return None
    exp_bits, man_bits = grid.minifloat or (0, 0)
    groups_per_program = max(1, 1024 // next_pow2(group))
    return dict(GRID=code, MIN_EXP=2 - 2 ** (exp_bits - 1) if grid.minifloat else 0, MB=man_bits, QMAX=grid.qmax,
                EMAX=math.floor(math.log2(grid.qmax)), MODE=mode, SCALE_BF16=ts.scale_dtype == "bf16",
                E2M1=grid.name == "fp4_e2m1", CODES=spec.mode == "codes", G=group, G_P2=next_pow2(group),
                BLOCK_G=min(groups_per_program, next_pow2(kdim // group)))


def run_group(x2: torch.Tensor, spec: QuantSpec, shape: torch.Size, cfg: dict | None = None):
    """`group_quant_kernel` on rows ``x2`` [M, K] of an activation of ``shape``: the fake-quantized activation in x2's
    dtype, or (codes) its `QuantizedActivation`. ``cfg``: `group_config`'s flags, when the caller has them."""
    m, kdim = x2.shape
    cfg = cfg or group_config(spec, kdim)
    scale = spec.static_scale.float().reshape(1).to(x2.device) if spec.static_scale is not None else x2
    smooth = spec.smooth_inv
    block = cfg["G_P2"] * cfg["BLOCK_G"]
    out = torch.empty((m, kdim), dtype=torch.float8_e4m3fn if cfg["CODES"] else x2.dtype, device=x2.device)
    sx = torch.empty((m, kdim // cfg["G"]), dtype=torch.float32, device=x2.device) if cfg["MODE"] == 0 else x2
    triton_kernels().group_quant_kernel[(m, triton_cdiv(kdim // cfg["G"], cfg["BLOCK_G"]))](
        as_bits(x2), x2.stride(0), smooth if smooth is not None else x2,
        out.view(torch.uint8) if cfg["CODES"] else as_bits(out), kdim, scale, sx, kdim,
        float(spec.act.amax_floor), DT=dtype_id(x2.dtype), HAS_SMOOTH=smooth is not None, **cfg, **launch_opts(block))
    if cfg["CODES"]:
        return QuantizedActivation(out, scale.reshape(1, 1) if cfg["MODE"] == 4 else sx, shape, x2.dtype)
    return out.reshape(shape)


def check_group_quant(kdim: int, spec: QuantSpec, dtype, device):
    """The grouped kernel against `quantize_eager` on `probe_rows`, plus rows whose groups alternate between zero
    and values (all-zero groups in a live row) and rows whose groups span 2^-140 .. 2^100 (subnormal and huge group
    scales in one row)."""
    def check():
        x = probe_rows(kdim, dtype, device)
        g = torch.Generator().manual_seed(3)
        group = group_config(spec, kdim)["G"]
        r = torch.randn(4, kdim, generator=g) * 5
        r.view(4, -1, group)[:, ::2] = 0
        span = torch.randn(2, kdim, generator=g)
        n_groups = kdim // group
        exps = torch.linspace(-140, 100, n_groups).repeat_interleave(group)
        span = span * torch.exp2(exps)
        x = torch.cat([x, r.to(dtype).to(device), span.to(dtype).to(device)])
        return same_quantization(run_group(x, spec, x.shape), quantize_eager(x, spec)), {"rows": x.shape[0]}
    return check


def int8_epilogue(acc: torch.Tensor, sx: torch.Tensor, ws_row: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 ``(acc.float() * sx * ws_row + bias)`` of an int32 GEMM result acc [M, N], sx [M, 1], ws_row [1, N]."""
    if wants_triton(acc) and acc.is_contiguous() and acc.numel() > 0:
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

        out = fast(("int8_epilogue", acc.device.type, bias is not None), check,
                   lambda: _epilogue_triton(acc, sx, ws_row, bias))
        if out is not None:
            return out
    return int8_epilogue_eager(acc, sx, ws_row, bias)


def _epilogue_triton(acc, sx, ws_row, bias):
    k = triton_kernels()
    m, n = acc.shape
    out = torch.empty((m, n), dtype=torch.bfloat16, device=acc.device)
    bias16 = bias.to(torch.bfloat16).contiguous() if bias is not None else None
    bm, bn = 64, 128
    k.int8_epilogue_kernel[(triton_cdiv(m, bm), triton_cdiv(n, bn))](
        acc, sx.reshape(-1).contiguous(), ws_row.reshape(-1).contiguous(),
        as_bits(bias16) if bias16 is not None else acc, as_bits(out), m, n,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, enable_fp_fusion=False)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
