"""`vqx compare DIR...`: every job of one or more multiruns in one HTML report (no W&B needed).

A job is a folder with ``.hydra/`` (Hydra writes it before the job starts); its results are its
``metrics.json``, its overrides ``.hydra/overrides.yaml``, and why it failed ``error.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError

HELP = "compare the jobs of multirun dirs in one report.html (table, best per format, plots)"


@dataclass
class Job:
    dir: Path
    name: str  # shown in the report: the path below the multirun dir
    overrides: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    metrics: dict | None = None  # only for complete jobs
    failure: str | None = None  # why the job has no usable results

    def value(self, key: str) -> Any:
        """A report column of a complete job: lpips, psnr, ssim, noise_floor_<lpips|psnr|ssim>, layer_error_mean/max,
        quantized_layers, total_s."""
        m = self.metrics or {}
        for prefix in ("layer_error", "noise_floor"):
            if key.startswith(prefix + "_"):
                return _num((m.get(prefix) or {}).get(key[len(prefix) + 1:]))
        if key == "total_s":
            return _num((m.get("timings") or {}).get("total_s"))
        evals = m.get("eval") if isinstance(m.get("eval"), dict) else {}
        return _num(m.get(key, evals.get(key)))

    @property
    def format(self) -> str:
        return str((self.metrics or {}).get("format") or _get(self.config, "format.name") or self.overrides.get("format", "?"))

    @property
    def model(self) -> str:
        return str((self.metrics or {}).get("model") or _get(self.config, "model.name") or self.overrides.get("model", "?"))

    @property
    def algorithm(self) -> str:
        return str((self.metrics or {}).get("algorithm") or _get(self.config, "algorithm.name") or self.overrides.get("algorithm", "?"))

    @property
    def attention(self) -> str:
        """The quantized attention, with its sites and 16-bit steps where they are not the defaults; "none"."""
        a = (self.metrics or {}).get("attention")
        if not isinstance(a, dict):
            return str(_get(self.config, "attention.name") or self.overrides.get("attention", "none"))
        label = str(a.get("name", "none"))
        if a.get("sites") not in (None, ["self", "cross"]):
            label += f" sites={','.join(a['sites'])}"
        if a.get("full_precision_steps"):
            label += f" 16-bit steps={a['full_precision_steps']}"
        return label

    @property
    def alpha(self) -> float | None:
        return _num(_get(self.config, "algorithm.alpha"))


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _get(tree: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def find_job_dirs(root: Path) -> list[Path]:
    """Folders holding ``.hydra/`` under ``root`` (``root`` itself for a single run), in natural order."""
    found = []
    for here, dirs, _files in os.walk(root):
        if ".hydra" in dirs:
            found.append(Path(here))
            dirs[:] = []  # jobs do not nest: skip its videos, exports and W&B files
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in p.relative_to(root).parts])


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def parse_overrides(items: Any) -> dict[str, str]:
    """``["format=fp8", "+sweep=alpha"]`` -> ``{"format": "fp8", "+sweep": "alpha"}`` (Hydra's own settings left out)."""
    out = {}
    for item in items if isinstance(items, list) else []:
        key, sep, value = str(item).partition("=")
        if sep and not key.lstrip("+~").startswith("hydra"):
            out[key] = value
    return out


def load_job(job_dir: Path, name: str) -> Job:
    config = _read_yaml(job_dir / "config.yaml") or _read_yaml(job_dir / ".hydra" / "config.yaml")
    job = Job(job_dir, name, parse_overrides(_read_yaml(job_dir / ".hydra" / "overrides.yaml")),
              config if isinstance(config, dict) else {})
    metrics_file = job_dir / "metrics.json"
    error = _read_error(job_dir)
    if not metrics_file.is_file():
        job.failure = f"failed: {error}" if error else "no metrics.json (still running, or killed)"
        return job
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        job.failure = f"metrics.json is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        return job
    if not isinstance(metrics, dict):
        job.failure = "metrics.json is not a JSON object"
    elif metrics.get("status") != "complete":
        job.failure = f"status {metrics.get('status')!r}, not 'complete'" + (f"; {error}" if error else "")
    else:
        job.metrics = metrics
    return job


def _read_error(job_dir: Path) -> str | None:
    try:
        data = json.loads((job_dir / "error.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return f"{data.get('type', 'Error')}: {data.get('error', '')}".strip()


def collect(dirs: list[Path]) -> list[Job]:
    jobs = []
    for root in dirs:
        for job_dir in find_job_dirs(root):
            rel = job_dir.relative_to(root).as_posix()
            if rel == ".":  # DIR is a single run
                label = root.name
            else:
                label = rel if len(dirs) == 1 else f"{root.name}/{rel}"
            jobs.append(load_job(job_dir, label))
    return jobs


def default_output(dirs: list[Path]) -> Path:
    if len(dirs) == 1:
        return dirs[0] / "report.html"
    common = Path(os.path.commonpath([str(d) for d in dirs]))
    if common == Path(common.anchor):
        raise UserError("the DIRs share no parent folder to put the combined report in; pass --out FILE")
    return common / "report.html"


def add_arguments(parser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", type=Path,
                        help="multirun dirs (e.g. multirun/2026-01-31/12-00-00); several make one combined report")
    parser.add_argument("--out", type=Path, default=None,
                        help="report file (default: DIR/report.html; several DIRs: their common parent)")


def main(args) -> int:
    from .report import write_report

    dirs = [d.expanduser().resolve() for d in args.dirs]
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"{d} is not a folder; give a multirun dir (the one holding the job folders 0, 1, ...)")
    jobs = collect(dirs)
    if not jobs:
        raise UserError(f"no jobs under {', '.join(map(str, dirs))}: a job folder holds .hydra/ (is this a run or multirun dir?)")
    out = (args.out.expanduser().resolve() if args.out else default_output(dirs))
    written = write_report(jobs, out, title=", ".join(str(d) for d in dirs))
    failed = sum(j.failure is not None for j in jobs)
    print(f"report: {out} ({len(jobs)} jobs, {len(jobs) - failed} complete, {failed} failed or partial)")
    for path in written:
        print(f"{'table' if path.suffix == '.md' else 'plot'}: {path}")
    return 0
