"""The evaluated model's own block outputs, recorded into a lightx2v export so `vqx verify-export` stands on its own.

At export time each verified block of the evaluated (fake-quant) model runs on one set of seeded inputs in fp32:
a copy of the block with every float tensor upcast exactly and every QuantLinear weight recomputed as codes x
scale in fp32, which are the values the folder holds. ``REFERENCE_FILE`` stores those inputs, each block's
output, and the activation codes and scales each of its quantized linears multiplied (``act_codes``, ``act_scale``:
per token for int8/fp8, per group or per tensor for the low-bit schemes; an input shared by several linears or blocks
is stored once, ``alias`` in the metadata).
`vqx verify-export` later computes lightx2v's math on the folder's tensors in fp32 and compares with these
(`block_compare`), so a folder whose values changed after the export (vectors inverted, codes swapped, a bias
zeroed, scales off by 1%) fails even when its manifest was rewritten to match.

The file sits in a subfolder because lightx2v merges every ``*.safetensors`` at the top of the folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from ..io import write_json_atomic
from ..models.adapter import adapter_for
from ..quant.linear import QuantLinear
from ..quant.scheme import quantize_activation
from . import contract, lightx2v_math

REFERENCE_FILE = "reference/block_outputs.safetensors"
GRID = (1, 4, 6)  # latent frames, height, width after patching: 24 tokens (> 16 for torch._int_mm on CUDA)
TEXT_TOKENS_T2V = 64  # T2V cross-attention takes any length; diffusers' I2V splits off all but Wan's 512
IMAGE_TOKENS = 32  # > 16: torch._int_mm on CUDA needs more than 16 rows
INPUTS = ("x", "embed0", "context", "context_img")
METADATA_KEY = "vqx_reference"


def block_inputs(dim: int, i2v: bool, seed: int) -> dict[str, torch.Tensor]:
    """Seeded fp32 inputs of one block: tokens x [L, D], the time projection embed0 [6, D], text tokens
    [Lc, D] and (I2V) image tokens [Li, D], all already in the block's width."""
    g = torch.Generator().manual_seed(seed)
    out = {"x": torch.randn(GRID[0] * GRID[1] * GRID[2], dim, generator=g),
           "embed0": torch.randn(6, dim, generator=g) * 0.5,
           "context": torch.randn(contract.WAN_TEXT_LEN if i2v else TEXT_TOKENS_T2V, dim, generator=g)}
    if i2v:
        out["context_img"] = torch.randn(IMAGE_TOKENS, dim, generator=g)
    return out


def fp32_block(block: torch.nn.Module, adapter) -> torch.nn.Module:
    """A copy of a quantized block computing in fp32 on exactly the values an export of it holds, with the
    model family's plain forward (no fused kernels, every linear quantizing its own input)."""
    ref = adapter.unfused_block(copy.deepcopy(block))
    for m in ref.modules():
        for name, p in m.named_parameters(recurse=False):
            if p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.dtype in (torch.bfloat16, torch.float16):
                m._buffers[name] = b.float()
        if isinstance(m, QuantLinear):
            m._buffers["weight"] = m.dequantized_weight_fp32()
            m.backend = "fake"
    return ref


def diffusers_rotary(head_dim: int, patch_size) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    f, h, w = GRID
    pt, ph, pw = patch_size
    cos, sin = WanRotaryPosEmbed(head_dim, tuple(patch_size), 1024)(
        torch.empty(1, 1, f * pt, h * ph, w * pw, device="meta"))
    return cos.float(), sin.float()


@torch.no_grad()
def block_output(block: torch.nn.Module, inputs: dict[str, torch.Tensor], rotary) -> torch.Tensor:
    """A diffusers Wan block on `block_inputs` (image tokens go before the text tokens, as in Wan's I2V)."""
    dev = next(block.parameters()).device
    i = {k: v.to(dev) for k, v in inputs.items()}
    ctx = i["context"] if "context_img" not in i else torch.cat([i["context_img"], i["context"]])
    out = block(i["x"][None], ctx[None], i["embed0"][None], tuple(r.to(dev) for r in rotary))
    return out[0].float().cpu()


