"""Block-level replay: the inputs of block 0 for a captured transformer call, and running one block.

Block 0's inputs are obtained by running the transformer's own forward up to the first block (a
pre-hook stops it there), so the preamble (patch embedding, condition embedder, rotary embedding,
image/text concatenation) is always diffusers' code, never a copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockInputs:
    hidden: torch.Tensor  # [1, L, D] in the model dtype
    encoder: torch.Tensor  # [1, T, D] (text, with image tokens first for I2V)
    temb: torch.Tensor  # timestep projection [1, 6, D]
    rotary: object  # rotary embedding (tensor or tuple), shared by calls of the same shape

    def to(self, device: torch.device, non_blocking: bool = False) -> "BlockInputs":
        def mv(t):
            if isinstance(t, torch.Tensor):
                return t.to(device, non_blocking=non_blocking)
            return tuple(x.to(device, non_blocking=non_blocking) for x in t)

        return BlockInputs(mv(self.hidden), mv(self.encoder), mv(self.temb), mv(self.rotary))


class _Stop(Exception):
    def __init__(self, args):
        self.block_args = args


@torch.no_grad()
def first_block_inputs(transformer, call: dict[str, torch.Tensor]) -> BlockInputs:
    """Run ``transformer(**call)`` only up to block 0 and return that block's inputs."""

    def grab(module, args, kwargs):
        raise _Stop(args)

    handle = transformer.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        transformer(**call, return_dict=False)
    except _Stop as stop:
        hidden, encoder, temb, rotary = stop.block_args
        return BlockInputs(hidden, encoder, temb, rotary)
    finally:
        handle.remove()
    raise RuntimeError("transformer forward never reached block 0")


@torch.no_grad()
def run_block(block, inputs: BlockInputs) -> torch.Tensor:
    return block(inputs.hidden, inputs.encoder, inputs.temb, inputs.rotary)
