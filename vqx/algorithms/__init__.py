"""Quantization algorithms as registered steps composed into recipes (conf/algorithm/*.yaml); `vqx.plugins`
imports the step modules, `params` declares their parameters without importing torch."""
