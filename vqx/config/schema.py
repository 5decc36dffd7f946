"""Structured config schemas, one per config group, registered in Hydra's ConfigStore.

Every group option file starts with ``defaults: [/schema/<group>/<kind>@_here_, _self_]`` so Hydra
type-checks overrides and rejects unknown keys while composing. Ranges and choices, which Hydra does
not check, are declared here as field metadata and enforced by `validate.py` before anything runs.

A new exporter, evaluator or logger registers its schema with `register_schema` in its package's torch-free
``schemas.py`` (an algorithm step declares its parameters in `algorithms/params.py`) and ships one yaml file;
nothing here changes. `vqx.schemas` imports them all, so Hydra composes and `validate.check_settings` checks a
run's settings before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ..runtime import DTYPES, package_path, user_cache_dir


def choice(*values: str, default: Any = None) -> Any:
    return field(default=default if default is not None else values[0], metadata={"choices": values})


def bounded(default: Any, lo: float | None = None, hi: float | None = None, **meta: Any) -> Any:
    return field(default=default, metadata={"range": (lo, hi), **meta})


def renamed(new: str) -> Any:
    """A key's old name, still accepted: a value set here moves to ``new`` with one deprecation line
    (`validate.apply_renames`)."""
    return field(default=None, metadata={"renamed_to": new})


@dataclass
class SamplerSchema:
    """The denoising sampler a model is run with (Wan's recommendation per model)."""

    height: int = bounded(480, 16, None, multiple_of=16)
    width: int = bounded(832, 16, None, multiple_of=16)
    num_frames: int = bounded(81, 1, None, frames=True)
    steps: int = bounded(50, 1, None)
    guidance: float = bounded(5.0, 0.0, None)
    shift: float = bounded(3.0, 0.0, None, exclusive_low=True)
    negative_prompt: str = ""


@dataclass
class PromptSetsSchema:
    """A model's own default prompt files; null: the shipped assets/wan_<task>/<split>/prompts.json.
    calib.path and eval.path override them."""

    calib: Optional[str] = None
    eval: Optional[str] = None


@dataclass
class OutlierSchema:
    """Activation outlier channels injected without changing the float model (vqx.models.wan.outliers)."""

    channels: int = bounded(0, 0, None)  # per block and site; 0: none
    scale: float = bounded(32.0, 2, None)  # a power of two
    seed: int = 0
    # the inputs that get them, named by input group; the family's adapter lists the valid ones (Wan: cross_attn_q,
    # self_attn_out, cross_attn_out, ffn_out (after the FFN's GELU), cross_attn_text (attn2.to_k/to_v's input))
    sites: list[str] = field(default_factory=lambda: ["cross_attn_q", "self_attn_out", "cross_attn_out"])


@dataclass
class ModelSchema:
    name: str = "wan_tiny"
    family: str = "wan"  # the model adapter (vqx.models.adapter) that builds, loads and knows this model
    task: str = choice("t2v", "i2v")
    source: str = choice("tiny", "diffusers", "synthetic", "mini")  # mini: a folder trained by vqx.testbed.train
    path: Optional[str] = None  # local diffusers folder (source=diffusers, mini)
    arch: str = choice("1.3B", "14B")  # source=synthetic: full-size random transformer (benchmarks only)
    num_layers: Optional[int] = bounded(None, 1, None)  # source=synthetic: fewer blocks; null: the real count
    dtype: str = choice(*DTYPES)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # weights seed of built-in tiny models
    calib_prompts: int = bounded(8, 1, None)  # calibration prompts recommended for this size
    eval_samples: Optional[int] = bounded(None, 1, None)  # evaluation prompts by default; null: all
    prompts: PromptSetsSchema = field(default_factory=PromptSetsSchema)
    sampler: SamplerSchema = field(default_factory=SamplerSchema)
    outliers: OutlierSchema = field(default_factory=OutlierSchema)


@dataclass
class FormatSchema:
    """Ordered ``{pattern, scheme}`` rules over block linears, first match wins (vqx.quant.formats); the
    skips are rules that keep layers float, placed before them."""

    name: str = "w8a8"
    skip_first_blocks: int = bounded(0, 0, None)
    skip_last_blocks: int = bounded(0, 0, None)
    skip_patterns: list[str] = field(default_factory=list)  # fnmatch on names like "blocks.0.ffn.*"
    rules: list[Any] = field(default_factory=list)  # [{pattern: "*", scheme: w8a8}]; scheme: a name, none, or a mapping


@dataclass
class AlgorithmSchema:
    """A recipe: its steps, each a name or ``{name: <step>, <param>: <value>}``. The full schema,
    ``/schema/algorithm/recipe``, adds every registered step's parameters as flat optional keys
    (vqx.algorithms.registry)."""

    name: str = "rtn"
    steps: list[Any] = field(default_factory=lambda: ["rtn"])


@dataclass
class CalibSchema:
    """Capture settings. The sampler (size, frames, guidance, shift, negative prompt) defaults to the
    model's, i.e. evaluation's; only the number of denoising steps is the capture's own."""

    name: str = "default"
    path: Optional[str] = None  # prompts json (assets/README.md); null: assets/wan_<task>/calib/prompts.json
    num_prompts: int = bounded(8, 1, None)
    steps: int = bounded(10, 1, None)  # denoising steps of the capture trajectory (same noise range as eval)
    capture_steps: Optional[int] = bounded(None, 1, None)  # steps recorded, evenly spaced; null: all
    # the part of the trajectory recorded, as fractions of its steps ([0, 0.3]: the early, noisiest steps only)
    capture_window: list[float] = field(default_factory=lambda: [0.0, 1.0])
    height: int = bounded(480, 16, None, multiple_of=16)
    width: int = bounded(832, 16, None, multiple_of=16)
    num_frames: int = bounded(81, 1, None, frames=True)
    guidance: float = bounded(5.0, 0.0, None)
    shift: float = bounded(3.0, 0.0, None, exclusive_low=True)
    negative_prompt: str = ""
    loss_tokens: int = bounded(256, 1, None)  # tokens sampled per call for search losses
    report_tokens: int = bounded(2048, 1, None)  # tokens per input group (of those) for the layer-error report
    # Reuse the float model's per-block statistics across runs (cached by capture): with propagate=fp they
    # do not depend on the algorithm's parameters, so sweep points skip the block-by-block float pass.
    # Used when the steps need no search over samples (rtn, smoothquant with a fixed alpha).
    share_stats: bool = True
    hessian_tokens: Optional[int] = bounded(4096, 1, None)  # tokens per call in GPTQ Hessians; null: all
    # calls (spread evenly over the capture) on which searches score candidates on the quantized block output
    # (SmoothQuant alpha=auto, AWQ; vqx.algorithms.block_search); null: every call. The guard uses every call.
    search_calls: Optional[int] = bounded(16, 1, None)
    # What a term of the block error is (searches and the guard): each call on its own (branches), or each
    # (prompt, step)'s two guidance branches combined as the sampler combines them (guided; search_calls / 2 pairs)
    block_objective: str = choice("branches", "guided")
    # The per-layer error report when no step reads calibration data (algorithm=rtn with dynamic activations):
    # sample: on a small capture (the first prompt at 2 denoising steps); full: on the whole capture above;
    # none: skipped, nothing captured. Runs whose steps read statistics report on their own capture.
    layer_report: str = choice("sample", "full", "none")
    propagate: str = choice("fp", "quant")  # block i+1 sees block i's float or quantized outputs
    seed: int = 0
    # Calibrated activation values (fp8_static's static scale, NVFP4's activation global scale), per input group
    # from the statistics over the whole capture: the absmax; a percentile of the per-token absmax of the token
    # sample; or "mse", the clip of the absmax (a grid down to act_clip_min) with the lowest quantized output error
    # of the group's linears on the token sample.
    act_statistic: str = choice("absmax", "percentile", "mse")
    act_percentile: float = bounded(99.9, 0.0, 100.0, exclusive_low=True)
    act_grid: int = bounded(20, 1, 1000)
    act_clip_min: float = bounded(0.3, 0.0, 1.0, exclusive_low=True)


@dataclass
class AttentionSchema:
    """Quantized attention (vqx.quant.attention), emulated in every attention call of the quantized model at
    evaluation; ``none`` leaves attention in 16 bits. The options set SageAttention's numbers; every knob can be
    overridden."""

    name: str = "none"
    qk: str = choice("int8", "fp8", "nvfp4")  # Q and K: int8 / fp8 e4m3 per token group, nvfp4 1x16 along the head dim
    pv: str = choice("fp16", "fp8", "nvfp4")  # P and V: fp16, fp8 e4m3 (V per channel, P scaled to 448), nvfp4 1x16
    q_granularity: str = choice("block", "warp", "thread")  # tokens sharing a Q scale: block_q, warp_q, per thread
    k_granularity: str = choice("block", "thread")  # block_k tokens per K scale, or 4 interleaved scales per block
    block_q: int = bounded(128, 1, None)
    warp_q: int = bounded(16, 8, None, multiple_of=8)
    block_k: int = bounded(64, 8, None, multiple_of=8)
    block_kv: int = bounded(64, 16, None, multiple_of=16)  # key tile of the online softmax (P is quantized per tile)
    smooth_k: bool = True  # subtract K's token mean first (softmax is invariant to it)
    smooth_q: bool = False  # subtract Q's per-128-token mean, add mean_q . k back in fp32 (SageAttention3)
    q_prescale: bool = False  # quantize Q * sm_scale * log2(e) (SageAttention1's Triton kernel)
    scale_eps: float = bounded(0.0, 0.0, None)  # added to int8 scales (SageAttention2's per-thread quantizers: 1e-7)
    sites: list[str] = field(default_factory=lambda: ["self", "cross"])  # the model adapter's attention sites
    # denoising steps whose attention stays 16-bit: first, last, or a step index (negative: from the end)
    full_precision_steps: list[Any] = field(default_factory=list)


@dataclass
class ExportSchema:
    name: str = "none"


@dataclass
class EvalSchema:
    name: str = "none"


@dataclass
class LoggerSchema:
    name: str = "none"


# ``${vqx_repo:assets/x}`` in a config: that path inside the vqx package, absolute (runs start anywhere).
OmegaConf.register_new_resolver("vqx_repo", lambda relative: str(package_path(relative)), replace=True)
# ``${vqx_user_cache:}``: cache_dir's default, the user's cache folder (not the working directory).
OmegaConf.register_new_resolver("vqx_user_cache", lambda: str(user_cache_dir()), replace=True)

GROUPS = ("model", "algorithm", "format", "attention", "calib", "export", "eval", "logger")

_registered: dict[tuple[str, str], type] = {}
# (group, old option name) -> its new name: the old yaml stays, `validate.apply_renames` renames and warns
RENAMED_OPTIONS: dict[tuple[str, str], str] = {}


def register_schema(group: str, kind: str, schema: type) -> None:
    """Make ``/schema/<group>/<kind>`` available to option files of ``group``."""
    if group not in GROUPS:
        raise ValueError(f"unknown config group {group!r}; valid: {', '.join(GROUPS)}")
    _registered[(group, kind)] = schema
    ConfigStore.instance().store(group=f"schema/{group}", name=kind, node=schema)


for _group, _schema in {
    "model": ModelSchema,
    "format": FormatSchema,
    "algorithm": AlgorithmSchema,
    "attention": AttentionSchema,
    "calib": CalibSchema,
    "export": ExportSchema,
    "eval": EvalSchema,
    "logger": LoggerSchema,
}.items():
    register_schema(_group, "base", _schema)
