"""vqx: post-training quantization experiments for video diffusion transformers."""

__version__ = "0.1.0"
