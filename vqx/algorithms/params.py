"""Algorithm steps' parameters: what a recipe may set, declared without importing torch, so that a bad value is
refused (and ``--help`` answers) before the heavy imports. The steps themselves (`registry.register_step`) live
in their modules; a step registered there with parameters that nobody declared here is declared then.

A step's parameters are a dataclass (defaults, and ranges/choices as field metadata, as in `config.schema`). The
recipe schema ``/schema/algorithm/recipe`` offers every declared parameter as a flat, optional key.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import typing
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Optional

from omegaconf import OmegaConf

from ..config.schema import AlgorithmSchema, bounded, register_schema

# step name -> its parameters' dataclass (None: it takes none)
DECLARED: dict[str, type | None] = {}


def declare_step(name: str, params: type | None) -> None:
    """Make ``name``'s parameters known to validation and the recipe schema (again with the same class: nothing)."""
    if name in DECLARED and DECLARED[name] is not params:
        raise ValueError(f"algorithm step {name!r} declared twice with different parameters")
    DECLARED[name] = params
    _register_recipe_schema()


def param_fields(params: type | None) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(params)} if params else {}


def _register_recipe_schema() -> None:
    """``/schema/algorithm/recipe``: name, steps, and every declared step parameter as a flat, optional
    recipe-level key (typed as its step declares it), so recipes need no hand-written schema."""
    flat: dict[str, Any] = {}
    for params in DECLARED.values():
        types = typing.get_type_hints(params) if params else {}
        for name in param_fields(params):
            typ = types[name]
            flat.setdefault(name, (name, Any if typ is Any else Optional[typ], field(default=None)))
    schema = dataclasses.make_dataclass("RecipeSchema", list(flat.values()), bases=(AlgorithmSchema,))
    register_schema("algorithm", "recipe", schema)


def _entry(entry: Any, k: int) -> tuple[str, dict]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        rest = {key: v for key, v in entry.items() if key != "name"}
        return entry["name"], rest
    raise ValueError(f"algorithm.steps[{k}]={entry!r} must be a step name or {{name: <step>, <param>: <value>}}")


def resolve_params(algo: Any, known: dict[str, type | None],
                   check_value: Callable[[str, Any, dict], None] | None = None,
                   skip_unknown: bool = False) -> list[tuple[str, SimpleNamespace]]:
    """The recipe's steps, in order, with their parameters: defaults, overridden by the recipe's flat keys
    (``algorithm.alpha``) and then by the step's own entry. ``known``: step name -> parameters' dataclass.
    Raises ValueError (one line) on unknown steps or parameters; ``check_value(key, value, field_metadata)``
    validates each value set (ranges, choices). ``skip_unknown``: steps not in ``known`` are left out unchecked
    (with them the flat keys cannot be checked either): validation before the step modules are imported."""
    node = OmegaConf.to_container(algo, resolve=True) if OmegaConf.is_config(algo) else dict(algo)
    entries = [_entry(e, k) for k, e in enumerate(node.get("steps") or [])]
    unknown_steps = [name for name, _ in entries if name not in known]
    if unknown_steps and not skip_unknown:
        raise ValueError(f"algorithm step {unknown_steps[0]!r} is unknown; valid steps: {', '.join(sorted(known))}")
    taken = {p for name, _ in entries if name in known for p in param_fields(known[name])}
    flat = {k: v for k, v in node.items() if k not in ("name", "steps") and v is not None}
    for key in flat:
        if key not in taken and not unknown_steps:
            steps = ", ".join(n for n, _ in entries) or "none"
            raise ValueError(f"algorithm.{key} is not a parameter of any step of this recipe ({steps}); "
                             f"its steps take: {', '.join(sorted(taken)) or 'nothing'}")
    resolved = []
    for k, (name, own) in enumerate(entries):
        if name not in known:
            continue
        fields = param_fields(known[name])
        values = {}
        for p, f in fields.items():
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if p in own:
                value, where = own[p], f"algorithm.steps[{k}].{p}"
            elif p in flat:
                value, where = flat[p], f"algorithm.{p}"
            else:
                value, where = default, None
            if where and check_value is not None:
                check_value(where, value, dict(f.metadata))
            values[p] = value
        unknown = [p for p in own if p not in fields]
        if unknown:
            raise ValueError(f"algorithm.steps[{k}] ({name}) has unknown parameter {unknown[0]!r}; "
                             f"valid: {', '.join(fields) or 'none'}")
        resolved.append((name, SimpleNamespace(**values)))
    return resolved


# ---- the built-in steps' parameters ---------------------------------------------------------------------------

