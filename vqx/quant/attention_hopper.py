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
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # bar.sync: gl.barrier from Triton 3.7
    GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    GLUON = False

LOG2E = 1.44269504


def serves(s: AttentionScheme, q: torch.Tensor) -> bool:
    """Whether this kernel serves scheme s for q [B, H, L, D] (bf16 on a compute capability 9.0 device)."""
    return (GLUON and q.is_cuda and q.dtype == torch.bfloat16 and q.shape[-1] in (64, 128) and s.qk == "nvfp4"
            and s.pv == "nvfp4" and not s.q_prescale and s.block_kv in (64, 128)
            and torch.cuda.get_device_capability(q.device) == (9, 0))


if GLUON:
    @gluon.jit
    def _softmax_p(s, bias, m_i, log2_scale, p_offset, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   ROW: gl.constexpr):
        """One key tile's P (fp32 on nvfp4's grid, 1x16 blocks along the keys, [M, N]), the new running max and
        P's row sums: the Triton kernel's `_softmax_pv` (nvfp4 branch), op for op."""
        # column 64t + 8j + 2b + e holds nvfp4 block b of 64-key group t (one thread's registers): axes (t, j, b, e)
        s5 = gl.reshape(s + gl.expand_dims(bias, 0), [BLOCK_M, BLOCK_N // 64, 8, 4, 2])
        block_max = gl.max(gl.max(s5, 4), 2) * log2_scale  # [M, N / 64, 4]
        tile_max = gl.max(gl.max(block_max, 2), 1)
        m_new = gl.maximum(gl.convert_layout(m_i, tile_max.type.layout), tile_max)
        shift = gl.expand_dims(gl.expand_dims(m_new - p_offset, 1), 2)  # [M, 1, 1] in block_max's layout
        p = gl.exp2(s5 * log2_scale - gl.expand_dims(gl.expand_dims(shift, 2), 4))
        pq = _nvfp4_scaled(p, gl.exp2(block_max - shift), (4, 2), False)  # exp2 is monotone: the blocks' max p
        row_sum = gl.sum(gl.sum(gl.sum(gl.sum(p, 4), 3), 2), 1)
        return gl.reshape(pq, [BLOCK_M, BLOCK_N]), gl.convert_layout(m_new, ROW), gl.convert_layout(row_sum, ROW)

    @gluon.jit
    def _load(desc, smem, bars, kv_row, tile, stage, ok, BLOCK_N: gl.constexpr):
        """A key tile of K or V into a stage of its ring."""
        bar = bars.index(stage)
        mbarrier.expect(bar, desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(desc, [kv_row + tile * BLOCK_N, 0], bar, smem.index(stage), pred=ok)

    @gluon.jit
    def _step(p_smem, s, acc, m_i, l_i, j, q_smem, k_smem, v_smem, k_bars, v_bars, k_desc, v_desc, kv_row, n_tiles,
              bias_row, keys, log2_scale, p_offset, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, S_LAYOUT: gl.constexpr, ROW_S: gl.constexpr,
              ROW_O: gl.constexpr):
        """Key tile j: its Q.K, then P.V of tile j - 1, which runs on the tensor cores during tile j's softmax."""
        bias = gl.load(bias_row + j * BLOCK_N + keys).to(gl.float32)
        ks = j % K_STAGES
        mbarrier.wait(k_bars.index(ks), (j // K_STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(ks).permute((1, 0)), s, use_acc=False, is_async=True)
        vs = (j - 1) % V_STAGES
        mbarrier.wait(v_bars.index(vs), ((j - 1) // V_STAGES) & 1)
        acc = warpgroup_mma(p_smem.index((j - 1) % 2), v_smem.index(vs), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))
        pq, m_new, row_sum = _softmax_p(s, bias, m_i, log2_scale, p_offset, BLOCK_M, BLOCK_N, ROW_S)
        # the other buffer: P.V still reads tile j - 1's (this store also keeps ptxas from waiting for P.V early)
        p_smem.index(j % 2).store(gl.convert_layout(pq.to(gl.bfloat16), S_LAYOUT))
        fence_async_shared()
        alpha = gl.exp2(m_i - m_new)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, ROW_O), 1)
        l_i = l_i * alpha + row_sum
        _cta_barrier()  # both warpgroups are done with K of tile j and V of tile j - 1: refill their stages
        _load(k_desc, k_smem, k_bars, kv_row, j + K_STAGES, ks, j + K_STAGES < n_tiles, BLOCK_N)
        _load(v_desc, v_smem, v_bars, kv_row, j - 1 + V_STAGES, vs, j - 1 + V_STAGES < n_tiles, BLOCK_N)
        return s, acc, m_new, l_i

    @gluon.jit
    def nvfp4_attention_fwd(q_desc, k_desc, v_desc, Bias, Out, H, lq, lk_pad, bias_bh, bias_group, log2_scale,
                            p_offset, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                            K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, num_warps: gl.constexpr):
        """Out [B, Lq, H, D] from Q [B*H*Lq, D], K and V [B*H*lk_pad, D] (each 64 keys in `_tile_keys`' order) and
        the bias [B*H, query groups, lk_pad + BLOCK_N] in key order (-inf past lk)."""
        start_m = gl.program_id(0)
        bh = gl.program_id(1)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [K_STAGES, BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [V_STAGES, BLOCK_N, D], v_desc.layout)
        p_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_M, BLOCK_N],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.bfloat16))
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(K_STAGES):
            mbarrier.init(k_bars.index(i), count=1)
        for i in gl.static_range(V_STAGES):
            mbarrier.init(v_bars.index(i), count=1)

        n_tiles = lk_pad // BLOCK_N
        kv_row = bh * lk_pad
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [bh * lq + start_m * BLOCK_M, 0], q_bar, q_smem)
        for i in gl.static_range(K_STAGES):  # step j refills K's stage of tile j with tile j + K_STAGES
            _load(k_desc, k_smem, k_bars, kv_row, i, i, i < n_tiles, BLOCK_N)
        for i in gl.static_range(V_STAGES):  # and V's of tile j - 1 with tile j - 1 + V_STAGES
            _load(v_desc, v_smem, v_bars, kv_row, i, i, i < n_tiles, BLOCK_N)
        bias_row = Bias + bh * bias_bh + ((start_m * BLOCK_M) // 128) * bias_group
        keys = _tile_keys(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), True)

        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bars.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)),
                          gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
        bias = gl.load(bias_row + keys).to(gl.float32)
        pq, m_i, l_i = _softmax_p(s, bias, m_i, log2_scale, p_offset, BLOCK_M, BLOCK_N, row_s)
        p_smem.index(0).store(gl.convert_layout(pq.to(gl.bfloat16), s_layout))
        fence_async_shared()
        _cta_barrier()
        _load(k_desc, k_smem, k_bars, kv_row, K_STAGES, 0, K_STAGES < n_tiles, BLOCK_N)
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
        for j in range(1, n_tiles):
            s, acc, m_i, l_i = _step(p_smem, s, acc, m_i, l_i, j, q_smem, k_smem, v_smem, k_bars, v_bars, k_desc,
                                     v_desc, kv_row, n_tiles, bias_row, keys, log2_scale, p_offset, BLOCK_M, BLOCK_N,
                                     K_STAGES, V_STAGES, s_layout, row_s, row_o)
        last = n_tiles - 1
        mbarrier.wait(v_bars.index(last % V_STAGES), (last // V_STAGES) & 1)
        acc = warpgroup_mma(p_smem.index(last % 2), v_smem.index(last % V_STAGES), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        for i in gl.static_range(K_STAGES):
            mbarrier.invalidate(k_bars.index(i))
        for i in gl.static_range(V_STAGES):
            mbarrier.invalidate(v_bars.index(i))
        mbarrier.invalidate(q_bar)

        out = (acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)).to(gl.bfloat16)
        rows = start_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_o)
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        dst = Out + ((bh // H) * lq * H + bh % H) * D + gl.expand_dims(rows, 1) * (H * D) + gl.expand_dims(cols, 0)
        gl.store(dst, out, mask=gl.expand_dims(rows < lq, 1))


def hopper_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: AttentionScheme) -> dict:
    """The kernel's operands for bf16 q, k, v [B, H, L, D]: the Triton kernel's prep (kernel_inputs, nvfp4) with K
    and V padded to whole key tiles (block_kv) and each 64 keys in `_tile_keys`' order, and the bias padded with
    -inf past the last key."""
    b, h, lq, d = q.shape
    lk, tile = k.shape[2], s.block_kv
    lk_pad = -(-lk // tile) * tile
    q, k, group_mean = smooth_qk(q, k, s)
    groups = -(-lq // SAGE3_Q_GROUP)
    shape = (b * h, groups) if group_mean is not None else (1, 1)  # without Q smoothing: one row, read by all
    bias = torch.zeros(*shape, lk_pad, dtype=torch.bfloat16, device=q.device)
    if group_mean is not None:
        bias[:, :, :lk] = (group_mean @ k.transpose(-1, -2)).reshape(b * h, groups, lk)
    bias[:, :, lk:] = float("-inf")
    return dict(q=_nvfp4(q, False).view(b * h * lq, d), k=_nvfp4(k, False, tile).view(b * h * lk_pad, d),
                v=_nvfp4(v, True, tile).view(b * h * lk_pad, d), bias=bias, shape=(b, h, lq, d), lk_pad=lk_pad,
                tile=tile, log2_scale=(d ** -0.5) * LOG2E, p_offset=p_log2_offset(s))


# (BLOCK_M, K_STAGES, V_STAGES, num_warps): two warpgroups of 64 query rows; two stages of K and of V: with 128-key
# tiles, Q, K, V and P's two buffers take 224 KB of shared memory
CONFIG = (128, 2, 2, 8)


def launch(ops: dict, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """The kernel over `hopper_inputs`' operands: [B, H, Lq, D] bf16 (a view of a [B, Lq, H, D] tensor)."""
    b, h, lq, d = ops["shape"]
    block_m, k_stages, v_stages, warps = config or CONFIG
    tile = ops["tile"]
    layout = lambda rows: gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16)  # noqa: E731
    desc = lambda t, rows: TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, d], layout(rows))  # noqa: E731
    bias = ops["bias"]
    out = torch.empty(b, lq, h, d, dtype=torch.bfloat16, device=bias.device)
    nvfp4_attention_fwd[(triton.cdiv(lq, block_m), b * h)](
        desc(ops["q"], block_m), desc(ops["k"], tile), desc(ops["v"], tile), bias, out, h, lq, ops["lk_pad"],
        bias.stride(0) if bias.shape[0] > 1 else 0, bias.stride(1) if bias.shape[1] > 1 else 0,
        float(ops["log2_scale"]), float(ops["p_offset"]), D=d, BLOCK_M=block_m, BLOCK_N=tile, K_STAGES=k_stages,
        V_STAGES=v_stages, num_warps=warps)
    return out.transpose(1, 2)
