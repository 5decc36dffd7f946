"""nvfp4 attention's kernel variants as another Triton compiles them, timed on this GPU next to vqx's own launch.

vqx picks nvfp4's warp-specialized TMA kernel only where Triton >= 3.7 compiles it (vqx.quant.attention_kernel
CONFIGS, VARIANT_MIN_TRITON); a GPU image with an older Triton runs the pointer kernel. This probe times what a newer
Triton would run without installing it there: ``build`` compiles the kernels for sm_90 with the Triton found at
--triton-path (any machine, no GPU needed) into cubins and launch metadata; ``run`` (GPU) loads them through the CUDA
driver, launches each on the 1.3B self-attention at 480p x 81 (12 heads x 32,760 tokens x 128, operands from
vqx's prep; --keys 512 for the text cross-attention) and reports its time, the time of vqx's prep of the operands as
that kernel reads them, vqx's own launch in the same process, and the worst per-row difference to vqx's launch (the
check's measure).
Timing: CUDA events, median of 5 after 2 warmups.

    python bench/nvfp4_kernel_probe.py build --triton-path /tmp/triton37 --out bench/probe_cubins   # CPU
    python bench/nvfp4_kernel_probe.py run --cubins bench/probe_cubins --note "..."                 # GPU
    python bench/nvfp4_kernel_probe.py run --keys 512 --out nvfp4_kernel_probe_cross.json --note "..."
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

# name -> (kernel, launch config (BLOCK_M, num_warps, num_stages, variant))
PROBES = {"pointers": (128, 8, 3, "pointers"), "tma": (128, 8, 3, "tma"), "tma_ws": (128, 4, 2, "tma_ws")}
SHAPE = (1, 12, 32760, 128)  # B, H, L, D


def build(args) -> int:
    sys.path.insert(0, str(Path(args.triton_path).resolve()))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vqx.quant import attention_kernel as ak

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = SHAPE[3]
    for name, (block_m, warps, stages, variant) in PROBES.items():
        common = dict(D=d, BLOCK_M=block_m, BLOCK_N=128, Q_GROUP=ak.SAGE3_Q_GROUP)
        if variant == "pointers":
            fn = ak.qattn_fwd
            sig = dict.fromkeys(["Q", "K", "V", "QS", "KS", "VS"], "*bf16") | {"BIAS": "*fp32", "Out": "*i16"}
            sig |= dict.fromkeys(["H", "lq", "lk", "v_stride"], "i32") | dict.fromkeys(["log2_scale", "p_offset"], "fp32")
            const = common | dict(PV=2, HAS_QK_SCALE=False, HAS_BIAS=True, HAS_V_SCALE=False, QK_INT8=False,
                                  QK_FP8_ACC=0, NATIVE_FP8=False)
        else:
            fn = ak.qattn_nvfp4_fwd
            sig = dict.fromkeys(["Q", "K", "V", "BIAS"], "*bf16") | {"Out": "*i16"}
            sig |= dict.fromkeys(["H", "lq", "lk_pad"], "i32") | dict.fromkeys(["log2_scale", "p_offset"], "fp32")
            const = common | dict(WARP_SPECIALIZE=variant == "tma_ws")
        names = list(fn.arg_names)
        sig = {n: sig.get(n, "constexpr") for n in names}
        # pointers 16-byte aligned and the padded key count a multiple of 16, as Triton's launcher specializes them
        # for these shapes (32,760 tokens are not a multiple of 16: no hint for lq or lk)
        aligned = [i for i, n in enumerate(names) if sig[n].startswith("*") or n == "lk_pad"]
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                        attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
        cc = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
        ptx = cc.asm["ptx"]
        entry = ptx[ptx.index(".entry"):ptx.index(")", ptx.index(".entry"))]
        m = cc.metadata
        meta = dict(kernel=m.name, config=[block_m, warps, stages, variant], shared=m.shared, num_warps=m.num_warps,
                    params=re.findall(r"\.param \.(u64|u32|f32)", entry), global_scratch_size=m.global_scratch_size,
                    global_scratch_align=m.global_scratch_align, profile_scratch_size=m.profile_scratch_size,
                    triton=triton.__version__, warp_specialized="setmaxnreg" in ptx)
        (out / f"{name}.cubin").write_bytes(cc.asm["cubin"])
        (out / f"{name}.json").write_text(json.dumps(meta))
        print(name, meta, flush=True)
    return 0


def run(args) -> int:
    import ctypes

    import torch

    import triton

    from common import device_name, median_ms, print_table, write_results
    from vqx.config.presets import attention_preset
    from vqx.quant.attention_kernel import bias_layout, kernel_inputs, launch, tma_operands

    if not torch.cuda.is_available():
        print("no CUDA device: `run` needs a GPU", file=sys.stderr)
        return 2
    cubins = Path(args.cubins)
    missing = [str(cubins / f"{n}.{e}") for n in PROBES for e in ("cubin", "json") if not (cubins / f"{n}.{e}").is_file()]
    if missing:
        print(f"missing {missing[0]}: run `build` first", file=sys.stderr)
        return 2
    s = attention_preset("nvfp4")
    b, h, n_tok, d = SHAPE
    n_keys = args.keys
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to("cuda", torch.bfloat16) for n in (n_tok, n_keys, n_keys))
    ops = kernel_inputs(q, k, v, s)
    ref_config = (128, 8, 3, "pointers")  # vqx's launch with the pointer kernel, this Triton

    def timed(fn) -> float:
        return median_ms(fn, cuda=True)

    ref = launch(ops, s, ref_config).float()
    row_max = ref.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    rows = [dict(kernel="vqx launch (pointers)", triton=triton.__version__, ms=timed(lambda: launch(ops, s, ref_config)),
                 prep_ms=timed(lambda: kernel_inputs(q, k, v, s)), worst_rel_diff=0.0)]
    cuda = ctypes.CDLL("libcuda.so.1")
    for name in PROBES:
        meta = json.loads((cubins / f"{name}.json").read_text())
        image = (cubins / f"{name}.cubin").read_bytes()
        module, fn = ctypes.c_void_p(), ctypes.c_void_p()
        for what, rc in (("cuModuleLoadData", lambda: cuda.cuModuleLoadData(ctypes.byref(module), image)),
                         ("cuModuleGetFunction",
                          lambda: cuda.cuModuleGetFunction(ctypes.byref(fn), module, meta["kernel"].encode())),
                         ("cuFuncSetAttribute",  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                          lambda: cuda.cuFuncSetAttribute(fn, 8, ctypes.c_int(meta["shared"])))):
            if rc() != 0:
                print(f"{name}: {what} failed", file=sys.stderr)
                return 1
        out = torch.empty(b, n_tok, h, d, dtype=torch.bfloat16, device="cuda")
        grid = (math.ceil(n_tok / meta["config"][0]), b * h, 1)
        align = meta["global_scratch_align"]
        scratch = torch.empty(meta["global_scratch_size"] * grid[0] * grid[1] + align, dtype=torch.uint8, device="cuda")
        scratch_ptr = -(-scratch.data_ptr() // align) * align
        if meta["config"][3] == "pointers":
            def prep():  # vqx's prep and the bias as its launch lays it out for this kernel
                return bias_layout(kernel_inputs(q, k, v, s)["bias"], s.block_kv, True)
            bias = prep()
            values = [ops["q"].data_ptr(), ops["k"].data_ptr(), ops["v"].data_ptr()] + [ops["q"].data_ptr()] * 3 + [
                bias.data_ptr(), out.data_ptr(), h, n_tok, n_keys, n_keys]
        else:
            def prep():  # vqx's prep for this kernel: K, V and the bias written in its key tiles
                return tma_operands(kernel_inputs(q, k, v, s, key_tiles=True), s)
            qq, kk, vv, bias = prep()
            values = [qq.data_ptr(), kk.data_ptr(), vv.data_ptr(), bias.data_ptr(), out.data_ptr(), h, n_tok,
                      kk.shape[2]]
        values += [float(ops["log2_scale"]), float(ops["p_offset"]), scratch_ptr, 0]
        ctype = {"u64": ctypes.c_uint64, "u32": ctypes.c_uint32, "f32": ctypes.c_float}
        if len(values) != len(meta["params"]):
            print(f"{name}: {len(meta['params'])} kernel parameters, {len(values)} given", file=sys.stderr)
            return 1
        kernel_args = [ctype[t](x) for t, x in zip(meta["params"], values)]
        params = (ctypes.c_void_p * len(kernel_args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p)
                                                        for a in kernel_args])

        def launch_probe():
            rc = cuda.cuLaunchKernel(fn, *grid, 32 * meta["num_warps"], 1, 1, meta["shared"],
                                     ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), params, None)
            if rc != 0:
                raise RuntimeError(f"cuLaunchKernel: CUresult {rc}")

        launch_probe()
        torch.cuda.synchronize()
        worst = float(((out.transpose(1, 2).float() - ref).abs() / row_max).max())
        rows.append(dict(kernel=name, triton=meta["triton"], config=meta["config"], warps=meta["num_warps"],
                         warp_specialized=meta["warp_specialized"], ms=timed(launch_probe), prep_ms=timed(prep),
                         worst_rel_diff=worst))
    base = rows[0]["ms"]
    for r in rows:
        r["ratio_vs_vqx_launch"] = r["ms"] / base
        r["shape"] = [b, h, n_tok, d, n_keys]
    print(f"{device_name()}: nvfp4 attention kernels, {b}x{h}x{n_tok}x{d} queries, {n_keys} keys")
    print_table(rows, ["kernel", "triton", "warps", "ms", "ratio_vs_vqx_launch", "prep_ms", "worst_rel_diff"])
    notes = ("ms: the kernel alone on prepared operands (vqx launch: its launch(), which includes the bias copy); "
             "prep_ms: vqx's prep of the operands as that kernel reads them (for the TMA kernels K, V and the bias "
             "written in its key tiles: kernel_inputs(..., key_tiles=True)); worst_rel_diff: per "
             "output row, against vqx's launch, relative to the row's largest value.")
    path = write_results(args.out, rows, {"notes": notes}, note=args.note)
    print(f"wrote {path}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    pb = sub.add_parser("build", help="compile the kernels for sm_90 with the Triton at --triton-path (no GPU)")
    pb.add_argument("--triton-path", required=True, help="a folder holding the `triton` package to compile with")
    pb.add_argument("--out", default="bench/probe_cubins")
    pr = sub.add_parser("run", help="time the built kernels on this GPU (writes bench/results/<--out>)")
    pr.add_argument("--cubins", default="bench/probe_cubins")
    pr.add_argument("--keys", type=int, default=SHAPE[2], help="key count (default the self-attention's; 512: Wan's "
                    "text cross-attention)")
    pr.add_argument("--out", default="nvfp4_kernel_probe.json")
    pr.add_argument("--note", default=None, help="a note stored in the results file")
    args = p.parse_args()
    if args.command == "build":
        if not (Path(args.triton_path) / "triton" / "__init__.py").is_file():
            print(f"--triton-path {args.triton_path}: no triton package there", file=sys.stderr)
            return 2
        return build(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
