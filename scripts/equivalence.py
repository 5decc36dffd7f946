"""Record and compare what vqx computes for every model x algorithm x format, through the command line only.

    python scripts/equivalence.py record --repo /work/wt-before --out bench/results/equivalence/before.json
    python scripts/equivalence.py compare before.json after.json [--out report.json]

`record` runs `python <repo>/run.py -m ...` (Hydra multiruns, one process at a time: per model one multirun of the
lightx2v formats with a verified export, one of the others with export=none) with a fresh VQX_CACHE_DIR and every
output under a temp dir, and keeps per point: status (or the error line), each layer's errors, groups, layer error
statistics, quantized layer count, video scores (means, stds, per frame, per video) and the sha256 of every exported
`*.safetensors` file and of config.json. `compare` checks every recorded value for exact equality (floats too: the
refactor promises identical numbers), prints one line per point and exits 0 only when every point is identical.
Default matrix: 6 algorithms x 7 formats on wan_tiny and wan_tiny_i2v, x 4 formats on wan_mini (`--restrict`).
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from itertools import product
from pathlib import Path

MODELS = ["wan_tiny", "wan_tiny_i2v", "wan_mini"]
ALGORITHMS = ["rtn", "smoothquant", "awq", "gptq", "smoothquant_gptq", "awq_gptq"]
FORMATS = ["w8a8", "fp8", "none", "w8a16", "fp8_w", "fp_e3m4", "fp_e2m5"]
EXPORTED = ["w8a8", "fp8"]  # export=lightx2v (verified); it refuses the other formats, which run with export=none
# wan_mini costs 25-250 s a point on 2 busy CPU cores (AWQ the most): the full 42 points would take well over 30 min
RESTRICT = {"wan_mini": ["w8a8", "fp8", "none", "fp_e3m4"]}
COMMON = ["logger=none", "eval=video", "eval.num_samples=1", "eval.noise_floor=none"]
VIDEO_KEYS = ["lpips", "psnr", "ssim", "lpips_std", "psnr_std", "ssim_std", "per_frame"]
DONE = re.compile(r"metrics written to (\S+)/metrics\.json|vqx: job \d+ \((\S+)\) failed")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def job_point(job: Path) -> tuple[str, str]:
    """(algorithm, format) of a job dir, from its .hydra/overrides.yaml."""
    kv = dict(line[2:].strip().split("=", 1) for line in (job / ".hydra/overrides.yaml").read_text().splitlines()
              if line.startswith("- ") and "=" in line)
    return kv["algorithm"], kv["format"]


def read_point(job: Path) -> dict:
    """What one job dir says: its error, or the numbers and export digests it produced."""
    if (job / "error.json").is_file():
        err = json.loads((job / "error.json").read_text())
        return {"status": "failed", "error": err.get("error"), "error_type": err.get("type")}
    if not (job / "metrics.json").is_file():
        return {"status": "failed", "error": "no metrics.json and no error.json"}
    m = json.loads((job / "metrics.json").read_text())
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    point = {
        "status": m.get("status", "complete"),
        "quantized_layers": m.get("quantized_layers"),
        "layer_error": m.get("layer_error"),
        "layer_error_rtn": m.get("layer_error_rtn"),
        "layers": [{"name": r["name"], **{k: v for k, v in r.items() if number(v)}} for r in m.get("layers", [])],
        "groups": m.get("groups"),
        **{k: m.get(k) for k in VIDEO_KEYS},
        "videos": [{k: v.get(k) for k in ("index", "seed", "lpips", "psnr", "ssim", "per_frame")}
                   for v in m.get("videos", [])],
    }
    export = job / "export"
    if export.is_dir():
        point["export"] = {
            "safetensors": {str(p.relative_to(export)): sha256(p) for p in sorted(export.rglob("*.safetensors"))},
            "config.json": sha256(export / "config.json") if (export / "config.json").is_file() else None,
            "verify": {k: v for k, v in (m.get("export", {}).get("verify") or {}).items() if number(v)},
        }
    return point


def describe(key: str, p: dict) -> str:
    if p["status"] != "complete":
        return f"  {key}: FAILED {p.get('error')}"
    mean = (p.get("layer_error") or {}).get("mean")
    error = f", mean layer error {mean:.4g}" if mean is not None else ""
    video = f", lpips {p['lpips']:.4g} psnr {p['psnr']:.4g}" if p.get("lpips") is not None else ""
    return f"  {key}: ok, {p.get('quantized_layers')} quantized layers{error}{video}"


def multirun(repo: Path, model: str, formats: list[str], export: str, tmp: Path, env: dict, points: dict) -> dict:
    """One `run.py -m` process over ALGORITHMS x formats; fills points[model/algorithm/format]."""
    sweep = tmp / model / export
    cmd = [sys.executable, str(repo / "run.py"), "-m", f"model={model}", f"algorithm={','.join(ALGORITHMS)}",
           f"format={','.join(formats)}", f"export={export}", *COMMON, f"hydra.sweep.dir={sweep}"]
    print(f"[{model}] multirun export={export}: {len(ALGORITHMS) * len(formats)} points ({','.join(formats)})",
          flush=True)
    start, tail = time.time(), []
    with open(tmp / f"{model}.{export}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.strip()])[-5:] if line.strip() else tail
                if (hit := DONE.search(line)) and Path(job := hit.group(1) or hit.group(2)).is_dir():
                    algorithm, fmt = job_point(Path(job))
                    points[key := f"{model}/{algorithm}/{fmt}"] = read_point(Path(job))
                    print(f"{describe(key, points[key])} [{time.time() - start:.0f} s]", flush=True)
        finally:
            if proc.poll() is None and sys.exc_info()[0] is not None:
                proc.kill()  # this script failed: leave no run.py behind
        rc = proc.wait()
    for job in sorted(p for p in sweep.glob("*") if (p / ".hydra").is_dir()):  # the authoritative read
        algorithm, fmt = job_point(job)
        points[f"{model}/{algorithm}/{fmt}"] = read_point(job)
    for algorithm, fmt in product(ALGORITHMS, formats):
        points.setdefault(f"{model}/{algorithm}/{fmt}", {"status": "failed", "error": f"no job dir (multirun exit "
                                                                                     f"{rc}: {tail[-1] if tail else ''})"})
    seconds = round(time.time() - start, 1)
    print(f"[{model}] multirun export={export} done in {seconds} s (exit {rc})", flush=True)
    return {"command": " ".join(cmd), "exit_code": rc, "seconds": seconds}


def record(args) -> int:
    repo = Path(args.repo).resolve()
    restrict = {**RESTRICT, **dict(r.split("=", 1) for r in args.restrict)}
    restrict = {m: (FORMATS if f == "all" else f if isinstance(f, list) else f.split(",")) for m, f in restrict.items()}
    tmp = Path(tempfile.mkdtemp(prefix="vqx-equivalence-"))
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "VQX_CACHE_DIR": str(tmp / "cache")}
    env.pop("VQX_DEBUG", None)
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    # which vqx runs: wan_mini's model.path is ${vqx_repo:...}, i.e. resolved next to the imported vqx package
    check = subprocess.run([sys.executable, str(repo / "run.py"), "model=wan_mini", "--cfg", "job", "--resolve",
                            "-p", "model.path"], cwd=tmp, env=env, capture_output=True, text=True)
    vqx_path = (check.stdout.strip() or check.stderr.strip()).splitlines()[-1:] or [""]
    print(f"repo {repo} at {git('rev-parse', 'HEAD')}; wan_mini model.path resolves to {vqx_path[0]}", flush=True)
    if not vqx_path[0].startswith(str(repo)):
        print("WARNING: run.py does not seem to import vqx from --repo", flush=True)
    out = {"repo": str(repo), "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
           "vqx_check": {"wan_mini model.path": vqx_path[0]},
           "torch": metadata.version("torch"), "diffusers": metadata.version("diffusers"), "python": sys.version.split()[0],
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "matrix": {}, "multiruns": [], "points": {}}
    start = time.time()
    for model in args.models.split(","):
        formats = [f for f in FORMATS if f in restrict.get(model, FORMATS)]
        out["matrix"][model] = {"algorithms": ALGORITHMS, "formats": formats,
                                **({"restricted": f"formats limited to {formats} (CPU time)"} if formats != FORMATS else {})}
        for fmts, export in (([f for f in formats if f in EXPORTED], "lightx2v"),
                             ([f for f in formats if f not in EXPORTED], "none")):
            if fmts:
                out["multiruns"].append({"model": model, **multirun(repo, model, fmts, export, tmp, env, out["points"])})
    out["seconds"] = round(time.time() - start, 1)
    failed = [k for k, p in out["points"].items() if p["status"] != "complete"]
    print(f"{len(out['points'])} points, {len(failed)} failed, {out['seconds']} s", flush=True)
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    partial.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(partial, dest)
    print(f"written {dest}", flush=True)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def flatten(value, path=(), generic=()):
    """(path, generic path, leaf) for every leaf; list items keyed by their `name` (layers) or index."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(v, (*path, str(k)), (*generic, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from flatten(v, (*path, str(v.get("name", i)) if isinstance(v, dict) else str(i)), (*generic, "*"))
    else:
        yield ".".join(path), ".".join(generic).replace(".*", "[*]"), value


