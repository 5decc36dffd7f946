"""Quantize each input group of a block once: the linears that read the same tensor share its quantization.

`share_inputs` gives a block one `SharedInput` per input group (a model adapter says which linears form a
group) and points the group's `QuantLinear`s at it: the first linear that quantizes the group's input leaves
the result there for the others. A model's fused block (e.g. vqx.models.wan.fused) goes further with
`SharedInputBlock`: it quantizes the group's input fused into the op that produces it and hands the linears a
placeholder tensor under which they find the quantized input (the dequantized activation for ``fake``, the
codes for ``kernel``). That needs consumers that pass the tensor straight to the linears and no hooks on them
(a hook must see the real input); otherwise the group's input is materialized and the linears quantize it
themselves (still once per group). A group whose input is not consumed by all its linears raises rather than
computing something else.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .fastpath import QuantizedActivation


def _version(x: torch.Tensor):
    try:
        return x._version
    except RuntimeError:  # inference tensors carry no version counter
        return None


class SharedInput:
    """The quantized input of one input group of one block, kept until each of its linears has read it."""

    def __init__(self, name: str, members: tuple[str, ...], quantized: int):
        self.name = name
        self.members = members
        self.quantized = quantized  # how many of the members are QuantLinears (read it through here)
        self.release()

    def release(self) -> None:
        self._x = self._key = self._value = None
        self._left = 0

    @property
    def pending(self) -> int:
        return self._left

    def lookup(self, x: torch.Tensor, key: tuple):
        if self._left > 0 and self._x is x and self._key == (key, _version(x)):
            value = self._value
            self._left -= 1
            if self._left == 0:
                self.release()
            return value
        return None

    def put(self, x: torch.Tensor, key: tuple, value, uses: int) -> None:
        """``value`` is the quantization of ``x`` for the next ``uses`` lookups with the same key."""
        if uses <= 0:
            self.release()
            return
        self._x, self._key, self._value, self._left = x, (key, _version(x)), value, uses


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def global_hooks() -> bool:
    from torch.nn.modules import module as mod

    return bool(mod._global_forward_hooks or mod._global_forward_pre_hooks)


def share_inputs(block: nn.Module, groups: Iterable[tuple[str, tuple[str, ...]]]) -> dict[str, SharedInput]:
    """One `SharedInput` per group (name, block-relative linear names) of ``block``, its QuantLinears pointed
    at it; returns name -> SharedInput (the block keeps it as ``_vqx_groups``)."""
    from .linear import QuantLinear

    shared_inputs = {}
    for name, linears in groups:
        layers = [m for m in (block.get_submodule(local) for local in linears) if isinstance(m, QuantLinear)]
        shared = SharedInput(name, linears, len(layers))
        shared_inputs[name] = shared
        # Linears of a group smoothed by equal 1/s vectors (each holds its own copy) share one key.
        same = object()
        first = layers[0].input_smooth_inv if layers else None
        for m in layers:
            m._shared = shared
            inv = m.input_smooth_inv
            m._smooth_key = same if (inv is not None and first is not None and inv.shape == first.shape
                                     and torch.equal(inv, first)) else None
    block._vqx_groups = shared_inputs
    return shared_inputs


class SharedInputBlock:
    """Mixin for a model's fused block (an ``nn.Module`` given ``_vqx_groups`` by `share_inputs`): the steps of
    handing a group's fused quantized input to its linears."""

    _vqx_groups: dict[str, SharedInput]

    def _group_spec(self, name: str, *consumers: nn.Module):
        """(QuantSpec, key) that all linears of group ``name`` quantize their input with, if the block may hand
        them a fused quantized input through ``consumers`` (hooks there would see the placeholder); else None."""
        from .linear import QuantLinear

        group = self._vqx_groups.get(name)
        if group is None or global_hooks() or any(has_hooks(c) for c in consumers):
            return None
        spec = key = None
        for local in group.members:
            m = self.get_submodule(local)
            if not isinstance(m, QuantLinear) or m._shared is not group or has_hooks(m) or m.act_grid is None:
                return None
            if key is None:
                spec, key = m.quant_spec(), m.quant_key()
            elif m.quant_key() != key:
                return None
        return spec, key

    def _hand_over(self, name: str, h: torch.Tensor | None, act, plan) -> tuple[torch.Tensor, bool]:
        """(tensor to pass to the group's consumer, whether it is a placeholder): h, or a placeholder under which
        the group's linears find ``act``."""
        if act is None:
            return h, False
        group = self._vqx_groups[name]
        token = act.codes if isinstance(act, QuantizedActivation) else act
        group.put(token, plan[1], act, len(group.members))
        return token, True

    def _check_consumed(self, name: str, handed: bool) -> None:
        group = self._vqx_groups[name]
        if handed and group.pending:
            group.release()
            raise RuntimeError(f"vqx: the quantized input of {name} was not read by all of {group.members} "
                               f"(an attention processor or FFN that does not pass it straight to them)")


def spec_of(plan):
    """The QuantSpec of a `SharedInputBlock._group_spec` plan (None: no fused quantization)."""
    return None if plan is None else plan[0]
