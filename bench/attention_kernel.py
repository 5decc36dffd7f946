"""Quantized attention's fused Triton kernel: its agreement with the eager emulation, and its speed.

For every attention preset (conf/attention/*.yaml): the kernel check `attention_fused` runs before first use (fused
vs eager on adversarial inputs: E2M1 ties, all-equal keys, one huge logit, zero queries/values, a ragged length,
large magnitudes; worst relative difference per case, against vqx.quant.attention_kernel.TOLERANCE), and the prep's
codes and scales are compared with the eager quantizer's bit for bit on the same inputs; then, on one
self-attention call of Wan2.1-1.3B at 480p x 81 (12 heads x 32,760 tokens x 128) and one text cross-attention
(512 keys): ms of torch SDPA in bf16 (its default kernel), of the fused emulation, of the eager emulation, and, where
the sageattention package is installed, of its SageAttention1 Triton kernel (sage1's numbers) with its relative L2
difference to the emulation;
each ratio against SDPA in the same run; the fused time is also split into its prep (quantizing Q, K, V) and its
kernel. --tune times the kernel at each (BLOCK_M, num_warps, num_stages) of a small grid per preset on the
self-attention shape, each config checked against the eager path first (vqx.quant.attention_kernel.CONFIGS holds the
winners), and for fp8 Q.K each of FP8_QK_ACCS (vqx.quant.attention_kernel.FP8_QK_ACC: exact fp16 operands, or the
fp8 tensor cores with an fp32 sum every n products). Timing: CUDA events, median of --repeats after --warmup calls.

    python bench/attention_kernel.py --note "..."              # GPU: writes bench/results/attention_kernel.json
    python bench/attention_kernel.py --smoke --note "script"   # CPU: Triton interpreter, tiny shapes, no speed claims
    python bench/attention_kernel.py --tune --no-eager --note "..."   # GPU: also the config grid
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import add_note_argument, device_name, median_ms, print_table, write_results

PRESETS = ("sage1", "sage2", "sage2_k_int8_v_fp8", "fp8", "nvfp4")
# (64, 4, 1): one warpgroup and one stage fit twice per SM (registers and shared memory), so two CTAs' GEMMs and
# softmaxes can overlap; the others run one CTA per SM
TUNE_GRID = [(m, w, st) for m in (64, 128) for w in (4, 8) for st in (2, 3)] + [(64, 4, 1)]
# nvfp4's TMA kernel (vqx.quant.attention_kernel.VARIANTS): one program, or warp-specialized (a producer warpgroup
# and, at 4 warps, two consumer warpgroups of 64 rows each: 12 warps; Triton >= 3.7)
TMA_GRID = [(128, 8, 2, "tma"), (128, 8, 3, "tma"), (64, 4, 2, "tma"), (128, 4, 2, "tma_ws"), (64, 4, 2, "tma_ws"),
            (64, 4, 3, "tma_ws")]
FP8_QK_ACCS = (0, 128, 64, 32)  # fp8 Q.K's choices of vqx.quant.attention_kernel.FP8_QK_ACC, tuned on the GPU
FULL = {"self": (1, 12, 32760, 128, 32760), "cross": (1, 12, 32760, 128, 512)}  # B, H, Lq, D, Lk
SMOKE = {"self": (1, 2, 96, 16, 96), "cross": (1, 2, 96, 16, 40)}


def main() -> int:
    p = add_note_argument(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-eager", action="store_true", help="skip timing the eager emulation (slow at full size)")
    p.add_argument("--tune", action="store_true", help="time the kernel over TUNE_GRID's configs (self-attention shape)")
    p.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated subset of {', '.join(PRESETS)}")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    presets = [n for n in args.presets.split(",") if n]
    bad = [n for n in presets if n not in PRESETS]
    if bad or not presets:
        print(f"--presets: {','.join(bad) or repr(args.presets)} is not a subset of {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from vqx.quant import fastpath
    from vqx.quant.attention import attention, attention_eager, quantize_inputs
    from vqx.quant.attention_kernel import (chosen_config, compare, kernel_config, kernel_inputs, launch,
                                            prep_mismatches, uses_key_tiles)
    from vqx.config.presets import attention_preset
    from vqx.quant.attention_plan import sageattention_kernel, sageattention_version

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or use --smoke", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    impl = "triton" if args.smoke else "auto"
    shapes = SMOKE if args.smoke else FULL
    t0 = time.perf_counter()

    def timed(fn) -> float:
        return median_ms(fn, args.warmup, args.repeats, cuda=device.type == "cuda")

    sage1 = attention_preset("sage1")  # the real SageAttention1 kernel where the package is installed (GPU only)
    real, real_why = sageattention_kernel(sage1, sage1) if device.type == "cuda" else (None, "no CUDA device")
    checks, rows, failures, configs = {}, [], [], {}
    with fastpath.use_impl(impl), torch.no_grad():
        for name in presets:
            scheme = attention_preset(name)
            d = shapes["self"][3]
            # the config the fused path runs: CONFIGS' first that compiles and passes here
            configs[name] = chosen_config(scheme, d, torch.bfloat16, device) or kernel_config(scheme)
            ok, detail = compare(scheme, d, torch.bfloat16, device, configs[name])
            unequal = prep_mismatches(scheme, d, torch.bfloat16, device)
            checks[name] = {"within_tolerance": ok, **detail, "prep_not_bit_equal": unequal}
            if unequal:
                failures.append(f"{name}: the prep's codes or scales differ from the eager quantizer's: {unequal}")
            worst = [w for w in detail["max_rel_diff"].values() if isinstance(w, float)]
            print(f"[{time.perf_counter() - t0:6.1f}s] {name}: fused vs eager worst {max(worst, default=float('nan')):.2e} "
                  f"(tolerance {detail['tolerance']:.2e}) {'ok' if ok else 'FAIL'}", flush=True)
            if not ok:
                failures.append(f"{name}: fused vs eager {detail}")
        for site, (b, h, lq, d, lk) in shapes.items():
            g = torch.Generator().manual_seed(0)
            q = torch.randn(b, h, lq, d, generator=g).to(device, torch.bfloat16)
            k = torch.randn(b, h, lk, d, generator=g).to(device, torch.bfloat16)
            v = torch.randn(b, h, lk, d, generator=g).to(device, torch.bfloat16)
            base = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            rows.append(dict(site=site, method="sdpa_bf16", ms=base, ratio_vs_sdpa=1.0, shape=[b, h, lq, d, lk]))
            for name in presets:
                scheme = attention_preset(name)
                ms = timed(lambda: attention(q, k, v, scheme))
                rows.append(dict(site=site, method=f"{name}_fused", ms=ms, ratio_vs_sdpa=ms / base, shape=[b, h, lq, d, lk]))
                if checks[name]["within_tolerance"]:  # the split: prep, then the kernel on prepared operands
                    key_tiles = uses_key_tiles(configs[name], scheme)  # the layout the fused path writes for it
                    ms = timed(lambda: kernel_inputs(q, k, v, scheme, key_tiles))
                    rows.append(dict(site=site, method=f"{name}_prep", ms=ms, ratio_vs_sdpa=ms / base,
                                     shape=[b, h, lq, d, lk]))
                    ops = kernel_inputs(q, k, v, scheme, key_tiles)
                    ms = timed(lambda: launch(ops, scheme, configs[name]))
                    rows.append(dict(site=site, method=f"{name}_kernel", ms=ms, ratio_vs_sdpa=ms / base,
                                     config=list(configs[name]), shape=[b, h, lq, d, lk]))
                    del ops
                if not args.no_eager:
                    ms = timed(lambda: attention_eager(quantize_inputs(q, k, v, scheme), scheme, q.dtype))
                    rows.append(dict(site=site, method=f"{name}_eager", ms=ms, ratio_vs_sdpa=ms / base,
                                     shape=[b, h, lq, d, lk]))
                print(f"[{time.perf_counter() - t0:6.1f}s] {site} {name} timed", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if real is not None:  # q/k/v as diffusers passes them: [B, L, H, D] views
                nhd = [t.transpose(1, 2) for t in (q, k, v)]
                ms = timed(lambda: real(*nhd))
                want = attention(q, k, v, sage1).float()
                diff = float((real(*nhd).transpose(1, 2).float() - want).norm() / want.norm())
                rows.append(dict(site=site, method="sage1_sageattention", ms=ms, ratio_vs_sdpa=ms / base,
                                 relative_difference_to_emulation=diff, shape=[b, h, lq, d, lk]))
                print(f"[{time.perf_counter() - t0:6.1f}s] {site} sageattention: {ms:.3f} ms, relative L2 difference "
                      f"to the emulation {diff:.2e}", flush=True)
    if args.tune:
        tune_configs(presets, args, rows, shapes["self"], device, timed, failures, t0)
    kernel_checks = [r for r in fastpath.report() if r["kernel"] == "qattn"]
    notes = ("fused: vqx.quant.attention with the Triton kernel (vqx.quant.attention_kernel) after its check; eager: "
             "the PyTorch emulation; both include quantizing Q, K, V. sdpa_bf16: torch SDPA's default kernel.")
    if args.smoke:
        notes = "SMOKE RUN (CPU, Triton interpreter, tiny shapes): no speed claims. " + notes
    out = args.out or ("attention_kernel_smoke.json" if args.smoke else "attention_kernel.json")
    sageattention = {"version": sageattention_version(), "used": real is not None, "why_not": real_why}
    path = write_results(out, rows, {"device": device_name(), "checks": checks, "kernel_checks": kernel_checks,
                                     "sageattention": sageattention, "notes": notes, "failures": failures},
                         note=args.note)
    print_table(rows, ["site", "method", "ms", "ratio_vs_sdpa"])
    print(f"\nwrote {path} in {time.perf_counter() - t0:.0f} s")
    if failures:
        print("CHECKS FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def tune_configs(presets, args, rows, shape, device, timed, failures, t0) -> None:
    """Kernel time per config of TUNE_GRID on the self-attention shape, after that config's check."""
    import torch

    from vqx.config.presets import attention_preset
    from vqx.quant.attention_kernel import (TRITON_VERSION, VARIANT_MIN_TRITON, compare, kernel_inputs,
                                            key_tiles_apply, launch, tma_kernel_applies, uses_key_tiles)

    b, h, lq, d, lk = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, torch.bfloat16) for n in (lq, lk, lk))
    base = next(r["ms"] for r in rows if r["site"] == "self" and r["method"] == "sdpa_bf16")
    grid = TUNE_GRID[:1] if args.smoke else TUNE_GRID
    tma = [c for c in TMA_GRID if TRITON_VERSION >= VARIANT_MIN_TRITON.get(c[3], (0, 0))]  # those this Triton compiles
    for name in presets:
        scheme = attention_preset(name)
        ops = {tiles: kernel_inputs(q, k, v, scheme, tiles)  # each config on the operands the fused path writes for it
               for tiles in ((False, True) if key_tiles_apply(scheme) else (False,))}
        best = None
        configs = grid + (tma if tma_kernel_applies(scheme) and not args.smoke else [])
        for acc in FP8_QK_ACCS if scheme.qk == "fp8" and device.type == "cuda" else (0,):
            for config in configs:
                try:
                    ok, detail = compare(scheme, d, torch.bfloat16, device, config, acc)
                    ms = timed(lambda: launch(ops[uses_key_tiles(config, scheme)], scheme, config, acc)) if ok else None
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: that config is not a candidate
                    ok, ms, detail = False, None, {}
                    print(f"  {name} {config}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                worst = max((w for w in detail.get("max_rel_diff", {}).values() if isinstance(w, float)), default=None)
                rows.append(dict(site="self", method=f"{name}_tune", config=list(config), fp8_qk_acc=acc, ms=ms,
                                 within_tolerance=ok, worst_rel_diff=worst,
                                 ratio_vs_sdpa=ms / base if ms is not None else None, shape=list(shape)))
                if ms is not None and (best is None or ms < best[1]):
                    best = (config, ms, acc)
                if acc and not ok:  # its accuracy is the dot's, the same at every config
                    break
            if acc:
                print(f"  {name} fp8_qk_acc={acc}: worst fused vs eager {worst}", flush=True)
        print(f"[{time.perf_counter() - t0:6.1f}s] tune {name}: best (config, ms, fp8_qk_acc) {best}", flush=True)
        if best is None:
            failures.append(f"{name}: no config passed its check")
        del ops


if __name__ == "__main__":
    sys.exit(main())
