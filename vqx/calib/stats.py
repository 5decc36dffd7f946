"""Streaming statistics of one input group's activations (the linears that read the same tensor).

Updated call by call instead of storing every input: per-channel absmax and mean |x|, an optional
Hessian X^T X (GPTQ), and a small seeded token sample (for search losses and layer errors).
When an algorithm divides the group's input by s, `scale_inputs(s)` transforms every statistic.

Under torchrun each rank streams its own calls and `reduce()` combines the ranks' statistics into the
single-process ones: absmax by max and the token samples in call order (both bit for bit), sum |x| as the
call-ordered sum of per-call sums (bit for bit), the Hessian by a sum over ranks (float32 rounding: the
single process adds the same per-call products in another order). The token sample of a call is drawn
from a generator seeded by the call's index, so it does not depend on which rank saw the call.
"""

from __future__ import annotations

import copy

import torch

from .. import distributed


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
        self.seed = seed
        self.calls: list[int] = []  # the call index of each update (of each sample)
        self.sums: list[torch.Tensor] = []  # per-call sum |x| on the host, for `reduce` (under torchrun only)

    @staticmethod
    def _pick(n: int, k: int | None, generator: torch.Generator) -> torch.Tensor | None:
        if k is None or k >= n:
            return None
        return torch.randperm(n, generator=generator)[:k]

    @torch.no_grad()
    def update(self, x: torch.Tensor, call: int | None = None) -> None:
        """Add one call's input; ``call`` is its index in the whole capture (default: the next one)."""
        call = len(self.calls) if call is None else call
        x = x.detach().reshape(-1, self.in_features).float()
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite activations")
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        part = x.abs().sum(dim=0)
        self.sum_abs += part
        if distributed.is_distributed():
            self.sums.append(part.cpu())
        self.count += x.shape[0]
        self.calls.append(call)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + call)
        idx = self._pick(x.shape[0], self.sample_tokens, generator)
        self.samples.append((x if idx is None else x[idx.to(x.device)]).cpu())
        if self.hessian is not None:
            idx = self._pick(x.shape[0], self.hessian_tokens, generator)
            xs = x if idx is None else x[idx.to(x.device)]
            self.hessian.addmm_(xs.T, xs)
            self.hessian_count += xs.shape[0]

    @torch.no_grad()
    def reduce(self) -> None:
        """Under torchrun: make every rank's statistics those of all ranks' calls (see the module docstring).
        Call once, after the last update and before any algorithm reads them."""
        if not distributed.is_distributed():
            return
        distributed.all_reduce_(self.absmax, "max")
        if self.hessian is not None:
            distributed.all_reduce_(self.hessian, "sum")
        ranks = distributed.all_gather_object((self.calls, self.sums, self.samples, self.count, self.hessian_count))
        calls = sorted((c, r, k) for r, (cs, *_) in enumerate(ranks) for k, c in enumerate(cs))
        sum_abs = torch.zeros(self.in_features)
        for _, r, k in calls:  # the single process's order of additions
            sum_abs += ranks[r][1][k]
        self.sum_abs = sum_abs.to(self.absmax.device)
        self.samples = [ranks[r][2][k] for _, r, k in calls]
        self.calls, self.sums = [c for c, _, _ in calls], []
        self.count = sum(rank[3] for rank in ranks)
        self.hessian_count = sum(rank[4] for rank in ranks)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.sum_abs / max(self.count, 1)

    def sample_matrix(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(0, self.in_features)

    def normalized_hessian(self) -> torch.Tensor:
        """H = X^T X / n (GPTQ's 2/n factor cancels in the updates)."""
        return self.hessian / max(self.hessian_count, 1)

    def summary_copy(self) -> "GroupStats":
        """A copy holding the per-channel statistics only (no token sample, no Hessian): cheap to make and to
        rescale, for a trial transform on a scratch copy of a block (vqx.algorithms.block_search)."""
        other = copy.copy(self)
        other.samples, other.hessian, other.sums, other.calls = [], None, [], list(self.calls)
        return other

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
