"""How quantized linears compute: ``fake`` (default) or ``kernel`` (real 8-bit GEMMs).

- ``fake``: the activation is quantized and dequantized per token (codes bit for bit those of the fp32
  reference quantizer), then multiplied with the cached dequantized weight in the model dtype:
  ``F.linear(dequant(x), dequant(W), bias)``, as `QuantLinear` always did.
- ``kernel``: what lightx2v computes (docs/lightx2v-contract.md section 5): the same activation codes and
  scales go into an 8-bit GEMM with the stored weight codes, accumulated in int32 / fp32, scaled per token
  and per output channel (fp8_static: per tensor, fast accumulation, as lightx2v's fp8-pertensor; fp8_b128: per
  token-group and weight block, the bias added after, as fp8-b128-deepgemm), bias added, bf16 out (then cast to the
  model dtype):
  fp8 ``torch._scaled_mm(xq, Wq.T, scale_a=sx [M,1], scale_b=ws.T [1,N], bias, out_dtype=bf16)``;
  int8 ``torch._int_mm(xq, Wq.T)`` then ``(acc * sx * ws.T + bias).to(bf16)`` in one fused pass on CUDA.
  On CPU int8 products are summed exactly in float64 (identical to ``_int_mm``, which is ~30x slower
  there); where ``_scaled_mm`` cannot run (CPU builds without it, GPUs before sm89) the fp8 codes are
  multiplied in fp32 with the same scaling.

Outputs of the two backends differ by the bf16 rounding of the dequantized operands in the fake GEMM
(tests/test_backends.py bounds it). Choose with `set_backend(model, "fake" | "kernel")`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import fastpath
from .fastpath import QuantizedActivation

BACKENDS = ("fake", "kernel")
_KERNEL_GRIDS = ("int8", "fp8_e4m3")
_scaled_mm_broken: set[str] = set()  # device types where _scaled_mm raised: use the emulation there
_int_mm_broken: set[str] = set()
_blockwise_broken: set[str] = set()  # device types where block-scaled _scaled_mm raised


def fallbacks() -> dict:
    """Device types on which an 8-bit GEMM raised and its emulation runs instead (benchmarks record it)."""
    return {"scaled_mm_emulated": sorted(_scaled_mm_broken), "int_mm_emulated": sorted(_int_mm_broken),
            "blockwise_scaled_mm_emulated": sorted(_blockwise_broken)}


def set_backend(module: nn.Module, name: str) -> int:
    """Switch every `QuantLinear` in ``module`` to backend ``name``; returns how many were switched."""
    from .linear import QuantLinear

    if name not in BACKENDS:
        raise ValueError(f"unknown quantization backend {name!r}; valid: {', '.join(BACKENDS)}")
    layers = [m for m in module.modules() if isinstance(m, QuantLinear)]
    if name == "kernel":
        for q in layers:
            if not supports_kernel(q):
                raise ValueError(f"backend 'kernel' needs int8 or fp8 weights per channel and activations per token, "
                                 f"fp8 per tensor with a static activation scale, or fp8 in 128-blocks (schemes w8a8, "
                                 f"fp8, fp8_static, fp8_b128); scheme {q.scheme.name} has no 8-bit GEMM (use backend 'fake')")
    for q in layers:
        q.backend = name
    return len(layers)


def kernel_scheme(scheme) -> bool:
    """Whether an 8-bit GEMM here computes ``scheme``: per-token dynamic activations and per-channel weights
    on one int8 / fp8 grid, or fp8 per tensor with a static activation scale (lightx2v's fp8-pertensor)."""
    w, a = scheme.weight, scheme.activation
    if a is None or w.grid != a.grid:
        return False
    if a.grid == "fp8_e4m3" and (_static_per_tensor(scheme) or _block_scaled(scheme)):
        return True
    return a.grid in _KERNEL_GRIDS and a.granularity == "token" and a.dynamic and w.granularity == "channel"


def _static_per_tensor(scheme) -> bool:
    return (scheme.activation.granularity == "tensor" and not scheme.activation.dynamic
            and scheme.weight.granularity == "tensor")


def _block_scaled(scheme) -> bool:
    """Activations per token-group of 128 and weights in 128 x 128 blocks (lightx2v's fp8-b128-deepgemm)."""
    a, w = scheme.activation, scheme.weight
    return (a.granularity == "token_group" and a.group_size == 128 and a.dynamic
            and w.granularity == "block" and tuple(w.block) == (128, 128))


def supports_kernel(q) -> bool:
    return kernel_scheme(q.scheme)


def kernel_linear(q, act: QuantizedActivation) -> torch.Tensor:
    """``q``'s output from activation codes through the 8-bit GEMM (see the module doc)."""
    codes, sx = act.codes, act.scale
    w = q.weight_codes
    ws_row = q.weight_scale.reshape(1, -1)
    if _static_per_tensor(q.scheme):  # lightx2v fp8-pertensor: per-tensor scales, fast accumulation
        y = _fp8_mm(codes, w, sx.reshape(1), ws_row.reshape(1), q.bias, fast_accum=True)
    elif _block_scaled(q.scheme):
        y = _fp8_block_mm(codes, w, sx, q.weight_scale, q.bias)
    elif w.dtype == torch.float8_e4m3fn:
        y = _fp8_mm(codes, w, sx, ws_row, q.bias)
    else:
        y = fastpath.int8_epilogue(_int8_mm(codes, w), sx, ws_row, q.bias)
    return y.reshape(*act.shape[:-1], w.shape[0]).to(act.dtype)


def _fp8_mm(codes, w, sx, ws_row, bias, fast_accum: bool = False):
    dev = codes.device.type
    # cuBLASLt/CUTLASS fp8 GEMMs need K and N divisible by 16; other shapes (tiny test models) emulate.
    if dev not in _scaled_mm_broken and (dev == "cpu" or (codes.shape[1] % 16 == 0 and w.shape[0] % 16 == 0)):
        try:
            return torch._scaled_mm(codes, w.t(), scale_a=sx, scale_b=ws_row,
                                    bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16,
                                    use_fast_accum=fast_accum)
        except (RuntimeError, NotImplementedError) as e:
            _scaled_mm_broken.add(dev)
            warnings.warn(f"torch._scaled_mm failed on {dev} ({str(e).splitlines()[0][:200]}); fp8 GEMMs are emulated in fp32",
                          stacklevel=3)
    y = (codes.float() @ w.float().t()) * sx * ws_row
    if bias is not None:
        y = y + bias.to(torch.bfloat16).float()
    return y.to(torch.bfloat16)


def _fp8_block_mm(codes, w, sx, ws, bias):
    """lightx2v's fp8-b128-deepgemm: DeepGEMM's block-scaled fp8 GEMM to bf16 (codes [M, K] with group scales
    sx [M, K/128], weight codes [N, K] with block scales ws [N/128, K/128]), then the bias added in bf16. On CUDA this
    is torch._scaled_mm's blockwise scaling (sm90: 1 x 128 and 128 x 128 blocks; cuBLAS takes the activation scales
    outer-dim-major and the weight scales as the transpose of [N/128, K/128]); elsewhere the same block-scaled
    products summed in fp32. Measured on the H200 (torch 2.11, CUDA 13): with K/128 not a multiple of 4 cuBLAS
    returns wrong products without an error (K = 8960: relative error 0.39), padded scale layouts are refused, and
    M not a multiple of 4 is not supported; those calls, and layers narrower than a block, take the fp32 sum."""
    m, k = codes.shape
    n = w.shape[0]
    y = None
    if codes.is_cuda and "cuda" not in _blockwise_broken and k % 512 == 0 and n % 128 == 0 and m % 4 == 0:
        try:
            y = torch._scaled_mm(codes, w.t(), scale_a=sx.t().contiguous().t(), scale_b=ws.t(), out_dtype=torch.bfloat16)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            _blockwise_broken.add("cuda")
            warnings.warn(f"torch._scaled_mm with block scales failed ({str(e).splitlines()[0][:200]}); fp8-b128 GEMMs "
                          f"are emulated in fp32", stacklevel=3)
    if y is None:
        a = (codes.float().reshape(m, sx.shape[1], -1) * sx[..., None]).reshape(m, k)
        bn, bk = n // ws.shape[0], k // ws.shape[1]
        wd = (w.float().reshape(ws.shape[0], bn, ws.shape[1], bk) * ws[:, None, :, None]).reshape(n, k)
        y = (a @ wd.t()).to(torch.bfloat16)
    return y if bias is None else y + bias.to(torch.bfloat16)


def _int8_mm(codes: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 ``codes @ w.T``, exact."""
    if codes.is_cuda and codes.device.type not in _int_mm_broken and codes.shape[1] % 8 == 0 and w.shape[0] % 8 == 0:
        m = codes.shape[0]
        a = codes
        if m <= 16:  # cuBLASLt's int8 GEMM needs more than 16 rows
            a = torch.cat([codes, codes.new_zeros(17 - m, codes.shape[1])])
        try:
            return torch._int_mm(a, w.t())[:m]
        except (RuntimeError, NotImplementedError) as e:
            _int_mm_broken.add(codes.device.type)
            warnings.warn(f"torch._int_mm failed ({str(e).splitlines()[0][:200]}); int8 GEMMs are summed in float64",
                          stacklevel=3)
    # Every partial sum is an integer below 2**53, so float64 sums them exactly.
    return (codes.double() @ w.double().t()).to(torch.int32)
