"""Per-block statistics of the float model, computed once per capture and reused by later runs.

With `calib.propagate=fp` every block sees the float model's activations, so the statistics of its input
groups (absmax, mean |x|, the layer-report sample) do not depend on the algorithm or its parameters:
the points of an alpha sweep, or SmoothQuant at W8A8 and FP8, share them. They are saved one file per
block in a `DiskCache` entry keyed by the capture's identity and the statistics settings; a run whose
steps need more (search losses over the full sample, GPTQ Hessians) computes them itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import distributed
from ..calib.stats import GroupStats
from .registry import SHAREABLE_STATS, PlannedStep, stats_needed

VERSION = 1


def shareable(plan: list[PlannedStep], calib: DictConfig) -> bool:
    """Whether these steps read only what the shared statistics hold (and watch no float pass)."""
    if not calib.share_stats or calib.propagate != "fp" or distributed.is_distributed():
        return False  # under torchrun the ranks reduce their own statistics block by block
    return stats_needed(plan) <= SHAREABLE_STATS and not any(p.step.hooks is not None for p in plan)


def report_sample(stats: GroupStats, tokens: int, seed: int) -> torch.Tensor:
    """At most ``tokens`` rows of the group's token sample (seeded), for the layer-error report."""
    x = stats.sample_matrix()
    if x.shape[0] <= tokens:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:tokens]
    return x[idx.sort().values]


def identity(capture_identity: dict, groups: dict[int, list[str]], calib: DictConfig, dtype: torch.dtype,
             device: torch.device) -> dict:
    return {"version": VERSION, "capture": capture_identity, "groups": sorted(groups.items()),
            "loss_tokens": calib.loss_tokens, "report_tokens": calib.report_tokens, "seed": calib.seed,
            "dtype": str(dtype), "device": device.type}


def save_block(folder: Path, i: int, stats: dict[str, GroupStats], samples: dict[str, torch.Tensor],
               dtype: torch.dtype) -> None:
    tensors, counts = {}, {}
    for name, st in stats.items():
        x = samples[name]
        lossless = x.numel() == 0 or torch.equal(x.to(dtype).float(), x)  # inputs of a bf16 model are bf16
        tensors[f"{name}.absmax"] = st.absmax.detach().float().cpu().contiguous()
        tensors[f"{name}.sum_abs"] = st.sum_abs.detach().float().cpu().contiguous()
        tensors[f"{name}.samples"] = (x.to(dtype) if lossless else x).contiguous()
        counts[name] = st.count
    save_file(tensors, str(folder / f"block_{i:03d}.safetensors"), metadata={"counts": json.dumps(counts)})


def load_block(folder: Path, i: int, calib: DictConfig, device: torch.device) -> tuple[dict[str, GroupStats], dict[str, torch.Tensor]]:
    """(statistics, layer-report samples) of block ``i`` as the float pass left them."""
    file = folder / f"block_{i:03d}.safetensors"
    tensors = load_file(str(file))
    with safe_open(str(file), "pt") as f:
        counts = json.loads(f.metadata()["counts"])
    stats, samples = {}, {}
    for name, count in counts.items():
        absmax = tensors[f"{name}.absmax"]
        st = GroupStats(absmax.numel(), calib.loss_tokens, None, False, seed=0, device=device)
        st.absmax, st.sum_abs, st.count = absmax.to(device), tensors[f"{name}.sum_abs"].to(device), count
        samples[name] = tensors[f"{name}.samples"].float()
        st.samples = [samples[name]]
        stats[name] = st
    return stats, samples
