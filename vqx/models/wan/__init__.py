"""Wan2.1 in one package: the layer table (layers.py), its model adapter (adapter.py), the fused block (fused.py)
and its elementwise ops (ops.py), checkpoint and folder checks (checkpoint.py), and model builders: tiny.py
(toy width, for tests), synthetic.py (full-size random weights, for benchmarks), outliers.py (activation
outliers injected without changing the float model)."""

from . import adapter  # noqa: F401  (registers WanAdapter)
