"""A fixed synthetic probe batch per layer: seeded Gaussian inputs, used until calibration captures
real activations. Deterministic across runs and machines (seed from the layer name)."""

from __future__ import annotations

import zlib

import torch

from ..models.wan import QuantTarget


class ProbeInputs:
    def __init__(self, tokens: int, seed: int = 0):
        self.tokens, self.seed = tokens, seed

    def __call__(self, target: QuantTarget) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(target.name.encode()))
        w = target.module.weight
        x = torch.randn(self.tokens, target.module.in_features, generator=g)
        return x.to(device=w.device, dtype=w.dtype)
