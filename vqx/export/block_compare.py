"""The numeric check of a lightx2v export: each recorded block computed the way lightx2v computes it from the
folder's tensors (`lightx2v_math`, in fp32) against what the evaluated model's block did on the same inputs at
export time (`lightx2v_reference`). Nothing on the reference side is read from the checkpoint tensors, so any
change of their values shows.

The two fp32 computations differ by op order, so an activation lying within a few ulps of a rounding tie can get
a different code on each side, and on a full-size block hundreds do: compared freely, correct exports then differ
by up to 2e-2 (Wan2.1 1.3B, fp8), as much as a 1% error in one linear's scales. So the emulation runs in lockstep:
each quantized linear quantizes its own input, checks it against the codes and per-token scales the evaluated
layer used (a code may differ only where the value is within `TIE` code units of a rounding tie; a token's scale
only by `SCALE_RTOL`), and then multiplies the recorded codes. A wrong smoothing vector, norm or modulation shows
as codes or scales off; wrong codes, scales or biases show in the block output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..runtime import resolve_device
from . import contract, lightx2v_math
from .checks import Report, TensorFiles
from .lightx2v_reference import GRID, INPUTS, METADATA_KEY, REFERENCE_FILE

# Max relative error of a block's update (lockstep, fp32) between lightx2v's math on the files and the evaluated
# block's recorded output. Measured on correct exports (bench/verify_floor.py; bench/results/verify_floor*.json):
# 1.9e-7 to 5.9e-7 (fp32 summation order; wan_tiny to Wan2.1 14B, int8 and fp8, CPU and H200). The weakest value
# error measured, a 1% error in the scales of one q/k projection (whose RMSNorm all but removes it), moves a
# 14B block's output by 8.7e-6; every other kind moves codes or scales. 3e-6 is 5x the worst correct export.
DEFAULT_TOLERANCE = 3e-6
# A code may differ from the recorded one only if it is a code of a value within TIE grid steps plus ROW_REL of
# the token's absmax (fp32 noise; it matters where fp8's grid is finest, near 0) of this side's value.
TIE = 1e-2
ROW_REL = 1e-5
SCALE_RTOL = 1e-4  # per-token activation scales agree to 3e-6 at most (14B); a 1% smoothing error moves them 1e-2


class Lockstep:
    """Supplies the recorded codes to `lightx2v_math.block_forward` and counts what does not match."""

    def __init__(self, codes: dict[str, tuple[torch.Tensor, torch.Tensor]], scheme: str, device):
        self.codes, self.scheme, self.device = codes, scheme, device
        self.off_codes: dict[str, int] = {}
        self.scale_dev: dict[str, float] = {}

    def __call__(self, name: str, h: torch.Tensor):
        rows = h.reshape(-1, h.shape[-1])
        own_q, own_sx = lightx2v_math.act_quant(rows, self.scheme, "vllm")
        rec_q, rec_sx = (t.to(self.device) for t in self.codes[name])
        if rec_q.shape != own_q.shape:
            self.off_codes[name] = rec_q.numel()
            return own_q, own_sx
        self.scale_dev[name] = float(((own_sx / rec_sx) - 1).abs().max())
        differ = own_q.float() != rec_q.float()
        if differ.any():
            v = rows.float() / own_sx
            qmax = contract.CODE_QMAX[self.scheme]
            if self.scheme == "int8":
                tau = TIE + qmax * ROW_REL
                lo, hi = torch.round(v - tau), torch.round(v + tau)
            else:
                sp = torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=2.0 ** -6))) - 3)  # e4m3 grid step at v
                tau = TIE * sp + qmax * ROW_REL
                lo, hi = ((v - tau).to(torch.float8_e4m3fn).float(), (v + tau).to(torch.float8_e4m3fn).float())
            r = rec_q.float()  # any code between those of v -/+ tau (fp8 near 0: tau spans several grid steps)
            self.off_codes[name] = int((differ & ((r < lo) | (r > hi))).sum())
        return rec_q, rec_sx


def relative_update_error(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> float:
    """||out - ref|| / ||ref - x||: the difference relative to what the block adds to its input."""
    out, ref, x = out.float().reshape(-1), ref.float().reshape(-1), x.float().reshape(-1)
    denom = (ref - x).norm()
    err = (out - ref).norm()
    return float(err / denom) if denom > 0 else float(err)


def spread(n: int, k: int | None) -> list[int]:
    """``k`` block indices evenly spread over ``n`` (first and last included); all when k is None or >= n."""
    if k is None or k >= n:
        return list(range(n))
    if k <= 1:
        return [0]
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def block_error(tensors: dict, i: int, ref: "Recorded", wan_cfg: dict, scheme: str, code_keys: set[str],
                device) -> tuple[float, Lockstep]:
    """Block ``i`` computed by lightx2v's fp32 math on its native ``tensors`` (as stored), in lockstep with the
    recorded codes: (relative update error against the recorded output, the lockstep's counts)."""
    t = {k: v.to(device) for k, v in lightx2v_math.loader_cast(tensors, code_keys, torch.float32).items()}
    d = {k: v.to(device) for k, v in ref.inputs.items()}
    heads = int(wan_cfg["num_heads"])
    freqs = lightx2v_math.rope_freqs(d["x"].shape[-1] // heads, GRID).to(device)
    lock = Lockstep(ref.block_codes(i), scheme, device)
    out = lightx2v_math.block_forward(t, i, d["x"], d["embed0"], d["context"], d.get("context_img"), freqs, heads,
                                      float(wan_cfg["eps"]), scheme, lockstep=lock)
    return relative_update_error(out.float().cpu(), ref.outputs[i], ref.inputs["x"]), lock


class Recorded:
    """The contents of ``REFERENCE_FILE``."""

    def __init__(self, tensors: dict[str, torch.Tensor], alias: dict[str, str]):
        self.inputs = {k: tensors[f"inputs.{k}"] for k in INPUTS if f"inputs.{k}" in tensors}
        self.outputs = {int(k.split(".")[1]): v for k, v in tensors.items() if k.count(".") == 1 and k.startswith("blocks.")}
        self.tensors, self.alias = tensors, alias

    def block_codes(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        p = f"blocks.{i}."
        keys = {k[len(p):].rsplit(".", 1)[0]: k.rsplit(".", 1)[0] for k in self.tensors if k.startswith(p) and k.endswith(".act_codes")}
        keys.update({k[len(p):]: v for k, v in self.alias.items() if k.startswith(p)})
        return {name: (self.tensors[f"{key}.act_codes"], self.tensors[f"{key}.act_scale"]) for name, key in keys.items()}


def recorded(folder: Path, wan_cfg: dict, report: Report) -> Recorded | None:
    """The recorded inputs, block outputs and codes, or None (with a note or a problem) when there are none."""
    from safetensors import safe_open

    path = folder / REFERENCE_FILE
    if not path.is_file():
        report.notes.append(f"no {REFERENCE_FILE} (an export written before vqx recorded its blocks): lightx2v's math was not compared "
                            f"with the evaluated model, only names, dtypes, shapes and values' sanity were checked")
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
            ref = Recorded({k: f.get_tensor(k) for k in f.keys()}, info.get("alias", {}))
    except Exception as e:  # noqa: BLE001  (any corrupt file: one line)
        report.problems.append(f"{REFERENCE_FILE}: unreadable ({str(e).splitlines()[0][:160]})")
        return None
    inputs, outputs = ref.inputs, ref.outputs
    dim, i2v = int(wan_cfg["dim"]), wan_cfg["model_type"] == "i2v"
    tokens = math.prod(GRID)
    bad = [k for k, v in inputs.items() if v.dim() != 2 or v.shape[1] != dim]
    bad += [f"blocks.{i}" for i, v in outputs.items() if tuple(v.shape) != (tokens, dim) or i >= wan_cfg["num_layers"]]
    if "x" not in inputs or "embed0" not in inputs or "context" not in inputs or ("context_img" in inputs) != i2v:
        bad.append(f"inputs (has {', '.join(sorted(inputs))})")
    if bad or not outputs:
        report.problems.append(f"{REFERENCE_FILE} does not fit config.json (dim {dim}, {wan_cfg['num_layers']} blocks, "
                               f"{wan_cfg['model_type']}): {', '.join(bad) or 'no block outputs'}")
        return None
    return ref


def compare_blocks(folder: Path, tf: TensorFiles, wan_cfg: dict, dkw: dict, scheme: str, report: Report,
                   device: str | None, max_blocks: int | None) -> None:
    ref = recorded(folder, wan_cfg, report)
    if ref is None:
        return
    dev = resolve_device(device or "auto", "--device=")
    linears = contract.quantized_linears(contract.meta_transformer(dkw))
    code_keys = {f"{name}.weight" for name in linears}
    blocks = sorted(ref.outputs)
    blocks = [blocks[j] for j in spread(len(blocks), max_blocks)]
    for i in tqdm(blocks, desc="verify", unit="block", leave=False):
        codes = ref.block_codes(i)
        missing = [n for n in linears if n.startswith(f"blocks.{i}.") and n[len(f"blocks.{i}."):] not in codes]
        if missing:
            report.problems.append(f"{REFERENCE_FILE}: no recorded activation codes for {', '.join(missing[:3])}")
            continue
        tensors = {k: tf.get(k) for k in tf.where if k.startswith(f"blocks.{i}.")}
        err, lock = block_error(tensors, i, ref, wan_cfg, scheme, code_keys, dev)
        report.block_errors[i] = err
        off = {n: c for n, c in lock.off_codes.items() if c}
        scales = {n: d for n, d in lock.scale_dev.items() if not d <= SCALE_RTOL}
        if off:
            report.problems.append(f"blocks.{i}: the inputs of {', '.join(sorted(off))} quantize to other codes than the "
                                   f"evaluated model's ({sum(off.values())} codes away from any rounding tie): a tensor "
                                   f"before them (norm, modulation, smoothing vector) differs")
        if scales:
            n, d = max(scales.items(), key=lambda kv: kv[1])
            report.problems.append(f"blocks.{i}: the per-token activation scales of {', '.join(sorted(scales))} differ "
                                   f"from the evaluated model's by up to {d:.3g} (relative, at {n}; a correct export: < "
                                   f"{SCALE_RTOL:g}): a tensor before them (smoothing vector, norm) differs")
        if not math.isfinite(err) or err > report.tolerance:
            report.problems.append(f"blocks.{i}: lightx2v's math on the exported tensors differs from the evaluated "
                                   f"block's recorded output by {err:.3g} (relative to the block's update; "
                                   f"tolerance {report.tolerance:g})")
