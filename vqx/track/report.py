"""The HTML of `vqx compare`: one self-contained file (plain JS, PNGs embedded) that works offline."""

from __future__ import annotations

import base64
import html
import io
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..eval.paired import format_interval
from ..io import atomic_path, write_text_atomic
from .baseline import paired_vs_rtn
from .compare import Job

# (key, header, python format, one line of meaning); lower is better except psnr and ssim
COLUMNS = [
    ("lpips", "LPIPS", "{:.4f}", "perceptual distance to the 16-bit videos (lower is better)"),
    ("psnr", "PSNR", "{:.2f}", "dB against the 16-bit videos (higher is better)"),
    ("ssim", "SSIM", "{:.4f}", "structural similarity to the 16-bit videos (higher is better)"),
    ("lpips_std", "LPIPS std", "{:.4f}", "spread of LPIPS over the job's videos (standard deviation)"),
    ("noise_floor_lpips", "LPIPS floor", "{:.4f}", "LPIPS of the 16-bit model against a second 16-bit run: "
     "differences below it are noise"),
    ("noise_floor_psnr", "PSNR floor", "{:.2f}", "PSNR of the 16-bit model against a second 16-bit run"),
    ("layer_error_mean", "layer err mean", "{:.3e}", "mean relative output error of the quantized linears"),
    ("layer_error_max", "layer err max", "{:.3e}", "largest relative output error of one linear"),
    ("quantized_layers", "quantized", "{:.0f}", "linears quantized"),
    ("total_s", "time (s)", "{:.1f}", "job wall time"),
]
HEADERS = {key: header for key, header, _, _ in COLUMNS}
FORMATS = {key: fmt for key, _, fmt, _ in COLUMNS}


def ranking_metric(jobs: list[Job]) -> str:
    """LPIPS when any of these jobs has it, else the mean layer error."""
    return "lpips" if any(j.value("lpips") is not None for j in jobs) else "layer_error_mean"


def best_per_format(complete: list[Job]) -> dict[str, tuple[Job, str]]:
    """The best job of each format ("model / format" when the jobs span models: runs of different models are
    never ranked against each other) and the metric it was ranked by."""
    several_models = len({j.model for j in complete}) > 1
    by_format: dict[str, list[Job]] = defaultdict(list)
    for job in complete:
        by_format[f"{job.model} / {job.format}" if several_models else job.format].append(job)
    best = {}
    for fmt, jobs in sorted(by_format.items()):
        metric = ranking_metric(jobs)
        scored = [j for j in jobs if j.value(metric) is not None]
        if scored:
            best[fmt] = (min(scored, key=lambda j: j.value(metric)), metric)
    return best


def _fmt(key: str, value: float | None) -> str:
    return "" if value is None else FORMATS[key].format(value)


# ---- plots ------------------------------------------------------------------------------------

