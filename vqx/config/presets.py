"""Option files read by name, outside a composed run (benchmarks, scripts, the run's own comparisons)."""

from __future__ import annotations

from omegaconf import OmegaConf

from ..quant.attention import AttentionScheme
from ..quant.attention_plan import scheme_from_config
from ..runtime import package_path
from .schema import AttentionSchema


def attention_preset(name: str) -> AttentionScheme:
    """The scheme ``attention=<name>`` sets (conf/attention/<name>.yaml over the group's schema), for benchmarks
    and scripts that pick a preset by name without composing a run."""
    path = package_path(f"conf/attention/{name}.yaml")
    if not path.is_file():
        raise ValueError(f"no attention preset {name!r} (conf/attention/{name}.yaml)")
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    scheme = scheme_from_config(OmegaConf.merge(OmegaConf.structured(AttentionSchema), node))
    if scheme is None:
        raise ValueError(f"attention preset {name!r} quantizes nothing")
    return scheme
