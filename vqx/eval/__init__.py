"""Evaluation: the `video` evaluator (paired 16-bit / quantized generation scored with LPIPS, PSNR, SSIM)
and `vqx score` for any two videos or images. `schemas` registers eval=video's settings without importing torch;
`vqx.plugins` imports the evaluator."""
