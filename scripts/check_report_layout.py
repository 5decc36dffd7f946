"""Is `vqx compare`'s report.html readable at laptop width? Renders it in headless Chromium at each width, saves a
screenshot per width beside the report (report_<width>.png, for a person to look at), and fails when the page itself
scrolls sideways (a table too wide for its scroll box, an image wider than the window) at any of them.

    python scripts/check_report_layout.py multirun/2026-12-04/10-00-00        # a sweep dir (compare runs first)
    python scripts/check_report_layout.py                                      # a 4-job wan_tiny sweep, made here
    python scripts/check_report_layout.py DIR --widths 1280,1400 --chromium /usr/bin/chromium

Needs Chromium (Debian: apt-get install chromium). Prints one line per width; exit 1 if any overflows.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Chromium's flags for a closed network (no background connections, no first-run work), as root, without a GPU
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
# Appended to a copy of the page: after load, what overflows, as JSON in a <pre> that --dump-dom prints.
PROBE = """<script>
window.addEventListener('load', () => {
  const page = document.scrollingElement;
  const result = {window: window.innerWidth, page: page.scrollWidth,
    boxes: [...document.querySelectorAll('.scroll')].map(e => [e.clientWidth, e.scrollWidth]),
    widest_image: Math.max(0, ...[...document.images].map(i => Math.ceil(i.getBoundingClientRect().right)))};
  const pre = document.createElement('pre'); pre.id = 'vqx-layout'; pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


def chromium(path: str | None) -> str:
    found = path or shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        raise SystemExit("check_report_layout: no Chromium found (apt-get install chromium, or --chromium PATH)")
    return found


def measure(report: Path, width: int, browser: str, height: int = 900) -> dict:
    """Render ``report`` at ``width`` px: a screenshot beside it, and the widths the probe measured."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
        base = [browser, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}"]
        shot = report.with_name(f"{report.stem}_{width}.png")
        subprocess.run([*base, f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120, check=True)
        dom = subprocess.run([*base, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], capture_output=True,
                             text=True, timeout=120, check=True).stdout
    m = re.search(r'<pre id="vqx-layout">(.*?)</pre>', dom)
    if not m:
        raise SystemExit(f"check_report_layout: the probe did not run in {report} (Chromium printed no layout)")
    layout = json.loads(m.group(1).replace("&quot;", '"'))
    layout.update(width=width, screenshot=str(shot),
                  overflow=layout["page"] > layout["window"] or layout["widest_image"] > layout["window"])
    return layout


def demo_sweep(work: Path) -> Path:
    """A real 4-job sweep on wan_tiny (formats x algorithms, one scored video each) to render."""
    sweep = work / "multirun"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "model=wan_tiny", "format=w8a8,fp8", "algorithm=rtn,smoothquant",
           "eval=video", "eval.num_samples=1", "export=none", "logger=none", f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, check=True, capture_output=True)
    return sweep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", type=Path, help="sweep dirs (default: a small wan_tiny sweep made here)")
    ap.add_argument("--widths", default="1280,1400", help="window widths in px")
    ap.add_argument("--chromium", default=None, help="the browser (default: chromium on PATH)")
    ap.add_argument("--out", type=Path, default=None, help="report file (default: DIR/report.html)")
    args = ap.parse_args()
    browser = chromium(args.chromium)
    with tempfile.TemporaryDirectory() as work:
        dirs = args.dirs or [demo_sweep(Path(work))]
        report = args.out or (dirs[0] / "report.html" if len(dirs) == 1 else None)
        cmd = [sys.executable, "-m", "vqx", "compare", *map(str, dirs), *(["--out", str(report)] if report else [])]
        printed = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        report = report or Path(re.search(r"(\S+report\.html)", printed).group(1))
        results = [measure(report, int(w), browser) for w in args.widths.split(",")]
        for r in results:
            boxes = ", ".join(f"{c}/{s}" for c, s in r["boxes"])
            print(f"{r['width']} px: page {r['page']} of {r['window']} px wide, widest image ends at "
                  f"{r['widest_image']} px, table boxes (visible/content) {boxes}: "
                  f"{'OVERFLOWS' if r['overflow'] else 'fits'}; {r['screenshot']}")
        if args.dirs == []:  # the demo's screenshots would vanish with its temp dir: keep them in the cwd
            for r in results:
                shutil.copy(r["screenshot"], Path.cwd() / Path(r["screenshot"]).name)
    return 1 if any(r["overflow"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
