"""Round to nearest: no transform and no search; materialization rounds each weight per output channel."""

from __future__ import annotations

from .registry import BlockContext, register_step


@register_step("rtn")
def rtn(ctx: BlockContext) -> None:
    for local in ctx.targets:
        ctx.choices.setdefault(local, {}).setdefault("method", "rtn")