def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def alpha_plots(complete: list[Job]) -> dict[str, bytes]:
    """LPIPS and PSNR (or, without them, the mean layer error) against alpha, one line per format."""
    import matplotlib.pyplot as plt

    with_alpha = [j for j in complete if j.alpha is not None]
    if len({j.alpha for j in with_alpha}) < 2:  # alpha was not swept: nothing to draw against it
        return {}
    metrics = [m for m in ("lpips", "psnr") if any(j.value(m) is not None for j in with_alpha)] or ["layer_error_mean"]
    several_algorithms = len({j.algorithm for j in with_alpha}) > 1
    plots = {}
    for metric in metrics:
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for j in with_alpha:
            if j.value(metric) is not None:
                label = f"{j.algorithm} {j.format}" if several_algorithms else j.format
                lines[label].append((j.alpha, j.value(metric)))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in sorted(lines.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("alpha (SmoothQuant migration strength)")
        ax.set_ylabel(HEADERS[metric])
        ax.set_title(f"{HEADERS[metric]} against alpha")
        ax.grid(alpha=0.3)
        ax.legend(title="algorithm format" if several_algorithms else "format")
        plots[f"{metric}_vs_alpha"] = _figure_png(fig)
    return plots


def grid_plot(complete: list[Job]) -> dict[str, bytes]:
    """Algorithm x format heatmap of the best (lowest) ranking metric per cell."""
    import matplotlib.pyplot as plt
    import numpy as np

    algorithms = sorted({j.algorithm for j in complete})
    formats = sorted({j.format for j in complete})
    if len(algorithms) * len(formats) < 2:
        return {}
    metric = ranking_metric(complete)
    grid = np.full((len(algorithms), len(formats)), np.nan)
    for j in complete:
        v = j.value(metric)
        if v is not None:
            r, c = algorithms.index(j.algorithm), formats.index(j.format)
            grid[r, c] = v if math.isnan(grid[r, c]) else min(grid[r, c], v)
    fig, ax = plt.subplots(figsize=(1.6 * len(formats) + 2.5, 0.6 * len(algorithms) + 2))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(formats)), formats)
    ax.set_yticks(range(len(algorithms)), algorithms)
    ax.set_xlabel("format")
    ax.set_ylabel("algorithm")
    ax.set_title(f"best {HEADERS[metric]} per algorithm and format")
    for r in range(len(algorithms)):
        for c in range(len(formats)):
            text = "-" if math.isnan(grid[r, c]) else _fmt(metric, float(grid[r, c]))
            ax.text(c, r, text, ha="center", va="center", color="white" if not math.isnan(grid[r, c]) else "gray", fontsize=8)
    fig.colorbar(image, ax=ax, label=HEADERS[metric])
    return {"algorithm_format_grid": _figure_png(fig)}


def make_plots(complete: list[Job]) -> tuple[dict[str, bytes], str | None]:
    """PNG bytes by name, or a note saying why there are none."""
    if not complete:
        return {}, "no complete jobs to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
    except ImportError:
        return {}, "plots need matplotlib (pip install -e '.[sweep]')"
    models = sorted({j.model for j in complete})
    if len(models) == 1:
        return {**alpha_plots(complete), **grid_plot(complete)}, None
    plots = {}  # one set per model: runs of different models are never drawn against each other
    for model in models:
        of_model = [j for j in complete if j.model == model]
        plots.update({f"{name}_{model}": png for name, png in {**alpha_plots(of_model), **grid_plot(of_model)}.items()})
    return plots, None


# ---- HTML ---------------------------------------------------------------------------------------

SCRIPT = """
function cellKey(td) {
  const v = td.dataset.v;
  if (v === undefined) { const t = td.textContent.trim(); return t === '' ? null : t; }
  if (v === '') return null;
  const n = Number(v);
  return isNaN(n) ? v : n;
}
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0];
  const idx = Array.prototype.indexOf.call(th.parentNode.children, th);
  const asc = th.dataset.dir !== 'asc';
  for (const h of th.parentNode.children) { h.dataset.dir = ''; h.classList.remove('asc', 'desc'); }
  th.dataset.dir = asc ? 'asc' : 'desc';
  th.classList.add(asc ? 'asc' : 'desc');
  const rows = Array.from(body.rows);
  rows.sort(function (a, b) {
    const x = cellKey(a.cells[idx]), y = cellKey(b.cells[idx]);
    if (x === null && y === null) return 0;
    if (x === null) return 1;   // empty cells last either way
    if (y === null) return -1;
    const c = (typeof x === 'number' && typeof y === 'number') ? x - y
      : String(x).localeCompare(String(y), undefined, {numeric: true});
    return asc ? c : -c;
  });
  for (const r of rows) body.appendChild(r);
}
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1.5em; }
.scroll { overflow-x: auto; max-width: 100%; }  /* wide tables scroll inside the page at laptop width */
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
td.text, th.text { text-align: left; }
td.wrap, code { overflow-wrap: anywhere; min-width: 10em; }  /* a long override (a pattern list) wraps, not the page */
th.sortable { cursor: pointer; background: #f0f0f0; user-select: none; }
th.asc::after { content: ' \\25B2'; } th.desc::after { content: ' \\25BC'; }
tr.best td { background: #d9f2d9; font-weight: 600; }
tr.failed td { background: #fbe3e3; }
td.worse { background: #fbe3e3; } td.better { background: #d9f2d9; }
code { background: #f4f4f4; padding: 0 3px; }
img { max-width: 48%; margin: 0 1% 1em 0; border: 1px solid #ddd; }
.strips { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; font-size: 12px; } figure img { max-width: 100%; margin: 0; image-rendering: pixelated; }
.note { color: #555; }
"""


