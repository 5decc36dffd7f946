"""Quantization algorithms as registered steps composed into recipes (conf/algorithm/*.yaml)."""

from . import awq, gptq, rtn, smoothquant  # noqa: F401  (register the steps)
