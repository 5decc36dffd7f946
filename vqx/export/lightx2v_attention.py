"""What lightx2v runs for a run's quantized attention: the run-config keys that select its attention kernels, and
the lines LIGHTX2V.md says about them. The checkpoint itself carries no attention setting (lightx2v picks its
attention kernel per run config), so an attention setting with no lightx2v kernel is written down, not dropped.

lightx2v's attention types (lightx2v/common/ops/attn/sage_attn.py): ``sage_attn2`` calls SageAttention's
``sageattn`` (on Hopper, sm90: the int8 Q.K / fp8 P.V kernel vqx's sage2 emulates) except on sm89 and sm120,
where it calls ``sageattn_qk_int8_pv_fp16_triton`` (vqx's sage1); ``sage_attn3`` calls ``sageattn3_blackwell``
(NVFP4, vqx's nvfp4). Wan reads ``self_attn_1_type`` (self-attention), ``cross_attn_1_type`` (text
cross-attention) and ``cross_attn_2_type`` (I2V image cross-attention).
"""

from __future__ import annotations

SITE_KEYS = {"self": ("self_attn_1_type",), "cross": ("cross_attn_1_type", "cross_attn_2_type")}
UNQUANTIZED_TYPE = "flash_attn3"  # what lightx2v's Wan configs use for 16-bit attention on Hopper

KERNELS = {  # vqx attention preset -> (lightx2v attention type, which GPUs run these numbers with it)
    "sage1": ("sage_attn2", "sm89 and sm120 GPUs (Ada, RTX 50), where lightx2v's sage_attn2 calls SageAttention1's "
                            "Triton kernel; on Hopper the same type runs sage2's numbers"),
    "sage2": ("sage_attn2", "Hopper (sm90: H100, H200), where sageattn() picks this kernel; Ada and RTX 50 run "
                            "SageAttention1's Triton kernel (vqx's sage1) under the same type"),
    "nvfp4": ("sage_attn3", "Blackwell (sageattn3_blackwell)"),
}
NO_KERNEL = {
    "fp8": "lightx2v has no FP8 attention kernel",
    "sage2_k_int8_v_fp8": ("lightx2v's sage_attn2_k_int8_v_fp8 takes K and V already quantized (int8 K and fp8 V "
                           "with their scales); Wan's transformer passes 16-bit K and V, so no Wan run config can "
                           "select it (sage_attn2 on Hopper runs the same numbers with K smoothed)"),
}


def attention_keys(attention, task: str) -> dict[str, str]:
    """Run-config keys for the run's quantized attention sites (empty for attention=none or one lightx2v has no
    kernel for: the run config then keeps its own attention types)."""
    if attention is None or attention.name not in KERNELS:
        return {}
    kind = KERNELS[attention.name][0]
    keys = {}
    for site in attention.sites:
        for key in SITE_KEYS[site]:
            if key != "cross_attn_2_type" or task == "i2v":
                keys[key] = kind
    return keys


def attention_notes(attention, task: str) -> str:
    """LIGHTX2V.md's attention section ('' for attention=none)."""
    name = "none" if attention is None else attention.name
    if name == "none":
        return ""
    lines = [f"\n## Attention (vqx attention={name})\n"]
    keys = attention_keys(attention, task)
    if keys:
        kind, gpus = KERNELS[name]
        lines.append(f"The fragments set {', '.join(f'`{k}`' for k in keys)} to `{kind}`: these numbers on {gpus}.")
        sites_16 = [s for s in SITE_KEYS if s not in attention.sites]
        if sites_16:
            lines.append(f"vqx kept the {', '.join(sites_16)} attention 16-bit; the fragments leave its type to your "
                         f"run config (16-bit: e.g. `{UNQUANTIZED_TYPE}`).")
    else:
        lines.append(f"Not set in the fragments: {NO_KERNEL[name]}. vqx's scores are of its emulation; lightx2v "
                     f"runs the attention type of your run config.")
    steps = list(attention.full_precision_steps)
    if steps:
        lines.append(f"attention.full_precision_steps={steps}: lightx2v has no per-step attention type, so its runs "
                     f"use the quantized attention at those steps too.")
    return "\n".join(lines) + "\n"