def _cell(text: Any, value: Any = None, cls: str = "") -> str:
    attrs = f' class="{cls}"' if cls else ""
    if value is not None:
        attrs += f' data-v="{html.escape(str(value))}"'
    return f"<td{attrs}>{html.escape('' if text is None else str(text))}</td>"


def _as_number(text: str | None) -> float | None:
    """Overrides are text; numeric ones (alpha) sort as numbers."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _sortable_head(headers: list[tuple[str, str]]) -> str:
    cells = "".join(f'<th class="sortable {cls}" onclick="sortBy(this)" title="click to sort">{html.escape(h)}</th>'
                    for h, cls in headers)
    return f"<thead><tr>{cells}</tr></thead>"


STRIP_WIDTH = 360  # px: a strip is shrunk to this width in the report (the full-size PNG stays in the job's folder)


def _strip_png(job: Job) -> bytes | None:
    """The job's first frame strip (videos/000_strip.png), shrunk for the report; None without one."""
    videos = (job.metrics or {}).get("videos") or []
    name = videos[0].get("strip") if videos and isinstance(videos[0], dict) else None
    if not name or not (job.dir / name).is_file():
        return None
    from PIL import Image

    try:
        with Image.open(job.dir / name) as image:
            image = image.convert("RGB")
            if image.width > STRIP_WIDTH:
                image = image.resize((STRIP_WIDTH, round(image.height * STRIP_WIDTH / image.width)), Image.BILINEAR)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
    except OSError:  # an unreadable strip is left out; the table still shows the job
        return None
    return buf.getvalue()


def varying_overrides(jobs: list[Job]) -> list[str]:
    """Override keys whose value (or presence) differs between jobs, sorted."""
    return sorted(k for k in {k for j in jobs for k in j.overrides} if len({j.overrides.get(k) for j in jobs}) > 1)


def attention_split(complete: list[Job]) -> list[dict]:
    """Per job that quantizes both linears and attention: the jobs of the same sweep that quantize only the linears
    (same model, format, algorithm; attention none) and only the attention (same model and attention; format
    none), so the loss of each part and of both read side by side. Rows only where all three ran."""
    rows = []
    for both in complete:
        if both.attention == "none" or both.format == "none":
            continue
        linear = next((j for j in complete if (j.model, j.format, j.algorithm, j.attention)
                       == (both.model, both.format, both.algorithm, "none")), None)
        attn = next((j for j in complete if (j.model, j.format, j.attention) == (both.model, "none", both.attention)), None)
        if linear is not None and attn is not None:
            rows.append({"model": both.model, "format": both.format, "algorithm": both.algorithm,
                         "attention": both.attention, "linear": linear, "attention_only": attn, "both": both})
    return rows


SPLIT_PARTS = (("linear", "linears only"), ("attention_only", "attention only"), ("both", "both"))


def render_split(rows: list[dict], several_models: bool) -> str:
    head = ([("model", "text")] if several_models else []) + [("format", "text"), ("algorithm", "text"),
                                                              ("attention", "text")]
    head += [(f"{HEADERS[m]} {label}", "") for m in ("lpips", "psnr") for _, label in SPLIT_PARTS]
    head += [("LPIPS floor", "")]
    out = ["<h2>Linear vs attention quantization</h2><p class='note'>Each row: the jobs of one format and attention "
           "mode that quantize the linears only (attention none), the attention only (format none) and both.</p>",
           "<div class='scroll'><table id='split'>" + _sortable_head(head) + "<tbody>"]
    for r in rows:
        cells = ([_cell(r["model"], cls="text")] if several_models else [])
        cells += [_cell(r["format"], cls="text"), _cell(r["algorithm"], cls="text"), _cell(r["attention"], cls="text")]
        cells += [_cell(_fmt(m, r[part].value(m)), r[part].value(m)) for m in ("lpips", "psnr") for part, _ in SPLIT_PARTS]
        floor = r["both"].value("noise_floor_lpips")
        cells.append(_cell(_fmt("lpips", floor), floor if floor is not None else ""))
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


