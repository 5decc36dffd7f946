"""Block-level replay: the inputs of the first block for a captured transformer call, and running one block.

The first block's inputs are obtained by running the transformer's own forward up to that block (a pre-hook
stops it there; `ModelAdapter.first_block_inputs`), so the preamble (patch embedding, conditioning, rotary
embedding, image/text concatenation) is always diffusers' code, never a copy of it.
"""

from __future__ import annotations

import torch

from ..models.adapter import BlockInputs, adapter_for


def first_block_inputs(transformer, call: dict[str, torch.Tensor], cache: dict | None = None) -> BlockInputs:
    """Run ``transformer(**call)`` only up to its first block and return that block's inputs (``cache``: one dict
    per capture, so calls share inputs that depend only on their shapes)."""
    return adapter_for(transformer).first_block_inputs(transformer, call, cache)


@torch.no_grad()
def run_block(block, inputs: BlockInputs) -> torch.Tensor:
    return block(inputs.hidden, *inputs.args)
