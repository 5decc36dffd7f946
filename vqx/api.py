"""The Python API: the stages of ``python run.py`` as calls, for notebooks and scripts.

    import vqx

    exp = vqx.Experiment(model="wan_mini", format="w8a8", algorithm="smoothquant", run_dir="runs/nb")
    pipe = exp.load()                 # or any pipeline of the model's family you already hold
    q = exp.quantize(pipe)            # quantized in place; q.metrics: layers, groups, blocks (as metrics.json)
    q.pipe("a red square moves right", num_inference_steps=10, ...)   # generate with the quantized model
    exp.export(q)                     # export= of the experiment (lightx2v by default), verified; or export(q, dir)
    vqx.load("runs/nb/export", exp.load())   # an export=lightx2v folder back as the fake-quant pipeline
    scores = exp.evaluate(q)          # eval= of the experiment: LPIPS / PSNR / SSIM against the 16-bit model
    metrics = exp.run()               # or all of it, exactly as `python run.py` (writes config.yaml, metrics.json)

Options are the command line's: keyword arguments name config groups or keys (``format="nvfp4"``,
``calib={"num_prompts": 4}``, ``algorithm={"alpha": 0.5}``), positional strings are overrides as typed
(``"model.outliers.channels=8"``). Everything is checked when the experiment is made: a bad value raises
`vqx.errors.UserError` with the same one-line message the command line prints, before any model is built.
`python run.py` is this same sequence (`vqx.experiment`), under Hydra's command line.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import UserError
from .runtime import package_root



def _overrides(options: dict[str, Any]) -> list[str]:
    """Keyword options as Hydra overrides: a group's option by name, or a mapping of keys under a group."""
    out = []
    for key, value in options.items():
        if isinstance(value, dict):
            out += [f"{key}.{k}={_value(v)}" for k, v in value.items()]
        else:
            out.append(f"{key}={_value(value)}")
    return out


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def compose(*overrides: str, **options: Any) -> DictConfig:
    """The run's config, composed from ``conf/`` as ``python run.py OVERRIDES`` composes it (logger defaults to
    ``none`` here: a notebook logs nothing unless asked). Composition errors raise UserError (one line)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import vqx.plugins  # noqa: F401  (registers schemas, algorithms, exporters, evaluators, loggers)

    from .config.validate import reword_hydra_error

    args = _overrides(options) + list(overrides)
    if not any(a.split("=", 1)[0].lstrip("+~") == "logger" for a in args):
        args.insert(0, "logger=none")
    if GlobalHydra.instance().is_initialized():  # a caller's own Hydra context: ours is separate and temporary
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(package_root() / "conf"), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=args)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(reword_hydra_error(str(e))) from None


class Experiment:
    """One configured run: its settings checked up front, its stages callable one by one (see the module doc)."""

    def __init__(self, *overrides: str, run_dir: str | Path | None = None, **options: Any):
        from . import experiment

        self.cfg = compose(*overrides, **options)
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / time.strftime("api-%Y%m%d-%H%M%S")
        self._exporter, self._evaluator, self._logger = experiment.prepare(self.cfg, self.run_dir)

    def __repr__(self) -> str:
        from .config.schema import GROUPS

        picks = ", ".join(f"{g}={self.cfg[g].name}" for g in GROUPS)
        return f"Experiment({picks}, run_dir={str(self.run_dir)!r})"

    def load(self):
        """The model's pipeline (``model=``), on ``model.device`` in ``model.dtype``."""
        from .models.loading import load_pipeline

        return load_pipeline(self.cfg.model)

    def quantize(self, pipe=None):
        """Calibrate and quantize ``pipe`` (default: `load`) in place, as the run does; with ``eval=video`` the
        16-bit references are made first, from the same pipeline. Returns the state the later stages read:
        ``.pipe`` (the quantized pipeline), ``.metrics`` (the quantization's report), ``.quantized`` (name ->
        QuantLinear), ``.runtime_smoothing``."""
        from .experiment import Timings, quantize_pipeline

        pipe = self.load() if pipe is None else pipe
        return quantize_pipeline(self.cfg, self.run_dir, pipe, self._evaluator, Timings())

    def export(self, state, directory: str | Path | None = None, **options: Any) -> dict:
        """Write ``state`` as ``export=`` says (``options`` set its keys, e.g. ``layout="blocks"``) into
        ``directory`` (default ``export.dir``, else ``<run_dir>/export``); returns the export's summary."""
        from . import stages
        from .quant.attention_plan import suspended

        cfg = self.cfg.copy()
        export_cfg = OmegaConf.merge(cfg.export, {**options, **({"dir": str(directory)} if directory else {})})
        cfg.export = export_cfg
        exporter = stages.EXPORTERS.lookup(cfg.export.name)
        exporter.check(cfg)
        with suspended(state.attention):  # exports record 16-bit attention (the engine picks its own kernel)
            summary = exporter.export(_with_cfg(state, cfg))
        state.metrics["export"] = summary
        return summary

    def evaluate(self, state) -> dict:
        """Score ``state``'s quantized pipeline as ``eval=`` says (needs the references `quantize` made)."""
        scores = self._evaluator.evaluate(state)
        state.metrics.update(scores)
        return scores

    def run(self) -> dict:
        """The whole job, exactly as ``python run.py`` with these settings: writes ``config.yaml``, the export,
        videos and ``metrics.json`` into ``run_dir``; returns the metrics."""
        from . import experiment

        return experiment.run(self.cfg, self.run_dir, (self._exporter, self._evaluator, self._logger))


def _with_cfg(state, cfg: DictConfig):
    return dataclasses.replace(state, cfg=cfg)  # the same pipeline, layers and metrics dict


def load(export_dir: str | Path, pipe):
    """Load the vqx export ``export_dir`` into ``pipe`` (a pipeline of the model it was made from, e.g.
    ``Experiment(...).load()``), in place, and return ``pipe``:

    - ``export=lightx2v``: its tensors become the transformer's QuantLinears, which then compute what the run's
      quantized transformer computed, bit for bit;
    - ``export=torchao`` and ``export=dequantized``: ``pipe.transformer`` becomes the folder's transformer as
      diffusers' ``from_pretrained`` loads it (torchao's int8 arithmetic; the dequantized weights in 16 bits).

    A folder that fails `vqx verify-export`'s file checks, or does not fit the model, raises UserError (one line)."""
    from .export.diffusers_load import DIFFUSERS_KINDS, export_kind, load_diffusers_export
    from .export.lightx2v_load import load_lightx2v

    if export_kind(Path(export_dir)) in DIFFUSERS_KINDS:
        load_diffusers_export(Path(export_dir), pipe)
    else:
        load_lightx2v(export_dir, pipe)
    return pipe
