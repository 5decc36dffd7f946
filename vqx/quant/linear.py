"""Quantized linear: weights quantized once, activations quantized on every call, as a `Scheme` says.

With the default backend ``fake`` the forward is exactly "dequantize, then matmul" in the model's dtype:
``F.linear(dequant(x).to(dtype), dequant(W).to(dtype), bias)`` with all quantizer math in fp32; with
``kernel`` the same codes go through an 8-bit GEMM (backends.py). The activation quantization runs through
fastpath.py (a Triton kernel on CUDA, the reference ops elsewhere; the same codes either way), and once per
input group when the block shares its inputs (shared.py; a model's fused block sets that up).

Why not ``F.linear(dequant(x), W_codes) * w_scale.T + bias`` for ``fake``: the GEMM costs the same, the
extra epilogue pass costs more, and it changes the output rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fastpath
from .fastpath import QuantSpec
from .numbers import check_finite
from .scheme import Scheme, TensorScheme, dequantize, global_scale_of, nvfp4_global_scale, quantize

_CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)


def quantize_weight(weight: torch.Tensor, ts: TensorScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight codes (fp32 [out, in]) and scales (fp32 [out / br, in / bc]) under ``ts`` (NVFP4: with the weight's
    own global scale, `scheme.global_scale_of`)."""
    check_finite(weight, "weight")
    return quantize(weight, ts)


class QuantLinear(nn.Module):
    """Drop-in replacement for a block ``nn.Linear`` under a quantization scheme."""

    def __init__(self, linear: nn.Linear, scheme: Scheme,
                 codes: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 input_smooth: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 input_scale: torch.Tensor | None = None):
        """``codes``/``scale``: weight codes an algorithm chose (else round to nearest).
        ``input_smooth``: per-input-channel s of a smoothing that no float tensor can absorb; the input is
        multiplied by 1/s before quantization, as lightx2v's affine_norm vectors do (the weight columns
        were already multiplied by s). ``dtype``: the compute dtype (default: the float weight's).
        ``input_scale``: the calibrated per-tensor activation value of a scheme that needs one
        (`TensorScheme.calibrated`): its static scale, or (NVFP4) the activation absmax its global scale comes from
        (lightx2v's ``input_absmax``; the layer keeps it as ``input_absmax`` and the global scale 2688 / absmax,
        `scheme.nvfp4_global_scale`, as ``input_scale``)."""
        super().__init__()
        if scheme.weight is None:
            raise ValueError(f"scheme {scheme.name} quantizes no weights")
        self.scheme = scheme
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if codes is None:
            codes, scale = quantize_weight(linear.weight.data, scheme.weight)
        if scheme.weight.global_scale:  # the global scale the codes were chosen with (the exporter writes it)
            self.register_buffer("weight_global_scale", global_scale_of(linear.weight.data, scheme.weight))
        else:
            self.weight_global_scale = None
        storage = scheme.weight_grid.storage_dtype or torch.bfloat16  # research grids are exact in bf16
        self.register_buffer("weight_codes", codes.to(storage).contiguous())
        self.register_buffer("weight_scale", scale.float().contiguous())
        dtype = dtype or linear.weight.dtype
        # Quantized once: the dequantized weight the forward uses, in the model's dtype.
        self.register_buffer("weight", dequantize(codes, scale, scheme.weight).to(dtype), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.to(dtype).clone(), requires_grad=False)
        self.act_scheme = scheme.activation
        self.act_grid = scheme.activation_grid
        if self.act_scheme is not None and self.act_scheme.calibrated:
            if input_scale is None:
                what = "a calibrated input_absmax" if self.act_scheme.global_scale else "a calibrated input_scale"
                raise ValueError(f"scheme {scheme.name} has {'static' if not self.act_scheme.dynamic else 'NVFP4'} "
                                 f"activations: it needs {what}")
            value = input_scale.detach().float().reshape(()).clone()
            if self.act_scheme.global_scale:
                # stored as lightx2v's loader reads it back (through bf16), the global scale derived as it derives it
                self.register_buffer("input_absmax", value.to(torch.bfloat16).float())
                value = nvfp4_global_scale(self.input_absmax)
            else:
                self.input_absmax = None
            self.register_buffer("input_scale", value)
        else:
            self.input_scale = self.input_absmax = None
        self._static_key = None if self.input_scale is None else float(self.input_scale)
        if input_smooth is not None:
            self.register_buffer("input_smooth_inv", (1.0 / input_smooth.float()).contiguous())
        else:
            self.input_smooth_inv = None
        self.backend = "fake"  # or "kernel": backends.set_backend
        self._shared = None  # shared.SharedInput of this layer's input group, set by shared.share_inputs
        self._smooth_key = None  # set by shared.share_inputs when the group's linears hold equal 1/s vectors

    def dequantized_weight_fp32(self) -> torch.Tensor:
        return dequantize(self.weight_codes, self.weight_scale, self.scheme.weight)

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(self.act_scheme, self.input_smooth_inv, "codes" if self.backend == "kernel" else "fake",
                         self.input_scale, self._static_key)

    def quant_key(self) -> tuple:
        """Everything this layer's input quantization depends on, besides the input."""
        smooth = self.input_smooth_inv
        if smooth is not None:
            smooth = self._smooth_key if self._smooth_key is not None else id(smooth)
        return (self.act_scheme, "codes" if self.backend == "kernel" else "fake", smooth, self._static_key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_grid is None:  # weight-only
            if self.input_smooth_inv is not None:
                x = (x.float() * self.input_smooth_inv).to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        spec = self.quant_spec()
        shared = None if torch.compiler.is_compiling() else self._shared
        act = None
        if shared is not None:
            key = self.quant_key()
            act = shared.lookup(x, key)
        if act is None:
            if x.dtype in _CODE_DTYPES:
                raise RuntimeError(f"QuantLinear got {x.dtype} codes it has no quantized input for (fused input lost)")
            act = fastpath.quantize_act(x, spec)
            if shared is not None:
                shared.put(x, key, act, shared.quantized - 1)
        if spec.mode == "codes":
            from .backends import kernel_linear

            return kernel_linear(self, act)
        return F.linear(act, self.weight.to(act.dtype), None if self.bias is None else self.bias.to(act.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme.name}, backend={self.backend}"


class SmoothedLinear(nn.Module):
    """A float linear whose weight columns were multiplied by s and whose input is divided by s at run
    time (format=none with a smoothing that only lightx2v's affine_norm vectors can hold)."""

    def __init__(self, linear: nn.Linear, input_smooth: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("input_smooth_inv", (1.0 / input_smooth.float()).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x.float() * self.input_smooth_inv).to(x.dtype))
