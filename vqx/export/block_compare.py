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
as codes or scales off; wrong codes, scales or biases show in the block output. Low-bit checkpoints go through the
same comparison with their linears unpacked and dequantized (`LowbitLockstep`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..quant.numbers import get_grid
from ..quant.scheme import choose_scales, dequantize, quantize_activation
from ..runtime import resolve_device
from . import contract, lightx2v_math
from .checks import Report, TensorFiles
from .lightx2v_lowbit import LOWBIT_SCHEMES
from .lightx2v_reference import GRID, INPUTS, METADATA_KEY, REFERENCE_FILE

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
                tau = TIE * grid_step(v, get_grid("fp8_e4m3")) + qmax * ROW_REL
                lo, hi = ((v - tau).to(torch.float8_e4m3fn).float(), (v + tau).to(torch.float8_e4m3fn).float())
            r = rec_q.float()  # any code between those of v -/+ tau (fp8 near 0: tau spans several grid steps)
            self.off_codes[name] = int((differ & ((r < lo) | (r > hi))).sum())
        return rec_q, rec_sx


def grid_step(v: torch.Tensor, grid) -> torch.Tensor:
    """The spacing of ``grid``'s codes at v: 1 on the integer grids, 2^(exp(v) - mantissa bits) on the floats
    (fixed below the smallest normal exponent)."""
    if grid.name == "fp8_e4m3":
        exp_bits, man_bits = 4, 3
    elif grid.minifloat is not None:
        exp_bits, man_bits = grid.minifloat
    else:
        return torch.ones_like(v)
    min_exp = 2 - 2 ** (exp_bits - 1)
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=2.0 ** min_exp))) - man_bits)