def same(a, b) -> bool:
    return a == b and type(a) is type(b) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def diff_point(a: dict, b: dict) -> list[dict]:
    """Differing fields, grouped by generic path: how many leaves differ and the largest absolute difference."""
    if a.get("status") != b.get("status"):  # one failed: its other fields are all missing, say why instead
        why = " / ".join(f"{p.get('status')}: {p['error']}" if "error" in p else p.get("status") for p in (a, b))
        return [{"field": "status", "count": 1, "max_abs_diff": None, "example": why}]
    la = {p: (g, v) for p, g, v in flatten(a)}
    lb = {p: (g, v) for p, g, v in flatten(b)}
    fields = {}
    for p in sorted(la.keys() | lb.keys()):
        (ga, va), (gb, vb) = la.get(p, (None, None)), lb.get(p, (None, None))
        if p in la and p in lb and same(va, vb):
            continue
        f = fields.setdefault(ga or gb, {"field": ga or gb, "count": 0, "max_abs_diff": None, "example": None})
        f["count"] += 1
        num = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        if num and p in la and p in lb:
            d = abs(va - vb)
            f["max_abs_diff"] = d if f["max_abs_diff"] is None else max(f["max_abs_diff"], d)
        if f["example"] is None:
            f["example"] = f"{p}: {va!r} -> {vb!r}" if p in la and p in lb else f"{p}: only in {'AB'[p in lb]}"
    return list(fields.values())


