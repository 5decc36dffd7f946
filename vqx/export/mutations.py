"""Value-level corruptions of a lightx2v export that `vqx verify-export` must catch even when the manifest was
rewritten to match (a folder re-hashed by a tool, or written by a buggy exporter). Used by the tests and by
bench/verify_floor.py, which measures how far each one moves a block against the tolerance.

Each mutation edits the tensors of block ``a`` (and ``b`` where two blocks are involved) in place and returns
the native names it changed. Scales stay bf16-representable, so only the numeric check can see them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .folder import MANIFEST

LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


def _scale(t: dict, keys: list[str], factor: float, round_bf16: bool = False) -> list[str]:
    for k in keys:
        t[k] = _bf16(t[k] * factor) if round_bf16 else t[k] * factor
    return keys


def _swap(t: dict, pairs: list[tuple[str, str]]) -> list[str]:
    for x, y in pairs:
        t[x], t[y] = t[y], t[x]
    return [k for p in pairs for k in p]


def inverted_vectors(t, a, b):
    keys = [k for k in t if k.startswith(f"blocks.{a}.affine_norm")]
    for k in keys:
        t[k] = 1 / t[k]
    return keys


def vectors_1pct(t, a, b):
    return _scale(t, [f"blocks.{a}.affine_norm3.{p}" for p in ("weight", "bias")], 1.01)


def codes_swapped(t, a, b):
    return _swap(t, [(f"blocks.{a}.{n}.{p}", f"blocks.{b}.{n}.{p}") for n in LINEARS for p in ("weight", "weight_scale")])


def bias_zeroed(t, a, b, linear="self_attn.o"):
    t[f"blocks.{a}.{linear}.bias"] = torch.zeros_like(t[f"blocks.{a}.{linear}.bias"])
    return [f"blocks.{a}.{linear}.bias"]


def q_k_swapped(t, a, b):
    return _swap(t, [(f"blocks.{a}.self_attn.q.{p}", f"blocks.{a}.self_attn.k.{p}") for p in ("weight", "weight_scale", "bias")])


def transposed(t, a, b, linear="self_attn.o"):
    k = f"blocks.{a}.{linear}.weight"
    t[k] = t[k].t().contiguous()
    return [k]


def scales_1pct(t, a, b, linear="ffn.0"):
    return _scale(t, [f"blocks.{a}.{linear}.weight_scale"], 1.01, round_bf16=True)


def norm3_5pct(t, a, b):
    return _scale(t, [f"blocks.{a}.norm3.weight"], 1.05)


MUTATIONS: dict[str, Callable] = {
    "smoothing vectors s instead of 1/s": inverted_vectors,
    "smoothing vectors x1.01": vectors_1pct,
    "two blocks' codes swapped": codes_swapped,
    "a bias zeroed": bias_zeroed,
    "q and k swapped": q_k_swapped,
    "a square weight transposed": transposed,
    "one linear's scales x1.01": scales_1pct,
    "norm3 x1.05": norm3_5pct,
}
NEEDS_SMOOTHING = ("smoothing vectors s instead of 1/s", "smoothing vectors x1.01")


def mutate(folder: Path, fn: Callable, a: int, b: int, **kw) -> list[str]:
    """Apply ``fn`` to the folder's tensor files and rewrite the manifest's hashes to match."""
    files = sorted(p for p in folder.glob("*.safetensors"))
    tensors = {f: load_file(f) for f in files}
    where = {k: f for f, t in tensors.items() for k in t}
    merged = {k: v for t in tensors.values() for k, v in t.items()}
    changed = fn(merged, a, b, **kw)
    for f in {where[k] for k in changed}:
        save_file({k: merged[k] for k in tensors[f]}, str(f), metadata={"format": "pt"})
    rehash(folder)
    return changed


def rehash(folder: Path) -> None:
    """Rewrite the manifest's sha256 and sizes after a deliberate edit (what a re-hashing tool would do)."""
    m = json.loads((folder / MANIFEST).read_text())
    for name, entry in m["files"].items():
        data = (folder / name).read_bytes()
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (folder / MANIFEST).write_text(json.dumps(m))
