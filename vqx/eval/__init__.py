"""Evaluation: the `video` evaluator (paired 16-bit / quantized generation scored with LPIPS, PSNR, SSIM)
and `vqx score` for any two videos or images."""

from . import video  # noqa: F401  (registers eval=video and its schema)
