"""nvfp4 attention on Hopper: a Gluon kernel that overlaps the softmax with the tensor cores.

The Triton kernel (vqx.quant.attention_kernel) waits for each GEMM before the softmax that follows it, so the
tensor cores idle while nvfp4's P quantization runs (about 20 instructions per score): at 480p x 81 it costs twice
cuDNN's bf16 attention. This kernel issues tile j's Q.K and then tile j - 1's P.V and runs tile j's softmax while
P.V is on the tensor cores (FlashAttention-3's intra-warpgroup overlap; Gluon gives the control of wgmma's
asynchronous groups that Triton keeps to itself). K and V arrive by TMA into a ring of stages, each with one
mbarrier. P goes through shared memory (two buffers): in registers, the next tile's P would be written into the
registers the in-flight P.V still reads, and ptxas would wait for P.V before the softmax.

The numbers are the Triton kernel's: the same prep (FP4 values in bf16, exact; SageAttention3's smoothing and
``q_group_mean . k`` bias), the same P quantization (vqx.quant.attention_kernel._nvfp4_scaled on blocks held in one
thread's registers through `_tile_keys`' order; here K and V are written in that order by the prep, so TMA reads
whole tiles, and the bias is read through it), exp2 and fp32 accumulation. What differs from the eager path is
again the order of fp32 accumulation and ``exp2``; vqx.quant.attention_kernel.attention_fused runs this kernel only
after it matched the eager path on the adversarial inputs within the nvfp4 tolerance, as the Triton one.

Used for nvfp4 Q.K and P.V without Q prescaling, head dim 64 or 128, on compute capability 9.0 with Gluon.
"""

from __future__ import annotations

import torch

from .attention import SAGE3_Q_GROUP, AttentionScheme, p_log2_offset, smooth_qk
from .attention_kernel import _nvfp4, _nvfp4_scaled, _tile_keys

try:  # Gluon (Triton >= 3.5) and its Hopper ops
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    GLUON = False

TILE = 64  # keys per tile: the nvfp4 scheme's block_kv, whose running max P is quantized against
LOG2E = 1.44269504


def serves(s: AttentionScheme, q: torch.Tensor) -> bool:
    """Whether this kernel serves scheme s for q [B, H, L, D] (bf16 on a compute capability 9.0 device)."""
    return (GLUON and q.is_cuda and q.dtype == torch.bfloat16 and q.shape[-1] in (64, 128) and s.qk == "nvfp4"
            and s.pv == "nvfp4" and not s.q_prescale and s.block_kv == TILE
            and torch.cuda.get_device_capability(q.device) == (9, 0))


