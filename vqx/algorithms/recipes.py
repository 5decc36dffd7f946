"""Config schemas of multi-step recipes: the union of their steps' settings (the steps stay generic)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import register_schema
from .awq import AWQSchema
from .gptq import GPTQSchema
from .smoothquant import SmoothQuantSchema


@dataclass
class SmoothQuantGPTQSchema(SmoothQuantSchema, GPTQSchema):
    pass


@dataclass
class AWQGPTQSchema(AWQSchema, GPTQSchema):
    pass


register_schema("algorithm", "smoothquant_gptq", SmoothQuantGPTQSchema)
register_schema("algorithm", "awq_gptq", AWQGPTQSchema)
