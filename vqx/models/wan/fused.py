"""Wan's fused block: each input group of a quantized block quantized once, fused into the op that produces it.

`install` (`WanAdapter.install_fused`, which `materialize` runs for every block it quantizes) gives the block:
- one `SharedInput` per input group (layers.input_groups; vqx.quant.shared): linears that read the same tensor
  (attn1 q/k/v, attn2 k/v, I2V add_k/add_v) quantize it once, not once each;
- a forward that is diffusers' `WanTransformerBlock.forward`, op for op, except that the self-attention's
  rotary embedding of q and k runs as one kernel each, and the elementwise ops before a quantized group
  run fused with the group's quantization: the modulated norms before attn1 and
  the FFN (``(n * (1 + scale) + shift).to(dtype)``), the cast after the cross-attention norm, the FFN's
  tanh-GELU, and the two gated residual updates. Each fused op runs as one Triton kernel on CUDA and as
  its eager twin (the same PyTorch ops as diffusers) elsewhere (see ops.py), so the result is the
  diffusers block with `QuantLinear`s, bit for bit, on either path.

A fused group hands its linears the quantized input directly, under a placeholder tensor (vqx.quant.shared).
That needs a processor that passes the block's tensor straight to the projections (diffusers'
`WanAttnProcessor`) and no hooks on the linears (a hook must see the real input); otherwise the group's input
is materialized and the linears quantize it themselves (still once per group).
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanTransformerBlock, _get_qkv_projections
from torch import nn

from ...quant.fastpath import QuantizedActivation
from ...quant.shared import SharedInput, SharedInputBlock, global_hooks, has_hooks, share_inputs, spec_of
from . import ops
from .attention import QuantAttnProcessor
from .layers import input_groups, is_i2v


def _plain_processor(attn: nn.Module) -> bool:
    """diffusers' WanAttnProcessor (or vqx's twin with a replaceable attention), unfused projections: the block's
    tensor goes straight to the projections."""
    proc = attn.processor
    return ((type(proc).__name__ == "WanAttnProcessor" or isinstance(proc, QuantAttnProcessor))
            and not getattr(attn, "fused_projections", False))


class FusedWanTransformerBlock(SharedInputBlock, WanTransformerBlock):
    """diffusers' WanTransformerBlock with group-shared, fused activation quantization (module doc)."""

    def _self_attention(self, x: torch.Tensor, rotary_emb) -> torch.Tensor:
        """``self.attn1(x, None, None, rotary_emb)``: diffusers' WanAttnProcessor op for op, with the rotary
        embedding of q and k in one pass each (`ops.rope`); the module itself where that is not sure to be
        the same computation (another processor, hooks on the attention, no rotary embedding)."""
        attn = self.attn1
        if (rotary_emb is None or not _plain_processor(attn) or attn.add_k_proj is not None or has_hooks(attn)
                or global_hooks()):
            return attn(x, None, None, rotary_emb)
        query, key, value = _get_qkv_projections(attn, x, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = ops.rope(query, *rotary_emb)
        key = ops.rope(key, *rotary_emb)
        proc = attn.processor
        if isinstance(proc, QuantAttnProcessor):
            out = proc.attention(query, key, value, proc._parallel_config)
        else:
            out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                        backend=proc._attention_backend, parallel_config=proc._parallel_config)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        if temb.ndim == 4 or not hasattr(self, "_vqx_groups"):  # Wan2.2 TI2V per-token modulation
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        dtype = hidden_states.dtype
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()
        ).chunk(6, dim=1)

        # 1. Self-attention
        plan = self._group_spec("self_attn_in", self.attn1) if _plain_processor(self.attn1) else None
        h, act = ops.modulate(self.norm1(hidden_states.float()), scale_msa, shift_msa, dtype, spec_of(plan))
        x_in, handed = self._hand_over("self_attn_in", h, act, plan)
        attn_output = self._self_attention(x_in, rotary_emb)
        self._check_consumed("self_attn_in", handed)
        hidden_states = ops.gated_residual(hidden_states, attn_output, gate_msa)

        # 2. Cross-attention
        plan = self._group_spec("cross_attn_q", self.attn2) if _plain_processor(self.attn2) else None
        h, act = ops.cast(self.norm2(hidden_states.float()), dtype, spec_of(plan))
        x_in, handed = self._hand_over("cross_attn_q", h, act, plan)
        attn_output = self.attn2(x_in, encoder_hidden_states, None, None)
        self._check_consumed("cross_attn_q", handed)
        hidden_states = hidden_states + attn_output

        # 3. Feed-forward
        plan = self._group_spec("ffn_in", self.ffn, self.ffn.net[0]) if isinstance(self.ffn, FeedForward) else None
        h, act = ops.modulate(self.norm3(hidden_states.float()), c_scale_msa, c_shift_msa, dtype, spec_of(plan))
        x_in, handed = self._hand_over("ffn_in", h, act, plan)
        ff_output = self.ffn(x_in)
        self._check_consumed("ffn_in", handed)
        for group in self._vqx_groups.values():  # nothing stays referenced between calls
            group.release()
        return ops.gated_residual(hidden_states, ff_output, c_gate_msa)