if GLUON:
    @gluon.jit
    def _softmax_p(s, bias, m_i, log2_scale, p_offset, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   ROW: gl.constexpr):
        """One key tile's P (bf16, nvfp4 in 1x16 blocks along the keys, in the scores' layout), the new running
        max and P's row sums (the Triton kernel's `_softmax_pv`, nvfp4 branch)."""
        s4 = gl.reshape(s + gl.expand_dims(bias, 0), [BLOCK_M, 8, 4, 2])  # column 8j + 2b + e: block b, (j, b, e)
        block_max = gl.max(gl.max(s4, 3), 1) * log2_scale  # [M, 4]: in-register
        tile_max = gl.max(block_max, 1)
        m_new = gl.maximum(gl.convert_layout(m_i, tile_max.type.layout), tile_max)
        shift = gl.expand_dims(m_new - p_offset, 1)  # [M, 1] in block_max's layout
        p = gl.exp2(s4 * log2_scale - gl.expand_dims(gl.expand_dims(shift, 1), 3))
        pq = _nvfp4_scaled(p, gl.exp2(block_max - shift), (3, 1), False)  # exp2 is monotone: the blocks' max p
        row_sum = gl.sum(gl.sum(gl.sum(p, 3), 2), 1)
        pq = gl.convert_layout(gl.reshape(pq, [BLOCK_M, BLOCK_N]).to(gl.bfloat16), s.type.layout)
        return pq, gl.convert_layout(m_new, ROW), gl.convert_layout(row_sum, ROW)

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_smem, v_smem, bars, kv_row, tile, stage, ok, BLOCK_N: gl.constexpr):
        """K and V of a key tile into a stage, both counted on the stage's barrier."""
        bar = bars.index(stage)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(k_desc, [kv_row + tile * BLOCK_N, 0], bar, k_smem.index(stage), pred=ok)
        tma.async_copy_global_to_shared(v_desc, [kv_row + tile * BLOCK_N, 0], bar, v_smem.index(stage), pred=ok)

    @gluon.jit
    def _step(p_smem, s, acc, m_i, l_i, j, q_smem, k_smem, v_smem, bars, k_desc, v_desc, kv_row, n_tiles, bias_row,
              keys, log2_scale, p_offset, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              ROW_S: gl.constexpr, ROW_O: gl.constexpr):
        """Key tile j: its Q.K, then P.V of tile j - 1, which runs on the tensor cores during tile j's softmax."""
        bias = gl.load(bias_row + j * BLOCK_N + keys).to(gl.float32)
        st = j % STAGES
        mbarrier.wait(bars.index(st), (j // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), s, use_acc=False, is_async=True)
        prev = (j - 1) % STAGES
        acc = warpgroup_mma(p_smem.index((j - 1) % 2), v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))
        p, m_new, row_sum = _softmax_p(s, bias, m_i, log2_scale, p_offset, BLOCK_M, BLOCK_N, ROW_S)
        p_smem.index(j % 2).store(p)
        fence_async_shared()
        alpha = gl.exp2(m_i - m_new)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, ROW_O), 1)
        l_i = l_i * alpha + row_sum
        gl.barrier()  # both warpgroups are done with tile j - 1's stage: refill it
        _load_kv(k_desc, v_desc, k_smem, v_smem, bars, kv_row, j - 1 + STAGES, prev, j - 1 + STAGES < n_tiles,
                 BLOCK_N)
        return s, acc, m_new, l_i

    @gluon.jit
    def nvfp4_attention_fwd(q_desc, k_desc, v_desc, Bias, Out, H, lq, lk_pad, bias_bh, bias_group, log2_scale,
                            p_offset, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                            STAGES: gl.constexpr, num_warps: gl.constexpr):
        """Out [B, Lq, H, D] from Q [B*H*Lq, D], K and V [B*H*lk_pad, D] (64-key tiles in `_tile_keys`' order) and
        the bias [B*H, query groups, lk_pad + 64] in key order (-inf past lk)."""
        start_m = gl.program_id(0)
        bh = gl.program_id(1)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
        p_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_M, BLOCK_N],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.bfloat16))
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)

        n_tiles = lk_pad // BLOCK_N
        kv_row = bh * lk_pad
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [bh * lq + start_m * BLOCK_M, 0], q_bar, q_smem)
        for i in gl.static_range(STAGES - 1):
            _load_kv(k_desc, v_desc, k_smem, v_smem, bars, kv_row, i, i, i < n_tiles, BLOCK_N)
        bias_row = Bias + bh * bias_bh + ((start_m * BLOCK_M) // 128) * bias_group
        keys = _tile_keys(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), True)

        mbarrier.wait(q_bar, 0)
        mbarrier.wait(bars.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)),
                          gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
        bias = gl.load(bias_row + keys).to(gl.float32)
        p, m_i, l_i = _softmax_p(s, bias, m_i, log2_scale, p_offset, BLOCK_M, BLOCK_N, row_s)
        p_smem.index(0).store(p)
        fence_async_shared()
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
        for j in range(1, n_tiles):
            s, acc, m_i, l_i = _step(p_smem, s, acc, m_i, l_i, j, q_smem, k_smem, v_smem, bars, k_desc, v_desc,
                                     kv_row, n_tiles, bias_row, keys, log2_scale, p_offset, BLOCK_M, BLOCK_N, STAGES,
                                     row_s, row_o)
        last = n_tiles - 1
        mbarrier.wait(bars.index(last % STAGES), (last // STAGES) & 1)
        acc = warpgroup_mma(p_smem.index(last % 2), v_smem.index(last % STAGES), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        mbarrier.invalidate(q_bar)

        out = (acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)).to(gl.bfloat16)
        rows = start_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_o)
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        dst = Out + ((bh // H) * lq * H + bh % H) * D + gl.expand_dims(rows, 1) * (H * D) + gl.expand_dims(cols, 0)
        gl.store(dst, out, mask=gl.expand_dims(rows < lq, 1))


def hopper_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: AttentionScheme) -> dict:
    """The kernel's operands for bf16 q, k, v [B, H, L, D]: the Triton kernel's prep (kernel_inputs, nvfp4) with K
    and V padded to whole 64-key tiles in `_tile_keys`' order, and the bias padded with -inf past the last key."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    lk_pad = -(-lk // TILE) * TILE
    q, k, group_mean = smooth_qk(q, k, s)
    groups = -(-lq // SAGE3_Q_GROUP)
    shape = (b * h, groups) if group_mean is not None else (1, 1)  # without Q smoothing: one row, read by all
    bias = torch.zeros(*shape, lk_pad + TILE, dtype=torch.bfloat16, device=q.device)  # a spare tile at the end
    if group_mean is not None:
        bias[:, :, :lk] = (group_mean @ k.transpose(-1, -2)).reshape(b * h, groups, lk)
    bias[:, :, lk:lk_pad] = float("-inf")
    return dict(q=_nvfp4(q, False).view(b * h * lq, d), k=_nvfp4(k, False, TILE).view(b * h * lk_pad, d),
                v=_nvfp4(v, True, TILE).view(b * h * lk_pad, d), bias=bias, shape=(b, h, lq, d), lk_pad=lk_pad,
                log2_scale=(d ** -0.5) * LOG2E, p_offset=p_log2_offset(s))


# (BLOCK_M, STAGES, num_warps): two warpgroups of 64 query rows; three stages of K and V (one refilled per tile)
CONFIG = (128, 3, 8)


def launch(ops: dict, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The kernel over `hopper_inputs`' operands: [B, H, Lq, D] bf16 (a view of a [B, Lq, H, D] tensor)."""
    b, h, lq, d = ops["shape"]
    block_m, stages, warps = config or CONFIG
    layout = lambda rows: gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16)  # noqa: E731
    desc = lambda t, rows: TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, d], layout(rows))  # noqa: E731
    bias = ops["bias"]
    out = torch.empty(b, lq, h, d, dtype=torch.bfloat16, device=bias.device)
    nvfp4_attention_fwd[(triton.cdiv(lq, block_m), b * h)](
        desc(ops["q"], block_m), desc(ops["k"], TILE), desc(ops["v"], TILE), bias, out, h, lq, ops["lk_pad"],
        bias.stride(0) if bias.shape[0] > 1 else 0, bias.stride(1) if bias.shape[1] > 1 else 0,
        float(ops["log2_scale"]), float(ops["p_offset"]), D=d, BLOCK_M=block_m, BLOCK_N=TILE, STAGES=stages,
        num_warps=warps)
    return out.transpose(1, 2)
