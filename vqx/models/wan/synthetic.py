"""Full-size Wan2.1 transformer architectures with random weights, for benchmarks and memory tests.

The transformer has the real shape (1.3B or 14B, optionally fewer blocks); VAE and text encoder are
tiny stand-ins with the right interfaces (text width 4096), so a pipeline samples at 480p x 81 frames
with the real transformer cost. Weights are random: quality numbers from these models mean nothing.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

WAN_ARCHS = {
    "1.3B": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14B": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}
TEXT_DIM = 4096


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_transformer(arch: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                      num_layers: int | None = None, i2v: bool = False, seed: int = 0):
    """A random-init WanTransformer3DModel of the real size, created directly in ``dtype`` on ``device``."""
    from diffusers import WanTransformer3DModel

    from .tiny import cast_transformer

    cfg = dict(WAN_ARCHS[arch])
    if num_layers is not None:
        cfg["num_layers"] = num_layers
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(torch.float32 if dtype == torch.float32 else dtype):
        tr = WanTransformer3DModel(
            patch_size=(1, 2, 2), in_channels=36 if i2v else 16, out_channels=16, text_dim=TEXT_DIM, freq_dim=256,
            image_dim=1280 if i2v else None, added_kv_proj_dim=inner if i2v else None, **cfg)
    return cast_transformer(tr, dtype).eval()


def build_synthetic_pipeline(arch: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                             num_layers: int | None = None, seed: int = 0):
    """A T2V WanPipeline around a full-size random transformer (tiny VAE and text encoder)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from .tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=32, d_ff=64,
                                               num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    transformer = build_transformer(arch, dtype, device, num_layers, seed=seed)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
