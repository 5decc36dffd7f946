"""Named schemes, and a run's format: an ordered list of ``{pattern, scheme}`` rules, first match wins.

``format=w8a8`` is the one-rule case (``[{pattern: "*", scheme: w8a8}]``); mixed precision is more rules,
e.g. ``[{pattern: "*.ffn.net.2", scheme: fp8}, {pattern: "*", scheme: w8a8}]``. A rule's scheme is a
preset name below, ``none`` (the layer stays float), or a mapping ``{weight: {...}, activation: {...}}``
of `TensorScheme` fields. Patterns are fnmatch patterns on a block linear's full name
(``blocks.3.attn1.to_q``); a layer no rule matches stays float. What a deployment target can load is the
exporter's business, not the scheme's.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import OmegaConf

from .scheme import Scheme, TensorScheme

_INT8_W = TensorScheme("int8", "channel", scale_dtype="bf16")  # bf16-representable: lightx2v reads them via bf16
_FP8_W = TensorScheme("fp8_e4m3", "channel", scale_dtype="bf16")
# NVFP4 (lightx2v `nvfp4`): E2M1 in groups of 16 along K, e4m3 group scales under a bf16 global scale; activations
# the same per token-group, their global scale calibrated (lightx2v reads it as `input_absmax`).
_NVFP4 = dict(group_size=16, scale_dtype="e4m3", global_scale=True)
# OCP MX (lightx2v `mxfp8`, `mxfp6-mxfp8`, `mxfp4`): groups of 32 along K, e8m0 scales as its kernels round them.
_MX = dict(group_size=32, scale_dtype="e8m0")
# int4 symmetric in groups of 128 (lightx2v `int4-g128-marlin` reads fp16 scales: bf16-representable ones survive
# its loader's bf16 cast and are exact in fp16 above 2^-14).
_INT4_G128 = TensorScheme("int4", "group", group_size=128, scale_dtype="bf16")

SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme("w8a8", _INT8_W, TensorScheme("int8", "token"),
               "int8 weights per channel, int8 activations per token"),
        Scheme("fp8", _FP8_W, TensorScheme("fp8_e4m3", "token"),
               "fp8 e4m3 weights per channel, fp8 e4m3 activations per token"),
        Scheme("w8a16", _INT8_W, None, "int8 weights per channel, 16-bit activations (weight-only)"),
        Scheme("fp8_w", _FP8_W, None, "fp8 e4m3 weights per channel, 16-bit activations (weight-only)"),
        Scheme("fp_e3m4", TensorScheme("fp_e3m4", "channel", scale_dtype="bf16"), TensorScheme("fp_e3m4", "token"),
               "research 8-bit float e3m4, weights and activations (fake-quant only)"),
        Scheme("fp_e2m5", TensorScheme("fp_e2m5", "channel", scale_dtype="bf16"), TensorScheme("fp_e2m5", "token"),
               "research 8-bit float e2m5, weights and activations (fake-quant only)"),
        Scheme("nvfp4", TensorScheme("fp4_e2m1", "group", **_NVFP4), TensorScheme("fp4_e2m1", "token_group", **_NVFP4),
               "NVFP4: E2M1 weights and activations in groups of 16, e4m3 group scales, global scales (activations: calibrated)"),
        Scheme("mxfp8", TensorScheme("fp8_e4m3", "group", **_MX), TensorScheme("fp8_e4m3", "token_group", **_MX),
               "MXFP8: e4m3 weights and activations in groups of 32 with e8m0 scales"),
        Scheme("mxfp6", TensorScheme("fp6_e3m2", "group", **_MX), TensorScheme("fp8_e4m3", "token_group", **_MX),
               "MXFP6 weights (e3m2) x MXFP8 activations, groups of 32 with e8m0 scales (lightx2v mxfp6-mxfp8)"),
        Scheme("mxfp4", TensorScheme("fp4_e2m1", "group", **_MX), TensorScheme("fp4_e2m1", "token_group", **_MX),
               "MXFP4: E2M1 weights and activations in groups of 32 with e8m0 scales"),
        Scheme("w4a16_g128", _INT4_G128, None, "int4 weights in groups of 128, 16-bit activations (weight-only)"),
        Scheme("w4a8", _INT4_G128, TensorScheme("fp8_e4m3", "token"),
               "int4 weights in groups of 128 x fp8 e4m3 activations per token (research: no lightx2v scheme)"),
        Scheme("fp8_static", TensorScheme("fp8_e4m3", "tensor", scale_dtype="bf16"),
               TensorScheme("fp8_e4m3", "tensor", dynamic=False, scale_dtype="bf16"),
               "fp8 e4m3 weights per tensor x fp8 activations with one calibrated static scale (lightx2v fp8-pertensor)"),
        # lightx2v fp8-b128-deepgemm: weights as deepgemm's per_block_cast_to_fp8 (block absmax clamped to >= 1e-4;
        # its fp32 scales are read through the loader's bf16 cast, so vqx rounds them to bf16 first and quantizes
        # with the rounded scale), activations as sglang's per-token-group quantizer (absmax >= 1e-10, x / scale).
        Scheme("fp8_b128", TensorScheme("fp8_e4m3", "block", block=(128, 128), scale_dtype="bf16", amax_floor=1e-4),
               TensorScheme("fp8_e4m3", "token_group", group_size=128, amax_floor=1e-10),
               "fp8 e4m3 weights in 128x128 blocks x fp8 activations per token-group of 128"),
    ]
}
NO_QUANT = "none"  # a rule's scheme that keeps the layer float
# Search losses need quantization: for a layer kept float, this scheme stands in as the proxy.
SEARCH_PROXY = SCHEMES["w8a8"]


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; valid: {', '.join([NO_QUANT, *SCHEMES])} "
                         "(or a mapping with weight/activation)") from None


def _tensor_scheme(spec: Mapping[str, Any] | None, what: str) -> TensorScheme | None:
    if spec is None:
        return None
    valid = [f.name for f in fields(TensorScheme)]
    unknown = [k for k in spec if k not in valid]
    if unknown:
        raise ValueError(f"{what} has unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")
    spec = dict(spec)
    if spec.get("block") is not None:
        spec["block"] = tuple(spec["block"])
    return TensorScheme(**spec)


def parse_scheme(value: Any, where: str = "scheme") -> Scheme | None:
    """A rule's scheme: a preset name, ``none`` (float), or ``{name?, weight, activation?, description?}``."""
    if value is None or value == NO_QUANT:
        return None
    if isinstance(value, str):
        return get_scheme(value)
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in ("name", "weight", "activation", "description")]
        if unknown:
            raise ValueError(f"{where} has unknown key {unknown[0]!r}; valid keys: name, weight, activation, description")
        weight = _tensor_scheme(value.get("weight"), f"{where}.weight")
        act = _tensor_scheme(value.get("activation"), f"{where}.activation")
        name = value.get("name") or _auto_name(weight, act)
        return Scheme(name, weight, act, value.get("description", ""))
    raise ValueError(f"{where}={value!r} is not a scheme name or mapping")


