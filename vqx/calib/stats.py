"""Streaming statistics of one input group's activations (the linears that read the same tensor).

Updated call by call instead of storing every input: per-channel absmax and mean |x|, an optional
Hessian X^T X (GPTQ), and a small seeded token sample (for search losses and layer errors).
When an algorithm divides the group's input by s, `scale_inputs(s)` transforms every statistic.
"""

from __future__ import annotations

import torch


class GroupStats:
    def __init__(self, in_features: int, sample_tokens: int, hessian_tokens: int | None, want_hessian: bool,
                 seed: int, device: torch.device):
        self.in_features = in_features
        self.sample_tokens, self.hessian_tokens = sample_tokens, hessian_tokens
        self.absmax = torch.zeros(in_features, device=device)
        self.sum_abs = torch.zeros(in_features, device=device)
        self.count = 0
        self.hessian = torch.zeros(in_features, in_features, device=device) if want_hessian else None
        self.hessian_count = 0
        self.samples: list[torch.Tensor] = []  # kept on the host: bounded by sample_tokens per call
        self.generator = torch.Generator().manual_seed(seed)

    def _pick(self, n: int, k: int | None) -> torch.Tensor | None:
        if k is None or k >= n:
            return None
        return torch.randperm(n, generator=self.generator)[:k]

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features).float()
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite activations")
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        self.sum_abs += x.abs().sum(dim=0)
        self.count += x.shape[0]
        idx = self._pick(x.shape[0], self.sample_tokens)
        self.samples.append((x if idx is None else x[idx.to(x.device)]).cpu())
        if self.hessian is not None:
            idx = self._pick(x.shape[0], self.hessian_tokens)
            xs = x if idx is None else x[idx.to(x.device)]
            self.hessian.addmm_(xs.T, xs)
            self.hessian_count += xs.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.sum_abs / max(self.count, 1)

    def sample_matrix(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(0, self.in_features)

    def normalized_hessian(self) -> torch.Tensor:
        """H = X^T X / n (GPTQ's 2/n factor cancels in the updates)."""
        return self.hessian / max(self.hessian_count, 1)

    @torch.no_grad()
    def scale_inputs(self, s: torch.Tensor) -> None:
        """The group's input becomes x / s (per channel)."""
        s = s.float()
        self.absmax = self.absmax / s.to(self.absmax.device)
        self.sum_abs = self.sum_abs / s.to(self.sum_abs.device)
        self.samples = [x / s.cpu() for x in self.samples]
        if self.hessian is not None:
            sd = s.to(self.hessian.device)
            self.hessian = self.hessian / sd[:, None] / sd[None, :]