def compare(args) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    print(f"A: {args.a} (commit {a.get('commit', '?')[:10]}, torch {a.get('torch')})")
    print(f"B: {args.b} (commit {b.get('commit', '?')[:10]}, torch {b.get('torch')})")
    if a.get("matrix") != b.get("matrix"):
        print("note: the two records ran different matrices")
    report, keys = {}, sorted(a["points"].keys() | b["points"].keys())
    width = max(map(len, keys), default=10)
    for key in keys:
        pa, pb = a["points"].get(key), b["points"].get(key)
        if pa is None or pb is None:
            entry = {"result": f"only in {'A' if pb is None else 'B'}", "fields": []}
        else:
            fields = diff_point(pa, pb)
            entry = {"result": "identical" if not fields else "differs", "fields": fields, "status": pa["status"]}
        report[key] = entry
        text = entry["result"] + (f" ({pa['status']})" if entry["result"] == "identical" and pa["status"] != "complete" else "")
        for f in entry["fields"]:
            delta = f", max |d| {f['max_abs_diff']:.3g}" if f["max_abs_diff"] is not None else ""
            text += f"; {f['field']}: {f['count']} differ{delta} (e.g. {f['example']})"
        print(f"{key:<{width}}  {text}")
    n_diff = sum(e["result"] != "identical" for e in report.values())
    print(f"{len(report)} points: {len(report) - n_diff} identical, {n_diff} not")
    if args.out:
        Path(args.out).write_text(json.dumps({"a": args.a, "b": args.b, "identical": n_diff == 0,
                                              "points": report}, indent=1) + "\n")
    return 0 if n_diff == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="run the matrix on a checkout and write one JSON")
    r.add_argument("--repo", required=True, help="the vqx checkout whose run.py runs")
    r.add_argument("--out", required=True)
    r.add_argument("--models", default=",".join(MODELS))
    r.add_argument("--restrict", action="append", default=[], metavar="MODEL=F1,F2|all",
                   help=f"formats of a model (default {RESTRICT}; 'all' for every format)")
    r.add_argument("--keep", action="store_true", help="keep the temp dir with every job dir")
    c = sub.add_parser("compare", help="compare two records; exit 0 when every point is identical")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--out")
    args = parser.parse_args()
    return record(args) if args.command == "record" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
