"""``logger=wandb``: one Weights & Biases run per job, grouped by the multirun it belongs to.

Without credentials (no WANDB_API_KEY, no ~/.netrc entry) ``mode=auto`` runs offline, so nothing ever
prompts; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads later. Every W&B file lives under the
job's run dir. wandb is imported only when a run starts: ``logger=none`` never loads it.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import OmegaConf

from ..errors import UserError, one_line
from ..stages import LOGGERS, Logger

log = logging.getLogger("vqx")
SCALAR_METRICS = ("lpips", "psnr", "ssim", "lpips_std", "psnr_std", "ssim_std")


def has_credentials() -> bool:
    """An API key in the environment or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    if mode == "online" and not has_credentials():
        raise UserError("logger.mode=online needs W&B credentials (set WANDB_API_KEY or run `wandb login`); "
                        "or use logger.mode=offline and `wandb sync` the run folders later")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("offline", "dryrun", "disabled"):
        return "disabled" if env == "disabled" else "offline"
    return "online" if has_credentials() else "offline"


def _job() -> dict:
    """Where this job sits in its sweep (empty outside Hydra, e.g. in a bench calling experiment.run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return {"multirun": multirun, "num": hc.job.num if multirun else None,
            "sweep_dir": str(hc.sweep.dir) if multirun else None,
            "override_dirname": hc.job.override_dirname, "overrides": list(hc.overrides.task)}


def default_group(sweep_dir: str | None) -> str | None:
    """The sweep dir, relative to the working folder when inside it (multirun/<date>/<time>), else its name."""
    if not sweep_dir:
        return None
    path = Path(sweep_dir).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summary_metrics(metrics: dict) -> dict:
    """The scalar results a sweep is compared on (W&B summary keys)."""
    out: dict[str, Any] = {}
    for key in SCALAR_METRICS:
        if _number(metrics.get(key)):
            out[key] = metrics[key]
    for group in ("layer_error", "noise_floor"):  # noise_floor: eval's 16-bit run-to-run scores
        for key, value in (metrics.get(group) or {}).items() if isinstance(metrics.get(group), dict) else ():
            if _number(value):
                out[f"{group}/{key}"] = value
    for key in ("status", "format", "algorithm", "model", "quantized_layers"):
        if key in metrics:
            out[key] = metrics[key]
    for key, value in (metrics.get("timings") or {}).items():
        if _number(value):
            out[f"timings/{key}"] = value
    return out


def _flatten(entry: dict, prefix: str = "") -> dict:
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif not isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = value
    return out


class WandbLogger(Logger):
    def __init__(self, cfg, run_dir: Path):
        super().__init__(cfg, run_dir)
        self.mode = resolve_mode(cfg.logger.mode)  # before any work: a bad mode fails the job at once
        self.run = None
        self._own_data_dir = False

    def start(self) -> None:
        if self.mode == "disabled":
            return
        import wandb

        job = _job()
        lc = self.cfg.logger
        config = OmegaConf.to_container(self.cfg, resolve=True)
        config["job"] = {**job, "run_dir": str(self.run_dir)}
        name = job.get("override_dirname") or (f"job{job['num']}" if job.get("num") is not None else self.run_dir.name)
        name = name if len(name) <= 128 else name[:125] + "..."  # W&B's display-name limit
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # tables are staged as artifacts under W&B's data dir until synced: keep them with the run too
        self._own_data_dir = "WANDB_DATA_DIR" not in os.environ
        if self._own_data_dir:
            os.environ["WANDB_DATA_DIR"] = str(self.run_dir / "wandb" / "data")
        # our resolved mode wins over WANDB_MODE, which wandb would also validate (an empty one fails)
        saved_mode = os.environ.pop("WANDB_MODE", None)
        try:
            self.run = wandb.init(
                project=lc.project, entity=lc.entity, group=lc.group or default_group(job.get("sweep_dir")),
                name=name, tags=list(lc.tags), config=config, dir=str(self.run_dir), mode=self.mode,
                job_type="quantize", reinit="finish_previous",
                # silent and no console capture: Hydra owns stdout/run.log, and nothing may prompt
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # noqa: BLE001  (tracking must not cost the job its results)
            log.warning("W&B run not started (the job goes on, metrics.json still written): %s", one_line(str(e)))
            self.run = None
            if self._own_data_dir:
                os.environ.pop("WANDB_DATA_DIR", None)
        finally:
            if saved_mode is not None:
                os.environ["WANDB_MODE"] = saved_mode

    def finish(self, metrics: dict | None, error: str | None) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            if metrics is not None:
                self._log_results(run, metrics)
            if error is not None:
                run.summary["status"] = "failed"
                run.summary["error"] = one_line(error)[:1000]
            self._save_files(run, metrics)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B logging failed: %s", one_line(str(e)))
        finally:
            try:
                run.finish(exit_code=0 if error is None else 1)
                log.info("%s", self.where(run))
            except Exception as e:  # noqa: BLE001  (the job's own results come first)
                log.warning("W&B run did not finish cleanly: %s", one_line(str(e)))
            if self._own_data_dir:
                os.environ.pop("WANDB_DATA_DIR", None)

    def where(self, run) -> str:
        """One line: the online run's page, or the offline run's folder and the command that uploads it."""
        if self.mode == "offline":
            folder = Path(run.dir).parent  # <run dir>/wandb/offline-run-*/files -> the run folder
            return f"W&B: offline run {folder}; upload it with `wandb sync {folder}`"
        return f"W&B: {getattr(run, 'url', None) or run.id}"

    def _log_results(self, run, metrics: dict) -> None:
        import wandb

        summary = summary_metrics(metrics)
        run.summary.update(summary)
        tables: dict[str, Any] = {}
        layers = [e for e in metrics.get("layers") or [] if _number(e.get("output_error"))]
        if layers:
            tables["layers"] = wandb.Table(columns=["name", "output_error"],
                                           data=[[e["name"], e["output_error"]] for e in layers])
        videos = self._video_table(metrics.get("videos"))
        if videos is not None:
            tables["videos"] = videos
        if self.cfg.logger.log_videos:
            for path in sorted((self.run_dir / "videos").glob("*side_by_side*.mp4")):
                tables[f"video/{path.stem}"] = wandb.Video(str(path), format="mp4")
        # one history step with the scalars too, so W&B's charts and parallel coordinates can use them
        run.log({**{k: v for k, v in summary.items() if _number(v)}, **tables})

    def _video_table(self, entries: Any):
        """metrics["videos"]: one row per generated video. Nested dicts (files, noise_floor) become
        ``key/sub`` columns, lists (per-frame curves) are left out, an existing .mp4 path becomes a player."""
        import wandb

        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            return None
        rows = [_flatten(entry) for entry in entries]
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        data = []
        for row in rows:
            cells = []
            for key in columns:
                value = row.get(key)
                video = self._video_file(value) if "side_by_side" in key else None
                cells.append(wandb.Video(str(video), format="mp4") if video is not None and self.cfg.logger.log_videos
                             else value)
            data.append(cells)
        return wandb.Table(columns=columns, data=data)

    def _video_file(self, value: Any) -> Path | None:
        if not isinstance(value, str) or not value.endswith(".mp4"):
            return None
        path = Path(value)
        path = path if path.is_absolute() else self.run_dir / path
        return path if path.is_file() else None

    def _save_files(self, run, metrics: dict | None) -> None:
        # copies in the W&B run's files folder (uploaded at finish); names differ from W&B's own config.yaml.
        # metrics.json is written after the logger finishes, so its content comes from memory.
        files = Path(run.dir)
        if metrics is not None:
            (files / "vqx-metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        for name, target in (("config.yaml", "vqx-config.yaml"), ("run.log", "run.log")):
            if (self.run_dir / name).is_file():
                shutil.copyfile(self.run_dir / name, files / target)


LOGGERS.register("wandb")(WandbLogger)