class LowbitLockstep:
    """The low-bit twin of `Lockstep` (`lightx2v_math.LOWBIT`): each linear quantizes its own input with the scheme's
    activation quantizer under the calibrated value the folder holds, checks scales and codes against the recorded
    ones, then multiplies the recorded dequantized activation. A group's scale may differ by `SCALE_RTOL` (fp32
    scales), or be another rounding of an absmax within `SCALE_RTOL` of a boundary (e8m0, e4m3: the scale of the
    absmax scaled by 1 -/+ SCALE_RTOL is the recorded one); a recorded code must be a code of a value within `TIE`
    grid steps plus `ROW_REL` of the grid's range of x / its recorded scale. Weight-only linears (no recorded codes)
    take their input as it is."""

    def __init__(self, codes: dict[str, tuple[torch.Tensor, torch.Tensor]], act, values: dict[str, torch.Tensor | None],
                 device):
        self.codes, self.act, self.values, self.device = codes, act, values, device
        self.off_codes: dict[str, int] = {}
        self.scale_dev: dict[str, float] = {}  # groups whose scale is off (a count)

    def __call__(self, name: str, h: torch.Tensor) -> torch.Tensor:
        if name not in self.codes:
            return h
        ts, value = self.act, self.values.get(name)
        rows = h.reshape(-1, h.shape[-1]).float()
        rec_q, rec_s = (t.to(self.device).float() for t in self.codes[name])
        if rec_q.shape != rows.shape:
            self.off_codes[name] = rec_q.numel()
            return h
        own_q, own_s = quantize_activation(rows, ts, value)
        near = ((own_s / rec_s) - 1).abs() <= SCALE_RTOL
        if ts.dynamic:  # a tie of the scale's rounding
            g = value.float().reshape(()) if ts.global_scale else None
            for factor in (1 - SCALE_RTOL, 1 + SCALE_RTOL):
                near |= choose_scales(rows, ts, g, clip=factor) == rec_s
        self.scale_dev[name] = float((~near).sum())
        differ = own_q != rec_q
        if differ.any():
            size = ts.block_size(tuple(rows.shape))
            v = rows / rec_s.repeat_interleave(size[0], 0).repeat_interleave(size[1], 1)
            grid = ts.grid_
            tau = TIE * grid_step(v, grid) + grid.qmax * ROW_REL
            lo, hi = grid.round_to_grid(v - tau), grid.round_to_grid(v + tau)
            self.off_codes[name] = int((differ & ((rec_q < lo) | (rec_q > hi))).sum())
        return dequantize(rec_q, rec_s, ts).reshape(h.shape)


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
                device, lowbit: dict | None = None) -> tuple[float, Lockstep | LowbitLockstep]:
    """Block ``i`` computed by lightx2v's fp32 math on its native ``tensors`` (as stored), in lockstep with the
    recorded codes: (relative update error against the recorded output, the lockstep's counts). ``lowbit``: for a
    low-bit checkpoint, {"weights": block-relative linear -> its dequantized fp32 weight, "values": -> its calibrated
    activation value as the layer uses it, "act": the activation scheme}; the packed tensors are then not read."""
    floats = {k: v for k, v in tensors.items() if k not in code_keys} if lowbit else tensors
    t = {k: v.to(device) for k, v in lightx2v_math.loader_cast(floats, code_keys, torch.float32).items()}
    d = {k: v.to(device) for k, v in ref.inputs.items()}
    heads = int(wan_cfg["num_heads"])
    freqs = lightx2v_math.rope_freqs(d["x"].shape[-1] // heads, GRID).to(device)
    if lowbit is None:
        lock = Lockstep(ref.block_codes(i), scheme, device)
    else:
        t.update({f"blocks.{i}.{n}.weight": w.to(device) for n, w in lowbit["weights"].items()})
        values = {n: (v.to(device) if v is not None else None) for n, v in lowbit["values"].items()}
        lock, scheme = LowbitLockstep(ref.block_codes(i), lowbit["act"], values, device), lightx2v_math.LOWBIT
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
                   device: str | None, max_blocks: int | None, lowbit: Callable[[int], dict] | None = None) -> None:
    """``lowbit``: for a low-bit checkpoint, block index -> `block_error`'s ``lowbit`` (its linears unpacked)."""
    ref = recorded(folder, wan_cfg, report)
    if ref is None:
        return
    dev = resolve_device(device or "auto", "--device=")
    linears = contract.quantized_linears(contract.meta_transformer(dkw))
    code_keys = {f"{name}.{leaf}" for name in linears
                 for leaf in (("weight", "weight_scale", "weight_global_scale", "weight_workspace", "input_absmax",
                               "input_scale") if lowbit else ("weight",))}
    weight_only = lowbit is not None and LOWBIT_SCHEMES[scheme].activation is None
    blocks = sorted(ref.outputs)
    blocks = [blocks[j] for j in spread(len(blocks), max_blocks)]
    for i in tqdm(blocks, desc="verify", unit="block", leave=False):
        codes = ref.block_codes(i)
        missing = [n for n in linears if n.startswith(f"blocks.{i}.") and n[len(f"blocks.{i}."):] not in codes]
        if missing and not weight_only:
            report.problems.append(f"{REFERENCE_FILE}: no recorded activation codes for {', '.join(missing[:3])}")
            continue
        tensors = {k: tf.get(k) for k in tf.where if k.startswith(f"blocks.{i}.")}
        err, lock = block_error(tensors, i, ref, wan_cfg, scheme, code_keys, dev, lowbit(i) if lowbit else None)
        report.block_errors[i] = err
        off = {n: c for n, c in lock.off_codes.items() if c}
        scales = {n: d for n, d in lock.scale_dev.items() if not d <= SCALE_RTOL}
        if off:
            report.problems.append(f"blocks.{i}: the inputs of {', '.join(sorted(off))} quantize to other codes than the "
                                   f"evaluated model's ({sum(off.values())} codes away from any rounding tie): a tensor "
                                   f"before them (norm, modulation, smoothing vector) differs")
        if scales and lowbit is None:
            n, d = max(scales.items(), key=lambda kv: kv[1])
            report.problems.append(f"blocks.{i}: the per-token activation scales of {', '.join(sorted(scales))} differ "
                                   f"from the evaluated model's by up to {d:.3g} (relative, at {n}; a correct export: < "
                                   f"{SCALE_RTOL:g}): a tensor before them (smoothing vector, norm) differs")
        elif scales:
            n, d = max(scales.items(), key=lambda kv: kv[1])
            report.problems.append(f"blocks.{i}: the activation scales of {', '.join(sorted(scales))} differ from the "
                                   f"evaluated model's away from any rounding boundary ({d:.0f} group scales at {n}): "
                                   f"a tensor before them (smoothing vector, norm, calibrated value) differs")
        if not math.isfinite(err) or err > report.tolerance:
            report.problems.append(f"blocks.{i}: lightx2v's math on the exported tensors differs from the evaluated "
                                   f"block's recorded output by {err:.3g} (relative to the block's update; "
                                   f"tolerance {report.tolerance:g})")