@torch.no_grad()
def record(transformer: torch.nn.Module, path: Path, blocks: list[int], seed: int, scheme: str) -> int:
    """Write the seeded inputs and, for each of ``blocks``, the evaluated block's fp32 output and its linears'
    activation codes: per token as lightx2v ``scheme`` "int8"/"fp8" computes them, or for a low-bit scheme the
    layer's own (`scheme.quantize_activation`: group codes and scales, NVFP4 under its calibrated global scale,
    static fp8; weight-only layers have none). Returns the tensor count."""
    adapter = adapter_for(transformer)
    dim = adapter.hidden_size(transformer)
    inputs = block_inputs(dim, adapter.is_i2v(transformer), seed)
    cfg = transformer.config
    rotary = diffusers_rotary(cfg.attention_head_dim, cfg.patch_size)
    tensors = {f"inputs.{k}": v for k, v in inputs.items()}
    alias: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for i in blocks:
        block = fp32_block(adapter.blocks(transformer)[i], adapter)
        captured: dict[str, torch.Tensor] = {}
        hooks = [block.get_submodule(local).register_forward_pre_hook(_capture(captured, native))
                 for local, native in adapter.block_linears(transformer).items()]
        tensors[f"blocks.{i}"] = block_output(block, inputs, rotary)
        for h in hooks:
            h.remove()
        for native, (x, q) in captured.items():
            if scheme in ("int8", "fp8"):
                codes, scale = lightx2v_math.act_quant(x, scheme, "vllm")
            elif q.act_scheme is None:
                continue  # weight-only: the GEMM reads the 16-bit input
            else:
                codes, scale = quantize_activation(x, q.act_scheme, q.input_scale)
                codes = _one_byte(codes, q.act_scheme.grid_)
            key = f"blocks.{i}.{native}"
            content = (tuple(codes.shape), codes.view(torch.int8).cpu().numpy().tobytes(), scale.cpu().numpy().tobytes())
            if content in seen:
                alias[key] = seen[content]
                continue
            seen[content] = key
            tensors[f"{key}.act_codes"], tensors[f"{key}.act_scale"] = codes.cpu(), scale.cpu()
        del block
    path.parent.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes a multi-key table in hash order, which differs between processes
    info = {"grid": list(GRID), "seed": seed, "dtype": "float32", "alias": alias, "producer": f"vqx {__version__}"}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})
    return len(tensors)


def _one_byte(codes: torch.Tensor, grid) -> torch.Tensor:
    """fp32 codes in one byte each where that is exact: int8 storage, or e4m3 (which holds every E2M1 and E3M2
    value); else as they are."""
    small = codes.to(grid.storage_dtype or torch.float8_e4m3fn)
    return small if torch.equal(small.float(), codes) else codes


def _capture(store: dict, native: str):
    def hook(module: QuantLinear, args):
        x = args[0].float().reshape(-1, args[0].shape[-1])
        inv = module.input_smooth_inv
        store[native] = (x if inv is None else x * inv, module)  # what the layer quantizes (its 1/s applied, in fp32)
    return hook


WEIGHTS_FILE = "reference/weights.json"  # low-bit exports: each linear's evaluated weight, by hash


def weight_digest(weight_fp32: torch.Tensor) -> str:
    """sha256 of a dequantized weight's fp32 bytes (row-major)."""
    return hashlib.sha256(weight_fp32.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def record_weights(transformer: torch.nn.Module, path: Path) -> int:
    """For a low-bit export, whose matmul vqx does not emulate yet: native linear name -> sha256 of the fp32 weight
    the evaluated QuantLinear multiplied by (codes x scales), so `vqx verify-export` can check that the folder's
    tensors, unpacked, give back exactly those weights. Returns the number of linears."""
    adapter = adapter_for(transformer)
    digests, inputs = {}, {}
    for i, block in enumerate(adapter.blocks(transformer)):
        for local, native in adapter.block_linears(transformer).items():
            q = block.get_submodule(local)
            if isinstance(q, QuantLinear):
                digests[f"blocks.{i}.{native}"] = weight_digest(q.dequantized_weight_fp32())
                value = q.input_absmax if q.input_absmax is not None else q.input_scale
                if value is not None:  # the calibrated activation value (NVFP4's absmax, a static scale), exactly
                    inputs[f"blocks.{i}.{native}"] = float(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"vqx_version": __version__, "sha256_fp32_weight": digests, "input_value": inputs})
    return len(digests)
