"""Round to nearest: no transform, no search and no statistics; materialization rounds each weight as its scheme says."""

from __future__ import annotations

from .registry import BlockContext, register_step


@register_step("rtn")
def rtn(ctx: BlockContext) -> None:
    for local in ctx.targets:
        ctx.choices.setdefault(local, {}).setdefault("method", "rtn")
