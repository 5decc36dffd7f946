"""How far correct lightx2v exports and value-corrupted ones land from the evaluated model: the basis of
`vqx verify-export`'s tolerance (vqx/export/schemas.py DEFAULT_TOLERANCE).

For each model x format x smoothing: quantize with RTN (``smooth``: a random per-block runtime smoothing, log-normal
factors with sigma 0.5, folded as SmoothQuant/AWQ fold them), export with ``export=lightx2v`` (the evaluated blocks'
fp32 outputs recorded into the folder), then
- ``clean_max`` / ``clean_median``: verify-export's per-block error (lightx2v's fp32 math on the files vs the
  recorded outputs), on the device the export ran on; ``clean_max_cpu``: the same folder checked on CPU;
- one column per mutation class of `vqx.export.mutations` (manifest re-hashed, so only the numeric check can see
  it): how far past its threshold the strongest of verify-export's three signals went (block output error /
  tolerance, activation scale deviation / SCALE_RTOL, codes away from a tie: their count), i.e. > 1 means caught;
  for "a bias zeroed" and "one linear's scales x1.01" the smallest over every linear of the block.
Models: wan_tiny (t2v, i2v: random, dim 32), wan_mini (assets/wan_mini, trained, dim 256), and random full-size
Wan2.1 1.3B and 14B (``--layers`` blocks; default all 30 of 1.3B, 4 of the 14B's 40).
``--runs ALGO:FORMAT ...`` also runs ``python run.py model=<--run-model> algorithm=ALGO format=FORMAT
export=lightx2v eval=none logger=none`` (real calibration and algorithm, the export checked as it is written, on
the run's device) and checks each folder again with ``vqx verify-export --device cpu``.

    python bench/verify_floor.py --models tiny tiny_i2v mini          # CPU, ~1 min
    python bench/verify_floor.py --models 1.3B 14B --out verify_floor_gpu.json   # GPU
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, print_table, write_results  # noqa: E402

MODELS = ("tiny", "tiny_i2v", "mini", "1.3B", "14B")
PER_LINEAR = ("a bias zeroed", "one linear's scales x1.01")


def build(model: str, device, layers: int | None):
    from vqx.models.wan import synthetic
    from vqx.models.wan.tiny import build_tiny_pipeline

    if model in ("tiny", "tiny_i2v"):
        return build_tiny_pipeline("i2v" if model == "tiny_i2v" else "t2v", seed=0).transformer.to(device)
    if model == "mini":
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel.from_pretrained(ROOT / "assets" / "wan_mini" / "transformer",
                                                     torch_dtype=torch.bfloat16).to(device).eval()
    return synthetic.build_transformer(model, device=device, num_layers=layers or (4 if model == "14B" else None))


def quantize(transformer, fmt_name: str, smooth: bool):
    from vqx.algorithms.materialize import materialize
    from vqx.models.adapter import LayerSelection, adapter_for, quant_targets
    from vqx.quant.formats import get_scheme, uniform

    adapter = adapter_for(transformer)
    runtime = {}
    if smooth:
        g = torch.Generator().manual_seed(1)
        dim = adapter.hidden_size(transformer)
        for i, block in enumerate(adapter.blocks(transformer)):
            runtime[i] = {}
            for group in adapter.input_groups(transformer):
                if group.kind != "runtime":
                    continue
                s = torch.exp(torch.randn(dim, generator=g) * 0.5).to(next(block.parameters()).device)
                for name in group.linears:
                    lin = block.get_submodule(name)
                    lin.weight.data = (lin.weight.data.float() * s).to(lin.weight.dtype)
                runtime[i][group.fold] = s
    targets = quant_targets(transformer, LayerSelection())
    q = materialize(transformer, targets, get_scheme(fmt_name), {}, runtime)
    return uniform(get_scheme(fmt_name)), targets, q, runtime


def export(transformer, fmt, targets, q, runtime, out: Path, model: str):
    from omegaconf import OmegaConf

    from vqx.stages import EXPORTERS, RunState

    cfg = OmegaConf.create({
        "model": {"name": model, "dtype": "bfloat16"}, "algorithm": {"name": "rtn"},
        "format": {"name": fmt.name, "skip_first_blocks": 0, "skip_last_blocks": 0, "skip_patterns": [],
                   "rules": [{"pattern": "*", "scheme": fmt.name}]},
        "export": {"name": "lightx2v", "dir": str(out), "layout": "blocks", "dtype": "bfloat16", "overwrite": False,
                   "verify": False, "verify_tolerance": 1.0, "verify_blocks": None}})
    EXPORTERS["lightx2v"].export(RunState(cfg, out.parent, types.SimpleNamespace(transformer=transformer), fmt,
                                          targets, q, runtime))


class Mutated:
    """Blocks a and b of an export, to measure mutations in memory (tests run them on folders, through the
    whole of verify-export; for a full-size model that would re-hash gigabytes per mutation)."""

    def __init__(self, folder: Path, a: int, b: int):
        import json

        from safetensors.torch import load_file

        from vqx.export import contract
        from vqx.export.block_compare import recorded
        from vqx.export.checks import Report

        self.cfg = json.loads((folder / "config.json").read_text())
        self.ref = recorded(folder, self.cfg, Report(folder, 1.0))
        self.tensors = {**load_file(folder / f"block_{a}.safetensors"), **load_file(folder / f"block_{b}.safetensors")}
        self.code_keys = {k for k, v in self.tensors.items() if v.dtype in contract.CODE_DTYPES.values()}
        self.scheme = contract.scheme_of_dtype(next(self.tensors[k].dtype for k in self.code_keys))
        self.a, self.b = a, b

    def error(self, fn, device: str, **kw) -> float:
        """How far past its threshold the strongest signal went (> 1: caught; the clean value for none)."""
        from vqx.export.block_compare import SCALE_RTOL, block_error
        from vqx.export.schemas import DEFAULT_TOLERANCE

        t = dict(self.tensors)
        fn(t, self.a, self.b, **kw)
        worst = 0.0
        for i in sorted({self.a, self.b}):
            err, lock = block_error({k: v for k, v in t.items() if k.startswith(f"blocks.{i}.")}, i, self.ref,
                                    self.cfg, self.scheme, self.code_keys, device)
            worst = max(worst, err / DEFAULT_TOLERANCE, max(lock.scale_dev.values()) / SCALE_RTOL,
                        float(sum(lock.off_codes.values())))
        return worst


def real_run(model: str, spec: str) -> dict:
    import json
    import subprocess
    import time

    algo, fmt = spec.split(":")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "run.py", f"model={model}", f"algorithm={algo}", f"format={fmt}",
                            "export=lightx2v", "eval=none", "logger=none", f"hydra.run.dir={tmp}"],
                           cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"{spec}: run.py failed: {r.stderr.strip().splitlines()[-1:]}")
        verify = json.loads((Path(tmp) / "metrics.json").read_text())["export"]["verify"]
        from vqx.export.verify import verify_export

        cpu = verify_export(Path(tmp) / "export", device="cpu")
        return {"model": model, "algorithm": algo, "format": fmt, "blocks": verify["blocks_compared"],
                "export_ok": verify["ok"], "export_max": verify["max_block_error"], "cpu_ok": cpu.ok,
                "cpu_max": max(cpu.block_errors.values()), "run_s": round(seconds, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=["tiny", "tiny_i2v", "mini"])
    p.add_argument("--formats", nargs="+", choices=("w8a8", "fp8"), default=["w8a8", "fp8"])
    p.add_argument("--device", default="auto", help="where the models and the export-time check run")
    p.add_argument("--layers", type=int, default=None, help="blocks of the full-size models (default 1.3B: 30, 14B: 4)")
    p.add_argument("--out", default="verify_floor.json", help="file name under bench/results/")
    p.add_argument("--runs", nargs="*", default=[], metavar="ALGO:FORMAT", help="real runs to export and check")
    p.add_argument("--run-model", default="wan_mini", help="model= of the --runs")
    p.add_argument("--note", default=None, help="a note stored with the results")
    args = p.parse_args()

    from vqx.export.schemas import DEFAULT_TOLERANCE
    from vqx.export.mutations import LINEARS, MUTATIONS, NEEDS_SMOOTHING
    from vqx.export.verify import verify_export
    from vqx.runtime import resolve_device

    device = str(resolve_device(args.device, "--device="))
    rows = []
    for model in args.models:
        for fmt_name in args.formats:
            for smooth in (False, True):
                transformer = build(model, device, args.layers)
                fmt, targets, q, runtime = quantize(transformer, fmt_name, smooth)
                with tempfile.TemporaryDirectory() as tmp:
                    folder = Path(tmp) / "export"
                    export(transformer, fmt, targets, q, runtime, folder, model)
                    del transformer, q
                    report = verify_export(folder, device=device)
                    errs = list(report.block_errors.values())
                    row = {"model": model, "format": fmt_name, "smooth": smooth, "blocks": len(errs), "ok": report.ok,
                           "clean_max": max(errs), "clean_median": statistics.median(errs)}
                    if device != "cpu":
                        cpu = verify_export(folder, device="cpu")
                        row["ok_cpu"], row["clean_max_cpu"] = cpu.ok, max(cpu.block_errors.values())
                    row["clean_signal"] = blocks_signal = None
                    blocks = Mutated(folder, 0, len(errs) - 1)
                    row["clean_signal"] = blocks.error(lambda t, a, b: [], device)
                    for name, fn in MUTATIONS.items():
                        if name in NEEDS_SMOOTHING and not smooth:
                            continue
                        if name in PER_LINEAR:
                            row[name] = min(blocks.error(fn, device, linear=lin) for lin in LINEARS)
                        else:
                            row[name] = blocks.error(fn, device)
                    rows.append(row)
                    print({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                    del blocks
                    shutil.rmtree(folder, ignore_errors=True)
                if device != "cpu":
                    torch.cuda.empty_cache()
    runs = [real_run(args.run_model, spec) for spec in args.runs]
    if runs:
        print_table(runs, list(runs[0]))
    cols = ["model", "format", "smooth", "blocks", "ok", "clean_max", "clean_median"] + \
        (["ok_cpu", "clean_max_cpu"] if device != "cpu" else []) + ["clean_signal"] + list(MUTATIONS)
    clean = max([max(r["clean_max"], r.get("clean_max_cpu", 0.0)) for r in rows]
                + [max(r["export_max"], r["cpu_max"]) for r in runs])
    all_ok = all(r["ok"] and r.get("ok_cpu", True) for r in rows) and all(r["export_ok"] and r["cpu_ok"] for r in runs)
    caught = min(v for r in rows for k, v in r.items() if k in MUTATIONS)
    summary = {"tolerance": DEFAULT_TOLERANCE, "worst_correct_export": clean, "correct_exports_pass": all_ok,
               "worst_clean_signal": max(r["clean_signal"] for r in rows),
               "weakest_mutation_signal": caught}
    print_table([{c: (f"{v:.1e}" if isinstance(v, float) else v) for c, v in r.items()} for r in rows], cols)
    print({k: f"{v:.3g}" for k, v in summary.items()})
    path = write_results(args.out, rows, {"summary": summary, "runs": runs, "note": args.note,
                                          "command": " ".join(["python", "bench/verify_floor.py", *sys.argv[1:]])})
    print(f"wrote {path}")
    return 0 if all_ok and caught > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