def smoothing_groups_param():
    """The ``groups`` parameter SmoothQuant and AWQ share: the input groups they may smooth, by name."""
    return field(default=None, metadata={"input_groups": True})


def min_gain_param():
    """The ``min_gain`` parameter of the block-scored searches: a candidate replaces what a group (or a linear's
    clipping) has only if it lowers the quantized block's error by more than this fraction (0: any decrease)."""
    return bounded(0.0, 0.0, 1.0)


def min_t_param():
    """The ``min_t`` parameter of the block-scored searches: a candidate must also lower the error consistently over
    the search terms, its paired t statistic (mean per-term decrease of the squared error over its standard error)
    above this (0: no test). Terms of one prompt are correlated, so t is a consistency bar, not a p-value."""
    return bounded(0.0, 0.0, None)


def paired_t(error, current) -> float:
    """The paired t statistic of ``current``'s per-term squared errors minus ``error``'s (`block_search.BlockError`
    terms, the same terms in the same order): inf for a decrease that every term shares exactly or that one term
    cannot test, 0 for no decrease."""
    d = [c - e for c, e in zip(current.terms, error.terms)]
    mean = math.fsum(d) / len(d) if d else 0.0
    if mean <= 0:
        return 0.0
    if len(d) < 2:
        return math.inf
    sd = statistics.stdev(d)
    return math.inf if sd == 0 else mean / (sd / math.sqrt(len(d)))


def recorded_t(error, current) -> float | None:
    """`paired_t` as the choices record it (metrics.json holds no infinities): None where it is infinite."""
    t = paired_t(error, current)
    return t if math.isfinite(t) else None


def accepts(error: float, current: float, min_gain: float, min_t: float = 0.0) -> bool:
    """Whether a candidate's block error earns its transform: strictly below ``current`` by more than ``min_gain``
    of it (a tie keeps what is there) and, for min_t > 0, by a decrease whose paired t over the terms exceeds min_t."""
    if not error < current * (1.0 - min_gain):
        return False
    return min_t <= 0 or paired_t(error, current) > min_t


@dataclass
class SmoothQuantParams:
    alpha: Any = field(default="auto", metadata={"range": (0.0, 1.0), "or_auto": True})  # or a number in [0, 1]
    # alpha=auto: how many of the grid's alphas (best per-linear loss first) are scored on the block output; 0: all
    shortlist: int = bounded(4, 0, None)
    # the input groups smoothed, by name (e.g. [self_attn_in, cross_attn_q, ffn_in]); null: every group with a fold
    groups: Optional[list[str]] = smoothing_groups_param()
    min_gain: float = min_gain_param()  # alpha=auto: the block-error decrease a group's alpha must bring
    min_t: float = min_t_param()  # alpha=auto: how consistent over the search terms that decrease must be


@dataclass
class AWQParams:
    grid: int = bounded(20, 1, 1000)  # ratios 0, 1/grid, ..., 1
    clip: bool = False  # search a per-output-channel weight clipping ratio
    clip_min: float = bounded(0.8, 0.0, 1.0, exclusive_low=True)
    clip_grid: int = bounded(10, 1, 100)
    # how many of the grid's ratios (best per-linear loss first, ratio 0 aside) are scored on the block output; 0: all
    shortlist: int = bounded(4, 0, None)
    # the input groups smoothed, by name; null: every group with a fold
    groups: Optional[list[str]] = smoothing_groups_param()
    min_gain: float = min_gain_param()  # the block-error decrease a ratio (or a linear's clipping) must bring
    min_t: float = min_t_param()  # how consistent over the search terms that decrease must be


@dataclass
class GPTQParams:
    damp: float = bounded(0.01, 0.0, 1.0, exclusive_low=True)
    block_size: int = bounded(128, 1, None)
    act_order: bool = False
    static_groups: bool = False  # column-group scales up front from the weight (else as the sweep reaches them)


def act_order_refusal(act_order: bool, static_groups: bool) -> str | None:
    """Why act-order cannot run with column-group scales chosen during the sweep (None: it can)."""
    if act_order and not static_groups:
        return ("algorithm.act_order=true with group scales needs algorithm.static_groups=true (scales chosen as "
                "the sweep reaches a group would follow the permuted column order; kernels read contiguous groups)")
    return None


def parse_alpha(value: Any) -> float | str:
    if value == "auto":
        return "auto"
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"algorithm.alpha={value!r} must be a number in [0, 1] or 'auto'") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"algorithm.alpha={value!r} is out of range; it must be in [0, 1] or 'auto'")
    return alpha


for _name, _params in {"rtn": None, "smoothquant": SmoothQuantParams, "awq": AWQParams, "gptq": GPTQParams}.items():
    declare_step(_name, _params)
