"""What ``export=torchao`` costs in video quality: the folder loaded back with diffusers' ``from_pretrained`` (torchao's
int8 kernels: activation scale absmax / 127.5, codes in [-128, 127], 1/s in fp32) against the model vqx evaluated
(lightx2v's numbers: absmax / 127), both scored against the same 16-bit videos with the noise floor.

    python bench/torchao_export.py --algorithms rtn,smoothquant,gptq --samples 8 --note "2-core CPU"

Per algorithm: quantize wan_mini (W8A8), score the evaluated model, export, load the folder with diffusers, put its
transformer into the pipeline and score it again on the same prompts and seeds. Writes bench/results/<--out>.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch
from common import add_note_argument, print_table, write_results


def measure(algorithm: str, samples: int, overrides: list[str], work: Path) -> dict:
    import vqx
    from vqx.export.diffusers_torchao import load_transformer

    exp = vqx.Experiment(f"algorithm={algorithm}", "export=torchao", "eval=video", f"eval.num_samples={samples}",
                         "logger=none", *overrides, run_dir=work / algorithm)
    state = exp.quantize()
    evaluated = exp.evaluate(state)
    summary = exp.export(state)
    device = next(state.pipe.transformer.parameters()).device
    state.pipe.transformer = load_transformer(Path(summary["dir"]), exp.cfg.model.dtype, str(device))
    loaded = exp.evaluate(dataclasses.replace(state, metrics={}))
    row = {"algorithm": algorithm, "format": exp.cfg.format.name, "model": exp.cfg.model.name, "videos": samples,
           "overrides": overrides, "smoothed_linears": sum(q.input_smooth_inv is not None for q in state.quantized.values())}
    for name, scores in (("vqx", evaluated), ("torchao", loaded)):
        for key in ("lpips", "psnr", "ssim"):
            row[f"{name}_{key}"] = scores.get(key)
    row["floor_psnr"] = evaluated.get("noise_floor", {}).get("psnr") if isinstance(evaluated.get("noise_floor"), dict) else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithms", default="rtn,smoothquant,gptq")
    ap.add_argument("--samples", type=int, default=8, help="eval prompts (wan_mini has 8)")
    ap.add_argument("--out", default="torchao_export.json", help="results file under bench/results/")
    add_note_argument(ap)
    ap.add_argument("overrides", nargs="*", help="run.py overrides for every run (e.g. model.outliers.channels=8)")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(a, args.samples, args.overrides, Path(work)) for a in args.algorithms.split(",")]
    print_table(rows, ["algorithm", "videos", "vqx_lpips", "vqx_psnr", "torchao_lpips", "torchao_psnr", "floor_psnr"])
    print("wrote", write_results(args.out, rows, note=args.note))


if __name__ == "__main__":
    main()
