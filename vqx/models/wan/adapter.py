"""`WanAdapter`: what vqx knows about Wan2.1 (diffusers' `WanTransformer3DModel`), for the rest of vqx.

The layer table (layers.py) gives linears, input groups and native names; the fused block (fused.py)
quantizes each input group once; the shape rules are the VAE's (4x temporal, 8x spatial compression, the
first frame alone) and the transformer's patch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..adapter import BlockInputs, InputGroup, ModelAdapter, register_adapter
from . import layers

VAE_TEMPORAL = 4  # frames per latent frame after the first
VAE_SPATIAL = 8  # pixels per latent pixel, per side


@register_adapter("diffusers.models.transformers.transformer_wan.WanTransformer3DModel")
class WanAdapter(ModelAdapter):
    name = "wan"
    blocks_attr = "blocks"
    capture_keys = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")
    prompt_keys = ("encoder_hidden_states", "encoder_hidden_states_image")

    def transformers(self, pipe) -> list[nn.Module]:
        return [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]

    def is_i2v(self, transformer: nn.Module) -> bool:
        return layers.is_i2v(transformer)

    def block_linears(self, transformer: nn.Module) -> dict[str, str]:
        return layers.block_linears(self.is_i2v(transformer))

    def input_groups(self, transformer: nn.Module) -> list[InputGroup]:
        return layers.input_groups(self.is_i2v(transformer))

    def smoothing_groups(self, task: str) -> dict[str, str]:
        return {g.name: g.kind for g in layers.input_groups(task == "i2v") if g.kind is not None}

    def block_dtype(self, transformer: nn.Module) -> torch.dtype:
        return transformer.blocks[0].attn1.to_q.weight.dtype

    def hidden_size(self, transformer: nn.Module) -> int:
        return transformer.config.num_attention_heads * transformer.config.attention_head_dim

    def attention_heads(self, transformer: nn.Module) -> tuple[int, int]:
        return transformer.config.num_attention_heads, transformer.config.attention_head_dim

    def attention_sites(self, block: nn.Module) -> dict[str, nn.Module]:
        return {"self": block.attn1, "cross": block.attn2}

    def install_attention(self, transformer: nn.Module, attend_by_site: dict) -> int:
        from .attention import install

        return sum(install(self.attention_sites(block), attend_by_site) for block in transformer.blocks)

    def first_block_inputs(self, transformer: nn.Module, call: dict[str, torch.Tensor],
                           cache: dict | None = None) -> BlockInputs:
        """Block inputs (hidden, (encoder states, timestep projection, rotary embedding)); the encoder states
        hold the image tokens first for I2V. The rotary embedding depends only on the latent's shape: calls of
        one shape share it through ``cache``."""
        inp = super().first_block_inputs(transformer, call)
        if cache is None:
            return inp
        encoder, temb, rotary = inp.args
        rotary = cache.setdefault(("rotary", tuple(call["hidden_states"].shape)), rotary)
        return BlockInputs(inp.hidden, (encoder, temb, rotary))

    def tokens_per_call(self, transformer: nn.Module, call: dict[str, torch.Tensor]) -> int:
        return call["hidden_states"][0, 0].numel() // math.prod(transformer.config.patch_size)

    def video_tokens(self, transformer: nn.Module, height: int, width: int, num_frames: int) -> int:
        pt, ph, pw = transformer.config.patch_size
        latent_frames = (num_frames - 1) // VAE_TEMPORAL + 1
        return latent_frames // pt * (height // VAE_SPATIAL // ph) * (width // VAE_SPATIAL // pw)

    def check_frames(self, num_frames: int) -> str | None:
        if num_frames % VAE_TEMPORAL != 1:
            return (f"must be 4k+1 (Wan's VAE packs 4 frames per latent after the first), "
                    f"e.g. {num_frames // VAE_TEMPORAL * VAE_TEMPORAL + 1}")
        return None

    def build_pipeline(self, model, dtype: torch.dtype, device: torch.device):
        from pathlib import Path

        if model.source == "tiny":
            from .tiny import build_tiny_pipeline

            return build_tiny_pipeline(model.task, seed=model.seed, dtype=dtype)
        if model.source == "synthetic":
            from .synthetic import build_synthetic_pipeline

            # built on the device: random init of 14B on a CPU takes minutes (the later .to(device) is a no-op)
            return build_synthetic_pipeline(model.arch, dtype, device, model.num_layers, seed=model.seed)
        from .checkpoint import load_diffusers_folder

        self.check_model_folder(model)
        return load_diffusers_folder(Path(model.path).expanduser(), model.task, dtype)

    def check_model_folder(self, model) -> None:
        from pathlib import Path

        if model.source == "mini":  # says how to train it; then the checks of any diffusers folder apply
            from .checkpoint import check_mini_folder

            check_mini_folder(Path(str(model.path)).expanduser())
        elif model.source == "diffusers":  # complete, readable headers, weights matching their config: seconds
            from .checkpoint import check_diffusers_folder

            check_diffusers_folder(Path(str(model.path)).expanduser(), model.task)

    def check_outliers(self, scale: float, sites: list[str]) -> str | None:
        from .outliers import check_scale, check_sites, structure_change

        check_scale(scale)
        check_sites(sites)
        return structure_change(sites)

    def inject_outliers(self, transformer: nn.Module, channels: int, scale: float, seed: int, sites: list[str]) -> None:
        from .outliers import inject_outliers

        inject_outliers(transformer, channels, scale, seed, tuple(sites))

    def native_key(self, key: str) -> str:
        return layers.native_key(key)

    def diffusers_key(self, native: str) -> str:
        return layers.diffusers_key(native)

    def install_fused(self, transformer: nn.Module, blocks=None) -> int:
        from .fused import install

        return install(transformer, blocks)

    def unfused_block(self, block: nn.Module) -> nn.Module:
        from .fused import uninstall

        return uninstall(block)

