"""Non-finite activations, named where they appear: the first layer whose output holds NaN/Inf, and a guard
that stops a transformer call the moment it returns them. Used by calibration, the block-wise algorithm
runner and evaluation."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .errors import Fault


def _nonfinite(x: Any) -> bool:
    return torch.is_tensor(x) and x.is_floating_point() and not bool(torch.isfinite(x).all())


@torch.no_grad()
def first_nonfinite_layer(root: torch.nn.Module, rerun: Callable[[], Any], prefix: str = "") -> str:
    """Rerun ``rerun`` with hooks on every leaf module of ``root``; the name of the first one (in execution
    order) whose output holds NaN/Inf, e.g. "block 1, layer ffn.net.2". Only called once things went wrong."""
    found: list[str] = []

    def hook(name):
        def check(module, args, out):
            if not found and any(_nonfinite(o) for o in (out if isinstance(out, (tuple, list)) else (out,))):
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(prefix + n)) for n, m in root.named_modules() if n and not any(m.children())]
    try:
        rerun()
    except Exception:  # noqa: BLE001 -- locating is best effort; the caller reports the non-finite output anyway
        pass
    finally:
        for h in handles:
            h.remove()
    if not found:
        return "no single layer (the attention or a residual add overflowed)"
    parts = found[0].split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return f"block {parts[1]}, layer {'.'.join(parts[2:])}"
    return f"layer {found[0]}"


@contextmanager
def nonfinite_guard(transformer: torch.nn.Module, where: Callable[[], str], fix: str) -> Iterator[None]:
    """Raise a Fault naming the block, layer and ``where()`` (sample/prompt, step) as soon as a transformer call
    returns NaN/Inf, instead of letting NaN latents flow on into statistics, caches or metrics."""
    busy = []

    def hook(module, args, kwargs, output):
        out = getattr(output, "sample", output[0] if isinstance(output, (tuple, list)) else output)
        if busy or not _nonfinite(out):
            return
        busy.append(1)  # the rerun below must not re-enter this hook
        layer = first_nonfinite_layer(module, lambda: module(*args, **kwargs))
        raise Fault(f"non-finite activations (NaN/Inf) {where()}: first in {layer}; {fix}")

    handle = transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
