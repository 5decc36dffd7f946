"""Round to nearest: every target keeps its weights and is rounded per output channel at materialization."""

from __future__ import annotations

from .registry import QuantContext, register_step


@register_step("rtn")
def rtn(ctx: QuantContext) -> None:
    # Nothing to transform or search: materialization rounds whatever no earlier step chose codes for.
    for target in ctx.targets:
        ctx.choices.setdefault(target.name, {})["method"] = "rtn"