def _auto_name(weight: TensorScheme | None, act: TensorScheme | None) -> str:
    if weight is None:
        return NO_QUANT
    return f"w:{weight.describe()}" + (f" a:{act.describe()}" if act else "")


@dataclass(frozen=True)
class Rule:
    pattern: str
    scheme: Scheme | None  # None: the layer stays float

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass(frozen=True)
class Format:
    """A run's quantization: ordered rules over block linears (first match wins; no match: float)."""

    name: str
    rules: tuple[Rule, ...]

    def scheme_for(self, name: str) -> Scheme | None:
        for rule in self.rules:
            if rule.matches(name):
                return rule.scheme
        return None

    def schemes(self) -> list[Scheme]:
        """The distinct schemes the rules name, in rule order."""
        out: list[Scheme] = []
        for r in self.rules:
            if r.scheme is not None and r.scheme not in out:
                out.append(r.scheme)
        return out

    @property
    def quantizes(self) -> bool:
        return bool(self.schemes())

    @property
    def keeps_float(self) -> bool:
        """Whether some layers may stay float: a ``none`` rule, or no catch-all rule at the end."""
        return any(r.scheme is None for r in self.rules) or not self.rules or self.rules[-1].pattern != "*"

    def assign(self, names_by_block: Mapping[int, Sequence[str]]) -> dict[str, Scheme | None]:
        """The layers an algorithm works on (full name -> scheme, None: stays float): every layer of each block
        that holds a quantized layer (a float member of a smoothed input group then keeps its exact 1/s),
        and every layer when the format quantizes nothing (transform-only runs)."""
        out: dict[str, Scheme | None] = {}
        for names in names_by_block.values():
            block = {n: self.scheme_for(n) for n in names}
            if any(v is not None for v in block.values()):
                out.update(block)
        if not out:
            out = {n: None for names in names_by_block.values() for n in names}
        return out

    def unused_rules(self, names: Iterable[str]) -> list[Rule]:
        """Rules that decide no layer among ``names`` (shadowed or matching nothing)."""
        used = set()
        for n in names:
            for k, rule in enumerate(self.rules):
                if rule.matches(n):
                    used.add(k)
                    break
        return [r for k, r in enumerate(self.rules) if k not in used]


def uniform(scheme: Scheme | None, name: str | None = None) -> Format:
    """Every block linear under one scheme (the one-rule format)."""
    return Format(name or (scheme.name if scheme else NO_QUANT), (Rule("*", scheme),) if scheme else ())


def skip_rules(skip_first_blocks: int, skip_last_blocks: int, num_blocks: int, patterns: Iterable[str]) -> list[Rule]:
    """Layer selection as rules that keep layers float (they go before the format's own rules)."""
    blocks = list(range(min(skip_first_blocks, num_blocks))) + list(range(max(0, num_blocks - skip_last_blocks), num_blocks))
    return [Rule(f"blocks.{i}.*", None) for i in sorted(set(blocks))] + [Rule(p, None) for p in patterns]


def format_from_config(fmt_cfg: Any, num_blocks: int | None = None) -> Format:
    """The run's `Format` from the ``format`` config node (name, rules, skip_*). With ``num_blocks`` None
    the block skips are left out (checks before the model is built)."""
    rules = []
    for k, r in enumerate(fmt_cfg.rules):
        if "pattern" not in r or "scheme" not in r:
            raise ValueError(f"format.rules[{k}] needs 'pattern' and 'scheme', got {dict(r)}")
        rules.append(Rule(str(r["pattern"]), parse_scheme(_plain(r["scheme"]), f"format.rules[{k}].scheme")))
    skips = skip_rules(fmt_cfg.skip_first_blocks if num_blocks else 0, fmt_cfg.skip_last_blocks if num_blocks else 0,
                       num_blocks or 0, fmt_cfg.skip_patterns)
    return Format(fmt_cfg.name, tuple(skips + rules))


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