class FusedFeedForward(FeedForward):
    """diffusers' FeedForward whose tanh-GELU is fused with the quantization of the output linear's input."""

    _vqx_out_group: SharedInput | None = None

    def forward(self, hidden_states, *args, **kwargs):
        from diffusers.models.activations import GELU

        from ...quant.linear import QuantLinear

        group = self._vqx_out_group
        net = self.net
        ok = (group is not None and len(net) == 3 and type(net[0]) is GELU and net[0].approximate == "tanh"
              and isinstance(net[1], nn.Dropout) and not self.training and not args and not kwargs
              and not has_hooks(net[0]) and not has_hooks(net[1]) and not global_hooks())
        out = net[2] if ok else None
        if not (isinstance(out, QuantLinear) and out._shared is group and not has_hooks(out) and out.act_grid is not None):
            return super().forward(hidden_states, *args, **kwargs)
        y = net[0].proj(hidden_states)
        spec = out.quant_spec()
        act = ops.gelu_quantize(y, spec)
        if act is None:
            return out(net[1](net[0].gelu(y)))
        token = act.codes if isinstance(act, QuantizedActivation) else act
        group.put(token, out.quant_key(), act, 1)
        result = out(net[1](token))
        if group.pending:
            group.release()
            raise RuntimeError("vqx: the fused GELU output was not read by ffn.net.2")
        return result


# Keep diffusers' class names (its by-name machinery, compile_repeated_blocks and _no_split_modules, still finds
# the blocks); __qualname__ stays, so pickle finds the classes.
FusedWanTransformerBlock.__name__ = "WanTransformerBlock"
FusedFeedForward.__name__ = "FeedForward"


def uninstall(block: nn.Module) -> nn.Module:
    """One block back to diffusers' own forward, each linear quantizing its own input (in place)."""
    if isinstance(block, FusedWanTransformerBlock):
        block.__class__ = WanTransformerBlock
    if isinstance(block.ffn, FusedFeedForward):
        block.ffn.__class__ = FeedForward
    for m in block.modules():
        if hasattr(m, "_shared"):
            m._shared = None
    return block


def install(transformer: nn.Module, blocks=None) -> int:
    """Give blocks (all, or the indices in ``blocks``) shared group inputs and the fused forward; returns how
    many blocks have it. Idempotent; blocks of other classes are left alone. Call again after replacing
    linears (materialize does)."""
    indices = range(len(transformer.blocks)) if blocks is None else sorted(set(blocks))
    if not any(isinstance(transformer.blocks[i], WanTransformerBlock) for i in indices):
        return 0
    i2v = is_i2v(transformer)
    done = 0
    for i in indices:
        block = transformer.blocks[i]
        if type(block) is WanTransformerBlock:
            block.__class__ = FusedWanTransformerBlock
        if not isinstance(block, FusedWanTransformerBlock):
            continue
        if type(block.ffn) is FeedForward:
            block.ffn.__class__ = FusedFeedForward
        groups = share_inputs(block, [(g.name, g.linears) for g in input_groups(i2v)])
        if isinstance(block.ffn, FusedFeedForward):
            block.ffn._vqx_out_group = groups["ffn_out"]
        done += 1
    return done
