"""The Wan2.1 layer table: one source of truth for block linears, input groups and native names.

`WanAdapter` (adapter.py) serves these tables to the quantizer, the algorithms, the exporter and the
verifier; nothing else hard-codes a Wan layer name. Names are relative to `transformer.blocks[i]` in
diffusers' `WanTransformer3DModel`; native names are the original Wan2.1 ones that lightx2v reads.
"""

from __future__ import annotations

import re

from torch import nn

from ..adapter import InputGroup

# diffusers block-relative linear name -> native (lightx2v) block-relative name
BLOCK_LINEARS_T2V: dict[str, str] = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
BLOCK_LINEARS_I2V_EXTRA: dict[str, str] = {
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
}

# Float (never quantized) block tensors: diffusers -> native.
BLOCK_FLOAT_TENSORS: dict[str, str] = {
    "scale_shift_table": "modulation",
    "attn1.norm_q.weight": "self_attn.norm_q.weight",
    "attn1.norm_k.weight": "self_attn.norm_k.weight",
    "attn2.norm_q.weight": "cross_attn.norm_q.weight",
    "attn2.norm_k.weight": "cross_attn.norm_k.weight",
    "attn2.norm_added_k.weight": "cross_attn.norm_k_img.weight",
    "norm2.weight": "norm3.weight",  # the swap: diffusers norm2 (affine) is native norm3
    "norm2.bias": "norm3.bias",
}

# Non-block tensors, by module prefix: diffusers -> native.
NON_BLOCK_PREFIXES: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
}


def block_linears(i2v: bool) -> dict[str, str]:
    return {**BLOCK_LINEARS_T2V, **(BLOCK_LINEARS_I2V_EXTRA if i2v else {})}


def input_groups(i2v: bool) -> list[InputGroup]:
    """The block's input groups in the order it runs them. Smoothing factors of the modulated-norm inputs (attn1
    q/k/v, the FFN) are applied at run time by lightx2v's per-block ``affine_norm1/affine_norm3`` vectors; the
    cross-attention query's fold into the affine ``norm2``; the attention outputs' into the value rows."""
    groups = [
        InputGroup("self_attn_in", ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "runtime", "affine_norm1"),
        InputGroup("self_attn_out", ("attn1.to_out.0",), "v_rows", "v_rows", ("attn1.to_v",)),
        InputGroup("cross_attn_q", ("attn2.to_q",), "norm", "norm2"),
        InputGroup("cross_attn_text", ("attn2.to_k", "attn2.to_v")),
    ]
    if i2v:
        groups.append(InputGroup("cross_attn_image", ("attn2.add_k_proj", "attn2.add_v_proj")))
    groups += [
        InputGroup("cross_attn_out", ("attn2.to_out.0",), "v_rows", "v_rows",
                   ("attn2.to_v", "attn2.add_v_proj") if i2v else ("attn2.to_v",)),
        InputGroup("ffn_in", ("ffn.net.0.proj",), "runtime", "affine_norm3"),
        InputGroup("ffn_out", ("ffn.net.2",)),
    ]
    return groups


def is_i2v(transformer: nn.Module) -> bool:
    return getattr(transformer.blocks[0].attn2, "add_k_proj", None) is not None


_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _translate(key: str, to_native: bool) -> str:
    """Rename a transformer state-dict key between diffusers and native names, from the tables above."""
    def pairs(table: dict[str, str]):
        return table.items() if to_native else ((n, d) for d, n in table.items())

    m = _BLOCK_RE.match(key)
    if m:
        idx, rest = m.groups()
        for src, dst in pairs({**BLOCK_LINEARS_T2V, **BLOCK_LINEARS_I2V_EXTRA}):
            if rest.startswith(src + "."):
                return f"blocks.{idx}.{dst}{rest[len(src):]}"
        for src, dst in pairs(BLOCK_FLOAT_TENSORS):
            if rest == src:
                return f"blocks.{idx}.{dst}"
    else:
        for src, dst in pairs(NON_BLOCK_PREFIXES):
            if key == src or key.startswith(src + "."):
                return dst + key[len(src):]
    raise KeyError(f"no {'native' if to_native else 'diffusers'} name for tensor {key!r}")


def native_key(diffusers_key: str) -> str:
    """Map a diffusers transformer state-dict key to its native Wan2.1 name (raises on unknown keys)."""
    return _translate(diffusers_key, to_native=True)


def diffusers_key(native: str) -> str:
    """Inverse of `native_key` (raises on names diffusers has no tensor for, such as lightx2v's
    ``affine_norm*`` smoothing vectors)."""
    return _translate(native, to_native=False)
