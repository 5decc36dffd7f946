"""What every export verifier shares: the report it fills, the registry it joins, and reading a folder's JSON and
safetensors files (lazily: a tensor is read only when a check asks for it).

A verifier is registered under the manifest ``kind`` it checks (``VERIFIERS.register("lightx2v")``) and is
called as ``verifier(job, report)`` after `verify.verify_export` has checked the manifest's hashes; it appends
one line per problem to ``report.problems``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..registry import Registry

MAX_LINES = 25


@dataclass
class Report:
    folder: Path
    tolerance: float
    kind: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    block_errors: dict[int, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        errs = list(self.block_errors.values())
        return {"ok": self.ok, "problems": self.problems[:MAX_LINES], "notes": self.notes,
                "blocks_compared": len(errs), "max_block_error": max(errs) if errs else None,
                "mean_block_error": sum(errs) / len(errs) if errs else None, "tolerance": self.tolerance}

    def lines(self) -> list[str]:
        desc = ", ".join(f"{k}={v}" for k, v in self.info.items())
        head = f"{'OK' if self.ok else 'FAILED'} {self.folder} ({self.kind or 'unknown kind'}{', ' + desc if desc else ''})"
        out = [head]
        if self.block_errors:
            i, worst = max(self.block_errors.items(), key=lambda kv: kv[1])
            out.append(f"  block outputs, lightx2v's fp32 math vs the evaluated model's: max relative error {worst:.3g} (blocks.{i}), "
                       f"mean {sum(self.block_errors.values()) / len(self.block_errors):.3g}, tolerance {self.tolerance:g}")
        out += [f"  note: {n}" for n in self.notes]
        shown = self.problems[:MAX_LINES]
        out += [f"  error: {p}" for p in shown]
        if len(self.problems) > len(shown):
            out.append(f"  error: ... and {len(self.problems) - len(shown)} more")
        return out


@dataclass(frozen=True)
class VerifyJob:
    """One folder to verify and how: ``files`` are the manifest's safetensors files present; ``device`` where the numeric comparison runs (None/"auto": cuda if available);
    ``max_blocks`` how many blocks."""

    folder: Path
    manifest: dict
    files: list[str]
    compute: bool = True
    device: str | None = None
    max_blocks: int | None = None


Verifier = Callable[[VerifyJob, Report], None]
VERIFIERS: Registry[Verifier] = Registry("export verifier")


def names(keys, n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def read_json(path: Path, report: Report) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        report.problems.append(f"{path.name} is missing")
    except (ValueError, UnicodeDecodeError) as e:
        report.problems.append(f"{path.name} is not valid JSON ({e})")
    return None


# safetensors' dtype names
ST_DTYPES = {"I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16,
             "F32": torch.float32, "F64": torch.float64, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
             "F8_E5M2": torch.float8_e5m2, "BOOL": torch.bool, "I16": torch.int16, "F8_E8M0": torch.float8_e8m0fnu}


class TensorFiles:
    """Lazy access to every tensor of a folder's safetensors files (each read only when asked for)."""

    def __init__(self, folder: Path, files: list[str], report: Report):
        from safetensors import safe_open

        self.handles, self.where = {}, {}
        for name in files:
            try:
                h = safe_open(str(folder / name), framework="pt")
                keys = list(h.keys())
            except Exception as e:  # noqa: BLE001  (any corrupt header: one line)
                report.problems.append(f"{name}: unreadable safetensors file ({str(e).splitlines()[0][:160]})")
                continue
            self.handles[name] = h
            for k in keys:
                if k in self.where:
                    report.problems.append(f"{k}: in both {self.where[k]} and {name}")
                self.where[k] = name

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)

    def meta(self, key: str) -> tuple[str, tuple[int, ...]]:
        s = self.handles[self.where[key]].get_slice(key)
        return s.get_dtype(), tuple(s.get_shape())
