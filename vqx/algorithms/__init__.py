"""Quantization algorithms as registered steps composed into recipes (conf/algorithm/*.yaml)."""

from . import awq, gptq, recipes, rtn, smoothquant  # noqa: F401  (register steps and schemas)