PAIRED_HEAD = ["dPSNR vs RTN [95%]", "dLPIPS vs RTN [95%]", "worst dPSNR", "prompts", "videos", "verdict"]
PAIRED_NOTE = ("Each job against the RTN job with the same overrides but the algorithm's, on the same videos: the mean "
               "of the per-video differences (job minus RTN; PSNR higher is better, LPIPS lower) with its 95% interval "
               "over prompts (Student's t over each prompt's mean difference: a prompt's seeds share its error, so they "
               "count once), the worst video's PSNR difference and a verdict: worse or better where an interval "
               "excludes 0, within noise where both contain it.")


def _paired_cells(r: dict) -> list[str]:
    return [format_interval(r["d_psnr"]["mean"], r["d_psnr"]["interval"], 2),
            format_interval(r["d_lpips"]["mean"], r["d_lpips"]["interval"], 4), f"{r['worst_d_psnr']:+.2f}",
            str(r["prompts"]), str(r["videos"]), r["verdict"]]


def render_paired(rows: list[dict], varying: list[str], several_models: bool) -> str:
    head = (([("model", "text")] if several_models else []) + [("job", "text"), ("format", "text"),
                                                               ("algorithm", "text")]
            + [(k, "text") for k in varying] + [(h, "text" if h == "verdict" else "") for h in PAIRED_HEAD])
    out = [f"<h2>Against RTN, paired per video</h2><p class='note'>{html.escape(PAIRED_NOTE)}</p>",
           "<div class='scroll'><table id='paired'>" + _sortable_head(head) + "<tbody>"]
    for r in rows:
        job = r["job"]
        cells = ([_cell(job.model, cls="text")] if several_models else [])
        cells += [_cell(job.name, cls="text"), _cell(job.format, cls="text"), _cell(job.algorithm, cls="text")]
        cells += [_cell(job.overrides.get(k, ""), _as_number(job.overrides.get(k)), cls="text wrap") for k in varying]
        text = _paired_cells(r)
        cells += [_cell(text[0], r["d_psnr"]["mean"]), _cell(text[1], r["d_lpips"]["mean"])]
        cells += [_cell(t, float(t)) for t in text[2:5]] + [_cell(text[5], cls=f"text {r['verdict'].replace(' ', '_')}")]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def render(jobs: list[Job], plots: dict[str, bytes], plot_files: dict[str, str], note: str | None, title: str,
           out_dir: Path) -> str:
    """The report's HTML; ``out_dir``: where it is written (each job's name links to its folder from there)."""
    complete = [j for j in jobs if j.failure is None]
    failed = [j for j in jobs if j.failure is not None]
    best = best_per_format(complete)
    best_dirs = {b.dir for b, _ in best.values()}
    varying = varying_overrides(jobs)
    common = {k: jobs[0].overrides.get(k) for k in sorted({k for j in jobs for k in j.overrides}) if k not in varying}
    varying = [k for k in varying if k not in ("model", "format", "algorithm")]  # they have their own columns
    several_models = len({j.model for j in jobs}) > 1
    columns = [c for c in COLUMNS if any(j.value(c[0]) is not None for j in complete)]

    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vqx compare</title><style>{STYLE}</style>"
           f"<script>{SCRIPT}</script></head><body>",
           f"<h1>vqx compare</h1><p class='note'>{html.escape(title)}<br>{len(jobs)} jobs: {len(complete)} complete, "
           f"{len(failed)} failed or partial; written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    if common:
        out.append("<p>Overrides shared by every job: " + " ".join(
            f"<code>{html.escape(f'{k}={v}' if v is not None else k)}</code>" for k, v in common.items()) + "</p>")

    out.append("<h2>Best configuration per " + ("model and format" if several_models else "format") + "</h2>")
    if best:
        out.append("<div class='scroll'><table id='best'><thead><tr><th class='text'>format</th><th class='text'>job</th>"
                   "<th class='text'>ranked by</th><th>value</th><th class='text'>overrides</th></tr></thead><tbody>")
        for fmt, (job, metric) in best.items():
            why = "lowest LPIPS" if metric == "lpips" else "lowest mean layer error (no LPIPS in these jobs)"
            out.append("<tr>" + _cell(fmt, cls="text") + _cell(job.name, cls="text") + _cell(why, cls="text")
                       + _cell(_fmt(metric, job.value(metric)), job.value(metric))
                       + _cell(" ".join(f"{k}={v}" for k, v in job.overrides.items()), cls="text wrap") + "</tr>")
        out.append("</tbody></table></div>")
    else:
        out.append("<p class='note'>No complete job has LPIPS or a layer error to rank by.</p>")

    out.append("<h2>All jobs</h2><p class='note'>Click a header to sort; a job's name opens its folder. Highlighted: "
               "the best job of its format. "
               + " ".join(f"<b>{html.escape(h)}</b>: {html.escape(d)}." for _, h, _, d in columns) + "</p>")
    head = [("job", "text"), ("status", "text")] + ([("model", "text")] if several_models else [])
    head += [("format", "text"), ("algorithm", "text")]
    head += [(k, "text") for k in varying] + [(h, "") for _, h, _, _ in columns]
    out.append("<div class='scroll'><table id='jobs'>" + _sortable_head(head) + "<tbody>")
    for job in jobs:
        cls = "best" if job.dir in best_dirs else ("failed" if job.failure else "")
        link = html.escape(os.path.relpath(job.dir, out_dir).replace(os.sep, "/") + "/", quote=True)
        row = [f"<td class='text'><a href='{link}'>{html.escape(job.name)}</a></td>",
               _cell("complete" if job.failure is None else "failed", cls="text")]
        row += [_cell(job.model, cls="text")] if several_models else []
        row += [_cell(job.format, cls="text"), _cell(job.algorithm, cls="text")]
        row += [_cell(job.overrides.get(k, ""), _as_number(job.overrides.get(k)), cls="text wrap") for k in varying]
        row += [_cell(_fmt(key, job.value(key)), job.value(key) if job.value(key) is not None else "") for key, *_ in columns]
        out.append(f"<tr class='{cls}'>" + "".join(row) + "</tr>")
    out.append("</tbody></table></div>")

    split = attention_split(complete)
    if split:
        out.append(render_split(split, several_models))
    paired = paired_vs_rtn(complete)
    if paired:
        out.append(render_paired(paired, [k for k in varying if not k.lstrip("+~").startswith("algorithm")],
                                 several_models))

    if failed:
        out.append("<h2>Failed or partial jobs</h2><div class='scroll'><table id='failed'><thead><tr><th class='text'>job</th>"
                   "<th class='text'>reason</th><th class='text'>overrides</th></tr></thead><tbody>")
        for job in failed:
            out.append("<tr class='failed'>" + _cell(job.name, cls="text") + _cell(job.failure, cls="text")
                       + _cell(" ".join(f"{k}={v}" for k, v in job.overrides.items()), cls="text wrap") + "</tr>")
        out.append("</tbody></table></div>")

    strips = [(job, _strip_png(job)) for job in complete]
    strips = [(job, png) for job, png in strips if png is not None]
    if strips:
        out.append("<h2>Frames</h2><p class='note'>Each job's first video: reference | quantized | difference "
                   "(amplified, eval.diff_gain), first, middle and last frame.</p><div class='strips'>")
        for job, png in strips:
            b64 = base64.b64encode(png).decode()
            out.append(f"<figure><img alt='{html.escape(job.name)}' src='data:image/png;base64,{b64}'>"
                       f"<figcaption>{html.escape(job.name)}: {html.escape(job.format)} {html.escape(job.algorithm)}"
                       "</figcaption></figure>")
        out.append("</div>")

    out.append("<h2>Plots</h2>")
    if note:
        out.append(f"<p class='note'>{html.escape(note)}</p>")
    elif not plots:
        out.append("<p class='note'>No plot applies: alpha plots need jobs with algorithm.alpha; the grid needs "
                   "more than one algorithm or format.</p>")
    for name, png in plots.items():
        b64 = base64.b64encode(png).decode()
        out.append(f"<img alt='{html.escape(name)}' title='{html.escape(plot_files[name])}' "
                   f"src='data:image/png;base64,{b64}'>")
    out.append("</body></html>\n")
    return "\n".join(out)


