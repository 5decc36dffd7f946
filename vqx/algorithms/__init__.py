"""Quantization algorithms as registered steps composed into recipes (conf/algorithm/*.yaml)."""

from . import rtn  # noqa: F401  (registers its step)
