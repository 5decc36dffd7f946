"""Checks Hydra cannot do (ranges, choices, unknown keys added with '+', cross-group rules), and the
one-line rewording of Hydra's own composition errors. Runs before any model is built."""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import UserError
from .schema import GROUPS, RENAMED_OPTIONS, _registered

log = logging.getLogger("vqx")
TOP_LEVEL_KEYS = (*GROUPS, "seed", "cache_dir", "resume", "objective")


def _fields(schema: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema)}


def _check_value(key: str, value: Any, meta: dict, family: str | None = None) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise UserError(f"{key}={value!r} is not valid; valid choices: {', '.join(map(str, meta['choices']))}")
    if meta.get("or_auto"):
        if value == "auto":
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            lo, hi = meta.get("range", (None, None))
            raise UserError(f"{key}={value!r} is not valid; use a number in [{lo}, {hi}] or 'auto'")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi = meta.get("range", (None, None))
    low_bad = lo is not None and (value <= lo if meta.get("exclusive_low") else value < lo)
    if low_bad or (hi is not None and value > hi):
        op = ">" if meta.get("exclusive_low") else ">="
        bounds = " and ".join(s for s in (f"{op} {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "") if s)
        raise UserError(f"{key}={value} is out of range; it must be {bounds}")
    if meta.get("multiple_of") and value % meta["multiple_of"]:
        m = meta["multiple_of"]
        raise UserError(f"{key}={value} must be a multiple of {m} (e.g. {max(m, value // m * m)})")
    if meta.get("frames") and family is not None:  # the model family's shape rule (Wan: 4k+1)
        from ..models.adapter import adapter_named

        problem = adapter_named(family).check_frames(value)
        if problem:
            raise UserError(f"{key}={value} {problem}")


def check_node(node: DictConfig, schema: type, prefix: str, family: str | None = None) -> None:
    fields = _fields(schema)
    for key in node.keys():
        full = f"{prefix}.{key}"
        if key not in fields:
            raise UserError(f"unknown key '{full}'; valid keys of {prefix}: {', '.join(fields)}")
        value = node._get_node(key)
        nested = OmegaConf.get_type(node, key) if isinstance(value, DictConfig) else None
        if nested is not None and dataclasses.is_dataclass(nested):
            check_node(value, nested, full, family)
        elif not isinstance(value, (DictConfig, ListConfig)):
            _check_value(full, node[key], dict(fields[key].metadata), family)


def apply_renames(cfg: DictConfig) -> None:
    """Old names users typed keep working: an option renamed in `schema.RENAMED_OPTIONS` (``export=fake``) gets
    its new name, a key declared `schema.renamed` (``eval.backend``) moves its value to the new key, each with
    one deprecation line. Idempotent: the run config then holds the new names only (old keys null)."""
    for group in GROUPS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        new = RENAMED_OPTIONS.get((group, node.get("name")))
        if new is not None:
            log.warning("%s=%s is deprecated; use %s=%s (the same option)", group, node.name, group, new)
            node.name = new
        schema = OmegaConf.get_type(node)
        if not dataclasses.is_dataclass(schema):
            continue
        for f in dataclasses.fields(schema):
            target = f.metadata.get("renamed_to")
            if target is not None and node.get(f.name) is not None:
                log.warning("%s.%s is deprecated; use %s.%s=%s (the same setting)", group, f.name, group, target,
                            node[f.name])
                node[target], node[f.name] = node[f.name], None


def check_settings(cfg: DictConfig, family: str | None = None) -> None:
    """Raise UserError (one line) on the first problem of a composed run config that the settings alone show (old
    names renamed first): keys, ranges, choices, the recipe's parameters. Imports no torch (`vqx.schemas`), so
    the app runs it before the stages are imported; `validate` runs it again with the model family's rules."""
    apply_renames(cfg)
    for key in cfg.keys():
        if key not in TOP_LEVEL_KEYS:
            raise UserError(f"unknown key '{key}'; valid top-level keys: {', '.join(TOP_LEVEL_KEYS)}")
    for group in GROUPS:
        if group not in cfg:
            raise UserError(f"config group '{group}' is missing; pick one with {group}=<option>")
        schema = OmegaConf.get_type(cfg, group)
        if not dataclasses.is_dataclass(schema):
            raise UserError(f"{group} option does not declare a schema (add '/schema/{group}/<kind>@_here_' to its defaults)")
        check_node(cfg[group], schema, group, family)
    from ..algorithms.params import DECLARED, resolve_params

    try:  # steps registered only by their modules (not yet imported) are checked by `validate`
        resolve_params(cfg.algorithm, DECLARED, check_value=_check_value, skip_unknown=True)
    except ValueError as e:
        raise UserError(str(e)) from None
    window = list(cfg.calib.capture_window)
    if (len(window) != 2 or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in window)
            or not 0 <= window[0] <= window[1] <= 1):
        raise UserError(f"calib.capture_window={window} is not valid; use [start, end] fractions of the trajectory "
                        "with 0 <= start <= end <= 1, e.g. [0, 0.3]")
    if cfg.calib.block_objective == "guided" and cfg.calib.guidance <= 1:
        raise UserError(f"calib.block_objective=guided combines the two guidance branches, but calib.guidance="
                        f"{cfg.calib.guidance} runs only the cond branch (the sampler guides above 1); use "
                        "calib.block_objective=branches")
    if cfg.model.source == "diffusers" and not cfg.model.path:
        raise UserError(f"model={cfg.model.name} needs model.path=/path/to/a local diffusers folder (e.g. Wan2.1-T2V-1.3B-Diffusers)")


def validate(cfg: DictConfig) -> None:
    """Raise UserError (one line) on the first problem in a composed run config: `check_settings` with the model
    family's rules (e.g. Wan's 4k+1 frames), then the rules across groups that need the format, the steps and the
    model adapter."""
    check_settings(cfg, _model_family(cfg))
    _check_rules(cfg)


def _model_family(cfg: DictConfig) -> str | None:
    """``model.family``, checked against the registered model adapters (None before the model group is there)."""
    family = cfg.get("model", {}).get("family") if isinstance(cfg.get("model"), DictConfig) else None
    if family is None:
        return None
    from ..models.adapter import adapter_names

    if family not in adapter_names():
        raise UserError(f"model.family={family!r} has no model adapter; valid: {', '.join(adapter_names())}")
    return family


def _check_rules(cfg: DictConfig) -> None:
    from ..algorithms.registry import plan_steps
    from ..quant.formats import format_from_config

    try:
        fmt = format_from_config(cfg.format)
    except ValueError as e:
        raise UserError(f"format={cfg.format.name}: {e}") from None
    _check_format_name(fmt)
    try:
        plan = plan_steps(cfg.algorithm, check_value=_check_value)
    except ValueError as e:
        raise UserError(str(e)) from None
    _check_smoothing_groups(cfg, plan)
    if any(s.weight is not None and s.weight.granularity in ("group", "block") for s in fmt.schemes()):
        from ..algorithms.params import act_order_refusal

        for p in plan:
            why = act_order_refusal(getattr(p.params, "act_order", False), getattr(p.params, "static_groups", True))
            if why:
                raise UserError(f"format={fmt.name}: {why}")
    if cfg.model.outliers.channels:
        from ..models.adapter import adapter_named

        o = cfg.model.outliers
        changed = adapter_named(cfg.model.family).check_outliers(float(o.scale), list(o.sites))
        if changed and cfg.export.name != "none":
            raise UserError(f"model.outliers.sites={list(o.sites)} cannot be exported with export={cfg.export.name}: "
                            f"{changed}; use export=none")
    if cfg.model.source == "mini":  # before the prompt files inside it are read, so the message says how to train it
        from ..models.adapter import adapter_named

        adapter_named(cfg.model.family).check_model_folder(cfg.model)


def _check_smoothing_groups(cfg: DictConfig, plan) -> None:
    """A step's ``groups`` (SmoothQuant, AWQ) names input groups the model can smooth, at least one."""
    from ..models.adapter import adapter_named

    for p in plan:
        names = getattr(p.params, "groups", None)
        if names is None:
            continue
        valid = list(adapter_named(cfg.model.family).smoothing_groups(cfg.model.task))
        bad = [n for n in names if n not in valid]
        if bad or not names:
            what = "names no group" if not names else f"has unknown group {bad[0]!r}"
            raise UserError(f"algorithm.groups={list(names)} {what}; valid for model={cfg.model.name}: {', '.join(valid)}")


def _check_format_name(fmt) -> None:
    """``format.name`` labels the rules; a one-rule format named after another preset is a typo for
    ``format=<option>`` (the name alone never chose the numbers)."""
    from ..quant.formats import NO_QUANT, SCHEMES

    schemes = fmt.schemes()
    if (len(fmt.rules) != 1 or fmt.rules[0].pattern != "*" or len(schemes) != 1 or schemes[0].name not in SCHEMES
            or fmt.name == schemes[0].name):
        return
    if fmt.name in SCHEMES:
        raise UserError(f"format.name={fmt.name!r} does not match its rules (scheme {schemes[0].name}); "
                        f"use format={fmt.name} to choose that format")
    raise UserError(f"format.name={fmt.name!r} is unknown; valid: {', '.join([NO_QUANT, *SCHEMES])} "
                    f"(the name labels a format's rules: choose one with format=<option>, or write format.rules)")


# ---- Hydra's composition errors, reworded as one line -------------------------------------------

_NOT_FOUND = re.compile(r"Could not find '([^/']+)/([^']+)'")
_OPTIONS = re.compile(r"Available options in '([^']+)':\s*\n((?:\t.*\n?)*)")


def _schema_keys(object_type: str) -> list[str] | None:
    for schema in _registered.values():
        if schema.__name__ == object_type:
            return list(_fields(schema))
    return None


def reword_hydra_error(text: str) -> str:
    """Turn Hydra's multi-line composition error into one line that names the bad value and the choices."""
    m = _NOT_FOUND.search(text)
    if m:
        group, option = m.groups()
        opts = _OPTIONS.search(text)
        valid = [o.strip() for o in opts.group(2).splitlines() if o.strip()] if opts else []
        return f"{group}={option} is not an option of '{group}'; valid: {', '.join(valid) or '(none)'}"
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith(("Config search path", "provider=", "Set the environment", "object_type=", "reference_type=", "To append")):
            if s.startswith("Config search path"):
                break
            continue
        lines.append(s)
    out = "; ".join(lines)
    typ = re.search(r"object_type=(\w+)", text)
    if typ and "not in" in out:
        keys = _schema_keys(typ.group(1))
        if keys:
            out += f"; valid keys: {', '.join(keys)}"
    return out
