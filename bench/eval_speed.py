"""ms per Wan2.1 transformer call: bf16 vs vqx fake quantization vs real 8-bit GEMMs (480p x 81 frames).

One 480p x 81-frame call is 32,760 tokens: latents [1, 16, 21, 60, 104], text embeddings [1, 512, 4096], one
timestep; random weights (vqx.models.wan.synthetic), quantized with vqx's own `materialize` + `quant_targets`
(RTN). 1.3B runs all 30 blocks, 14B 8 of its 40 blocks (as the anchors in docs/anchors.md). Everything
runs in one process on one GPU; the bf16 baseline is measured in the same run.

Rows (backend x format x variant):
- bf16 / none / eager: diffusers' model as is: the baseline of ``ratio_vs_bf16``.
- bf16 / none / fused: the same model with vqx's fused elementwise kernels (modulation, gated residuals;
  outputs bit-identical): the baseline of ``ratio_vs_bf16_fused`` (what the fusion alone buys).
- fake|kernel / w8a8|fp8 / fused: vqx's default path on CUDA (`materialize` + `set_backend`): Triton
  kernels, each input group quantized once, fused into the op before it.
- fake|kernel / w8a8|fp8 / eager: the same model with ``VQX_QUANT_IMPL=eager`` (PyTorch ops, group
  sharing only): the CPU / no-triton fallback.
- fake / none / attn_<mode>: the bf16 model (fused elementwise) with quantized attention (``attention=<mode>``
  emulated at both sites); kernel / fp8 / attn_<mode>: the same with fp8 GEMMs.
- fake / <low-bit format> / fused|eager (``--lowbit-formats``, default nvfp4, mxfp8, mxfp4, w4a16_g128, fp8_static,
  fp8_b128): fake quantization; the grouped or static activation quantization runs as one Triton pass (fused) or
  as PyTorch ops (eager); kernel / fp8_static / fused: lightx2v's fp8-pertensor GEMM (`torch._scaled_mm`). Calibrated activations get a fixed value: NVFP4 input absmax 8.0,
  static fp8 scale 8 / 448 (the cost does not depend on it).

Before timing, the script checks on the GPU that the Triton paths give the reference codes bit for bit
(vqx.quant.fastpath's kernel checks, codes of sampled activations against `numbers.quantize`, and each
model's output fused vs eager on a short input) and measures kernel vs fake output error; it exits 1 if a
check fails (after writing the results). Timing: warm-up calls (Triton compilation) excluded, then the
median of ``--repeats`` calls, each timed with CUDA events.

    python bench/eval_speed.py                  # GPU: writes bench/results/eval_speed.json (~4-5 min on an H100)
    python bench/eval_speed.py --only 14B       # one model
    python bench/eval_speed.py --smoke          # tiny model on CPU, Triton through its interpreter: checks the script
    python bench/eval_speed.py --attention sdpa_cudnn --out eval_speed_cudnn.json   # every row with one SDPA kernel

Results: ``{"environment", "checks", "kernel_checks", "notes", "rows": [{"device", "model", "backend",
"format", "variant", "ms", "ratio_vs_bf16", "ratio_vs_bf16_fused", "blocks", "tokens"}, ...]}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"1.3B": dict(arch="1.3B", layers=30, of=30), "14B": dict(arch="14B", layers=8, of=40)}
FULL_INPUT = dict(latents=(1, 16, 21, 60, 104), text=(1, 512, 4096))
CHECK_INPUT = dict(latents=(1, 16, 3, 16, 16), text=(1, 512, 4096))  # 192 tokens: the fused-vs-eager check
SMOKE = dict(arch=dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2),
             latents=(1, 16, 2, 8, 8), check_latents=(1, 16, 2, 4, 4), text=(1, 8, 32))
FORMATS = ("w8a8", "fp8")
CALIBRATED_INPUT = 8.0  # the activation absmax behind the calibrated values of NVFP4 / static fp8 (timing only)
# Whole-model relative difference of the kernel and fake backends: 4.8e-3 to 1.3e-2 measured for w8a8, fp8,
# fp8_static and fp8_b128 (bench/results/eval_speed*.json); a wrong GEMM gives O(1) (cuBLAS blockwise at K = 8960: 1.3).
KERNEL_VS_FAKE_MAX = 0.05


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU (Triton interpreted): checks the script")
    p.add_argument("--only", choices=sorted(MODELS), action="append", help="model(s) to run (default both; not with --smoke)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (median; default 5, smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per row first (default 2, smoke 0)")
    p.add_argument("--no-eager", action="store_true", help="skip the fake/kernel eager-variant rows")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="stop starting new rows after this many seconds (default 330: the run stays under 6 min)")
    p.add_argument("--out", type=Path, default=None, help="results file name under bench/results/")
    p.add_argument("--attention", default="default", choices=["default", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"],
                   help="attention kernel of every row, bf16 baseline included (default: what diffusers' SDPA picks)")
    p.add_argument("--attention-modes", default="sage1,sage2,fp8,nvfp4",
                   help="quantized-attention rows (vqx attention= presets, comma-separated; '' for none): each alone on "
                        "the bf16 model and with the fp8 kernel-backend linears")
    p.add_argument("--lowbit-formats", default="nvfp4,mxfp8,mxfp4,w4a16_g128,fp8_static,fp8_b128",
                   help="fake-quant-only format rows (comma-separated format names; '' for none)")
    p.add_argument("--attention-config", action="append", default=[], metavar="QK/PV=BLOCK_M,WARPS,STAGES[,VARIANT]",
                   help="time the quantized-attention kernel of a (Q.K, P.V) pair at this launch config instead of "
                        "vqx.quant.attention_kernel.CONFIGS' (e.g. a --tune result of bench/attention_kernel.py, "
                        "before it goes into CONFIGS); stored in the results' notes")
    p.add_argument("--note", default=None, help="a note stored in the results file (e.g. 'the GPU was shared')")
    args = p.parse_args()
    args.attention_configs = {}
    for text in args.attention_config:
        try:
            pair, config = text.split("=")
            qk, pv = pair.split("/")
            block_m, warps, stages, *variant = config.split(",")
            if len(variant) > 1:
                raise ValueError
            args.attention_configs[(qk, pv)] = ((int(block_m), int(warps), int(stages), *(variant or ["pointers"])),)
        except ValueError:
            p.error(f"--attention-config {text!r}: expected QK/PV=BLOCK_M,WARPS,STAGES[,VARIANT], e.g. "
                    "nvfp4/nvfp4=128,8,3 or nvfp4/nvfp4=128,4,2,tma_ws")
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 5
    if args.warmup is None:
        args.warmup = 0 if args.smoke else 2
    return args


def main() -> int:
    args = parse_args()
    if args.smoke:
        # Read when vqx.quant.kernels / fastpath are imported: set before any vqx import.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from common import device_name, print_table, write_results
    from vqx.algorithms.materialize import materialize
    from vqx.config.presets import attention_preset
    from vqx.models.adapter import LayerSelection, adapter_for, quant_targets
    from vqx.models.wan.fused import install
    from vqx.quant import fastpath
    from vqx.quant.attention_plan import AttentionPlan, AttentionRuntime
    from vqx.quant.backends import fallbacks, kernel_scheme, set_backend
    from vqx.quant.formats import get_scheme
    from vqx.quant.scheme import nvfp4_global_scale

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or use --smoke on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    fused_impl = "triton" if args.smoke else "auto"
    dev_name = device_name() if not args.smoke else f"{device_name()} (smoke, Triton interpreter)"
    torch.backends.cuda.matmul.allow_tf32 = False

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def time_call(model, inputs, impl: str) -> float:
        with fastpath.use_impl(impl):
            for _ in range(args.warmup):
                model(**inputs, return_dict=False)
            sync()
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    model(**inputs, return_dict=False)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    model(**inputs, return_dict=False)
                    times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def make_inputs(latents, text, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        return dict(hidden_states=torch.randn(latents, generator=g).to(device, torch.bfloat16),
                    encoder_hidden_states=torch.randn(text, generator=g).to(device, torch.bfloat16),
                    timestep=torch.tensor([500.0], device=device))

    def build(name):
        if args.smoke:
            from diffusers import WanTransformer3DModel

            from vqx.models.wan.tiny import cast_transformer

            torch.manual_seed(0)
            tr = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=SMOKE["text"][-1],
                                       freq_dim=32, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                       rope_max_seq_len=32, **SMOKE["arch"])
            return cast_transformer(tr, torch.bfloat16).eval().to(device)
        from vqx.models.wan.synthetic import build_transformer

        return build_transformer(MODELS[name]["arch"], torch.bfloat16, device, num_layers=MODELS[name]["layers"])

    @torch.no_grad()
    def output(model, inputs, impl):
        with fastpath.use_impl(impl):
            return model(**inputs, return_dict=False)[0]

    rows, checks, failures = [], {}, []
    modes = [m for m in args.attention_modes.split(",") if m]
    lowbit = [f for f in args.lowbit_formats.split(",") if f]
    for fmt in lowbit:
        get_scheme(fmt)  # an unknown name fails before any model is built

    def calibrated_value(act):
        """What a calibrated activation scheme's QuantLinear is given (NVFP4: the input absmax; static: the scale)."""
        if act is None or not act.calibrated:
            return None
        return torch.tensor(CALIBRATED_INPUT if act.global_scale else CALIBRATED_INPUT / act.grid_.qmax, device=device)
    if args.attention_configs:
        from vqx.quant import attention_kernel
        attention_kernel.CONFIGS.update(args.attention_configs)
    runtimes = {m: AttentionRuntime(AttentionPlan(attention_preset(m), ("self", "cross"), (), 1)) for m in modes}
    names = ["tiny"] if args.smoke else (args.only or list(MODELS))
    attention = contextlib.ExitStack()  # closed after the last model
    if args.attention != "default":  # every row, the bf16 baseline too: the ratios compare like with like
        from diffusers.models.attention_dispatch import attention_backend

        from vqx.eval.schemas import SDPA_METHODS

        attention.enter_context(attention_backend(SDPA_METHODS[args.attention][0]))
    for name in names:
        blocks = (f"{SMOKE['arch']['num_layers']} of {SMOKE['arch']['num_layers']}" if args.smoke
                  else f"{MODELS[name]['layers']} of {MODELS[name]['of']}")
        log(f"{name}: building a random-weight transformer ({blocks} blocks)")
        base = build(name)
        inputs = make_inputs(SMOKE["latents"] if args.smoke else FULL_INPUT["latents"],
                             SMOKE["text"] if args.smoke else FULL_INPUT["text"])
        check_inputs = make_inputs(SMOKE["check_latents"] if args.smoke else CHECK_INPUT["latents"],
                                   SMOKE["text"] if args.smoke else CHECK_INPUT["text"], seed=1)
        lat = inputs["hidden_states"].shape
        tokens = lat[2] * (lat[3] // 2) * (lat[4] // 2)
        dim = base.config.num_attention_heads * base.config.attention_head_dim
        ffn = base.config.ffn_dim
        mc = checks.setdefault(name, {})

        def add(backend, fmt, variant, ms, err=None):
            row = dict(device=dev_name, model=name, backend=backend, format=fmt, variant=variant, ms=ms,
                       blocks=blocks, tokens=tokens, attention=args.attention)
            if err:
                row["error"] = err
            rows.append(row)
            log(f"{name} {backend:6s} {fmt:4s} {variant:5s}: " + (f"{ms:8.1f} ms" if ms is not None else f"-- {err}"))

        def timed(model, backend, fmt, variant, impl):
            if time.perf_counter() - t_start > args.budget_s:
                add(backend, fmt, variant, None, f"skipped: past --budget-s {args.budget_s:.0f}")
                return
            try:
                add(backend, fmt, variant, time_call(model, inputs, impl))
            except Exception as e:  # noqa: BLE001 - record it and go on: one run, every row it can give
                add(backend, fmt, variant, None, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
                failures.append(f"{name} {backend} {fmt} {variant}: {e}")

        # Codes of sampled activations (outlier channels, zero tokens, extreme values, every bf16 value) from
        # the path the timed rows use, against the fp32 reference quantizer, bit for bit.
        with fastpath.use_impl(fused_impl):
            for fmt in FORMATS:
                act = get_scheme(fmt).activation
                for width in (dim, ffn):
                    x = fastpath.probe_rows(width, torch.bfloat16, device, seed=7)
                    g = torch.Generator(device="cpu").manual_seed(8)
                    r = torch.randn(256, width, generator=g) * torch.rand(256, 1, generator=g) * 10
                    r[:, 3] *= 50  # an outlier channel
                    r[5] = 0  # an all-zero token
                    x = torch.cat([x, r.to(device, torch.bfloat16)])
                    for mode in ("fake", "codes"):
                        sp = fastpath.QuantSpec(act, None, mode)
                        ok = fastpath.same_quantization(fastpath.quantize_act(x, sp), fastpath.quantize_eager(x, sp))
                        mc[f"codes_bit_exact_{fmt}_{mode}_K{width}"] = ok
                        if not ok:
                            failures.append(f"{name}: {fmt} {mode} codes (K={width}) differ from the reference")
            for fmt in lowbit:  # grouped / static activations: the fake-quantized values
                act = get_scheme(fmt).activation
                if act is None:
                    continue
                for width in (dim, ffn):
                    x = fastpath.probe_rows(width, torch.bfloat16, device, seed=7)
                    static = calibrated_value(act)
                    if static is not None and act.global_scale:  # the spec holds NVFP4's global scale
                        static = nvfp4_global_scale(static)
                    sp = fastpath.QuantSpec(act, None, "fake", static, None if static is None else float(static))
                    ok = fastpath.same_quantization(fastpath.quantize_act(x, sp), fastpath.quantize_eager(x, sp))
                    mc[f"codes_bit_exact_{fmt}_fake_K{width}"] = ok
                    if not ok:
                        failures.append(f"{name}: {fmt} fake-quantized activations (K={width}) differ from the reference")
        log(f"{name}: sampled codes vs the reference quantizer: "
            f"{'bit-exact' if all(v for k, v in mc.items() if k.startswith('codes_')) else 'MISMATCH'}")

        # bf16 rows; then the fused forward on the float model (bit-identical to diffusers')
        timed(base, "bf16", "none", "eager", fused_impl)
        ref_out = output(base, check_inputs, "eager")
        fused_bf16 = copy.deepcopy(base)
        install(fused_bf16)
        same = fastpath.bits_equal(output(fused_bf16, check_inputs, fused_impl), ref_out)
        mc["bf16_fused_equals_diffusers"] = same
        if not same:
            failures.append(f"{name}: bf16 fused forward differs from diffusers'")
        timed(fused_bf16, "bf16", "none", "fused", fused_impl)
        for mode in modes:  # fake-quant attention alone: the fused elementwise model + the emulated attention
            runtimes[mode].install(adapter_for(fused_bf16), [fused_bf16])
            timed(fused_bf16, "fake", "none", f"attn_{mode}", fused_impl)
        del fused_bf16

        for fmt in FORMATS:
            log(f"{name}: quantizing ({fmt}, RTN)")
            model = copy.deepcopy(base)
            targets = quant_targets(model, LayerSelection())
            materialize(model, targets, {t.name: get_scheme(fmt) for t in targets}, {})
            outs = {}
            for backend in ("fake", "kernel"):
                set_backend(model, backend)
                fused_out = output(model, check_inputs, fused_impl)
                eager_out = output(model, check_inputs, "eager")
                same = fastpath.bits_equal(fused_out, eager_out)
                mc[f"{backend}_{fmt}_fused_equals_eager"] = same
                if not same:
                    diff = (fused_out.float() - eager_out.float()).abs().max().item()
                    mc[f"{backend}_{fmt}_fused_vs_eager_max_abs"] = diff
                    failures.append(f"{name}: {backend} {fmt} fused output differs from eager (max abs {diff:.3g})")
                outs[backend] = fused_out.float()
                timed(model, backend, fmt, "fused", fused_impl)
                if not args.no_eager:
                    timed(model, backend, fmt, "eager", "eager")
            if fmt == "fp8":  # the stretch goal's row: fp8 GEMMs and a quantized attention
                for mode in modes:
                    runtimes[mode].install(adapter_for(model), [model])
                    timed(model, "kernel", fmt, f"attn_{mode}", fused_impl)
            rel = ((outs["kernel"] - outs["fake"]).norm() / outs["fake"].norm()).item()
            mc[f"kernel_vs_fake_rel_error_{fmt}"] = rel
            if not rel <= KERNEL_VS_FAKE_MAX:
                failures.append(f"{name}: kernel {fmt} output differs from fake by {rel:.3g} (relative)")
            mc[f"fake_{fmt}_vs_bf16_rel_error"] = ((outs["fake"] - ref_out.float()).norm() / ref_out.float().norm()).item()
            log(f"{name} {fmt}: kernel vs fake relative output difference {rel:.2e}")
            del model, outs
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for fmt in lowbit:
            log(f"{name}: quantizing ({fmt}, RTN, fake)")
            model = copy.deepcopy(base)
            targets = quant_targets(model, LayerSelection())
            scheme = get_scheme(fmt)
            static = calibrated_value(scheme.activation) if scheme.activation is not None else None
            materialize(model, targets, {t.name: scheme for t in targets}, {},
                        input_scales=None if static is None else {t.name: static for t in targets})
            fused_out = output(model, check_inputs, fused_impl)
            same = fastpath.bits_equal(fused_out, output(model, check_inputs, "eager"))
            mc[f"fake_{fmt}_fused_equals_eager"] = same
            if not same:
                failures.append(f"{name}: fake {fmt} fused output differs from eager")
            mc[f"fake_{fmt}_vs_bf16_rel_error"] = ((fused_out.float() - ref_out.float()).norm()
                                                   / ref_out.float().norm()).item()
            timed(model, "fake", fmt, "fused", fused_impl)
            if not args.no_eager:
                timed(model, "fake", fmt, "eager", "eager")
            if kernel_scheme(scheme):  # fp8_static / fp8_b128: lightx2v's fp8-pertensor / fp8-b128-deepgemm GEMMs
                set_backend(model, "kernel")
                kernel_out = output(model, check_inputs, fused_impl)
                rel = ((kernel_out.float() - fused_out.float()).norm() / fused_out.float().norm()).item()
                mc[f"kernel_vs_fake_rel_error_{fmt}"] = rel
                if not rel <= KERNEL_VS_FAKE_MAX:
                    failures.append(f"{name}: kernel {fmt} output differs from fake by {rel:.3g} (relative)")
                timed(model, "kernel", fmt, "fused", fused_impl)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del base
        if device.type == "cuda":
            torch.cuda.empty_cache()

    attention.close()
    kernel_checks = fastpath.report()
    bad_kernels = [r for r in kernel_checks if not r["bit_exact"] and r["kernel"] != "gelu"]
    failures += [f"kernel check failed: {r}" for r in bad_kernels]
    gelu_fused = any(r["kernel"] == "gelu" and r["bit_exact"] for r in kernel_checks)

    for name in names:
        base_rows = {r["variant"]: r["ms"] for r in rows if r["model"] == name and r["backend"] == "bf16"}
        for r in rows:
            if r["model"] == name:
                r["ratio_vs_bf16"] = r["ms"] / base_rows["eager"] if r["ms"] and base_rows.get("eager") else None
                r["ratio_vs_bf16_fused"] = r["ms"] / base_rows["fused"] if r["ms"] and base_rows.get("fused") else None

    attn_checks = [r for r in kernel_checks if r["kernel"] == "qattn"]
    failures += [f"quantized attention kernel check failed: {r}" for r in attn_checks if not r["bit_exact"]]
    notes = ("1.3B: all 30 blocks; 14B: 8 of its 40 blocks (per-call ms of a block subset, as docs/anchors.md). "
             "ratio_vs_bf16: against diffusers' bf16 model; ratio_vs_bf16_fused: against the bf16 model with the same "
             "fused elementwise kernels. fused = vqx's default CUDA path (Triton); eager = VQX_QUANT_IMPL=eager. "
             f"FFN GELU fused with its quantization: {gelu_fused}. Attention kernel of every row: "
             f"{'SDPA default choice' if args.attention == 'default' else args.attention}. attn_<mode>: vqx's emulated "
             "quantized attention (attention=<mode>, the fused Triton kernel where its check passed: kernel_checks "
             "'qattn') at both attention sites; fake/none = attention only, kernel/fp8 = with fp8 GEMMs.")
    if args.attention_configs:
        notes += f" Attention kernel configs set for this run: {args.attention_configs}."
    if args.smoke:
        notes = "SMOKE RUN (tiny model, CPU, Triton interpreter): no speed claims. " + notes
    out_name = str(args.out) if args.out else ("eval_speed_smoke.json" if args.smoke else "eval_speed.json")
    gemm_fallbacks = fallbacks()
    if not args.smoke and any(gemm_fallbacks.values()):
        failures.append(f"8-bit GEMMs fell back to emulation: {gemm_fallbacks}")
    path = write_results(out_name, rows, {"checks": checks, "kernel_checks": kernel_checks, "notes": notes,
                                          "gemm_fallbacks": gemm_fallbacks, "failures": failures}, note=args.note)
    print()
    print(notes)
    print_table(rows, ["model", "backend", "format", "variant", "ms", "ratio_vs_bf16", "ratio_vs_bf16_fused"])
    print(f"\nwrote {path} in {time.perf_counter() - t_start:.0f} s")
    if failures:
        print("\nCHECKS FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("all bit-exactness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