def render_markdown(jobs: list[Job]) -> str:
    """The complete jobs as a Markdown table (for a README or an issue): video metrics with the noise floor,
    the mean layer error, and the overrides that vary; failed jobs are named below it."""
    complete = [j for j in jobs if j.failure is None]
    varying = [k for k in varying_overrides(jobs) if k not in ("algorithm", "format")]
    metrics = [c for c in ("lpips", "psnr", "ssim") if any(j.value(c) is not None for j in complete)]
    floor = [c for c in metrics if any(j.value(f"noise_floor_{c}") is not None for j in complete)]
    head = (["format", "algorithm", *varying] + [HEADERS[c] for c in metrics]
            + [f"{HEADERS[c]} noise floor" for c in floor] + ["layer err mean"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in sorted(complete, key=lambda j: (j.format, j.algorithm, [j.overrides.get(k, "") for k in varying])):
        row = [j.format, j.algorithm, *(j.overrides.get(k, "") for k in varying)]
        row += [_fmt(c, j.value(c)) for c in metrics] + [_fmt(c, j.value(f"noise_floor_{c}")) for c in floor]
        row.append(_fmt("layer_error_mean", j.value("layer_error_mean")))
        lines.append("| " + " | ".join(row) + " |")
    split = attention_split(complete)
    if split:
        lines += ["", "| format | algorithm | attention | LPIPS linears / attention / both | PSNR linears / attention / both |",
                  "|---|---|---|---|---|"]
        for r in split:
            cells = [" / ".join(_fmt(m, r[part].value(m)) for part, _ in SPLIT_PARTS) for m in ("lpips", "psnr")]
            lines.append(f"| {r['format']} | {r['algorithm']} | {r['attention']} | {cells[0]} | {cells[1]} |")
    paired = paired_vs_rtn(complete)
    if paired:
        keys = [k for k in varying if not k.lstrip("+~").startswith("algorithm")]
        head = ["format", "algorithm", *keys, *PAIRED_HEAD]
        lines += ["", "Against RTN on the same videos (job minus RTN; 95% intervals over prompts):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in paired:
            j = r["job"]
            lines.append("| " + " | ".join([j.format, j.algorithm, *(j.overrides.get(k, "") for k in keys),
                                            *_paired_cells(r)]) + " |")
    failed = [j for j in jobs if j.failure is not None]
    if failed:
        lines += ["", "Failed or partial: " + "; ".join(f"{j.name} ({j.failure})" for j in failed)]
    return "\n".join(lines) + "\n"


def write_report(jobs: list[Job], out: Path, title: str) -> list[Path]:
    """Write the PNGs and the Markdown table (``out`` with .md) next to ``out``, then ``out`` itself, each
    atomically; returns the paths written besides ``out``."""
    complete = [j for j in jobs if j.failure is None]
    plots, note = make_plots(complete)
    written, files = [], {}
    for name, png in plots.items():
        path = out.parent / f"{out.stem}_{name}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(png)
        written.append(path)
        files[name] = path.name
    table = out.with_suffix(".md")
    write_text_atomic(table, render_markdown(jobs))
    written.append(table)
    write_text_atomic(out, render(jobs, plots, files, note, title, out.parent))
    return written
