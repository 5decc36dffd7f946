"""Imports every built-in stage so its registration (schema, step, exporter, evaluator, logger) runs."""

from . import algorithms, stages  # noqa: F401
from .config import schema  # noqa: F401
