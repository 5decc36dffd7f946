"""Wan2.1 models: the layer table (adapter), tiny builders and loading."""
