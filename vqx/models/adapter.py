"""The model adapter: everything vqx knows about one model family, behind one object.

Calibration, the algorithms, evaluation and the exporters ask ``adapter_for(transformer)`` (or the pipeline)
for blocks, linears, input groups, names and shape rules; they never touch a family's module names. A family
registers its adapter for its diffusers transformer class (`register_adapter`); `vqx.models` imports every
built-in family (today `vqx.models.wan`), so importing any `vqx.models` module registers them.

The family-neutral types the adapter and its callers exchange live here too: `InputGroup`, `QuantTarget`,
`LayerSelection` and `BlockInputs`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

@dataclass(frozen=True)
class InputGroup:
    """Linears of one block that read the same input, so one smoothing factor s serves them all (the input is
    divided by s, the weight columns multiplied by s).

    ``kind``: where 1/s can be absorbed, and ``fold`` the adapter's name for that place:
      "runtime": a per-channel vector applied at run time, named ``fold`` (Wan: lightx2v's affine_norm1/3);
      "norm": the affine norm before the group, the block-relative module ``fold`` (exact; Wan: norm2);
      "v_rows" (``fold`` "v_rows"): the rows (and bias) of the value projections ``fold_sources`` whose
        attention output the group reads (exact: attention mixes value rows linearly);
      None (``fold`` None): no place to put it (weights are quantized as they are).
    """

    name: str
    linears: tuple[str, ...]  # block-relative module names
    kind: str | None = None
    fold: str | None = None
    fold_sources: tuple[str, ...] = ()  # for "v_rows": the value projections whose rows absorb s


@dataclass(frozen=True)
class LayerSelection:
    """Which block linears get quantized."""

    skip_first_blocks: int = 0
    skip_last_blocks: int = 0
    skip_patterns: tuple[str, ...] = ()  # fnmatch patterns on full diffusers names, e.g. "blocks.0.ffn.*"

    def selects(self, block_index: int, num_blocks: int, full_name: str) -> bool:
        if block_index < self.skip_first_blocks or block_index >= num_blocks - self.skip_last_blocks:
            return False
        return not any(fnmatch.fnmatchcase(full_name, p) for p in self.skip_patterns)


@dataclass(frozen=True)
class QuantTarget:
    """One block linear to quantize."""

    block: int  # index in adapter.blocks(transformer)
    local_name: str  # block-relative module name
    module: nn.Linear
    name: str  # full module name in the transformer, e.g. "blocks.3.attn1.to_q"
    native_name: str  # the family's native checkpoint name for exporters, e.g. "blocks.3.self_attn.q"


def _move(t: Any, device, non_blocking: bool) -> Any:
    if isinstance(t, torch.Tensor):
        return t.to(device, non_blocking=non_blocking)
    if isinstance(t, (tuple, list)):
        return type(t)(_move(x, device, non_blocking) for x in t)
    return t


@dataclass
class BlockInputs:
    """What one block is called with for one captured transformer call: the hidden states it updates and the
    rest of its positional arguments as the transformer passed them (conditioning, embeddings). The block runs
    as ``block(hidden, *args)`` and returns the new hidden states (vqx.calib.blocks.run_block)."""

    hidden: torch.Tensor  # [B, L, D] in the blocks' dtype
    args: tuple = ()

    def to(self, device: torch.device, non_blocking: bool = False) -> "BlockInputs":
        return BlockInputs(_move(self.hidden, device, non_blocking), _move(self.args, device, non_blocking))

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInputs":
        return BlockInputs(hidden, self.args)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted, relative to ``root``) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class _Stop(Exception):
    def __init__(self, args):
        self.block_args = args


class ModelAdapter:
    """What vqx knows about one model family. Subclasses fill in the family's facts; the methods with a body
    here are generic over `blocks` and `block_linears`."""

    name = ""
    blocks_attr = ""  # the transformer's attribute holding its blocks (their full names start with it)
    capture_keys: tuple[str, ...] = ()  # transformer call arguments that calibration records
    prompt_keys: tuple[str, ...] = ()  # those of them that are the same at every denoising step of a prompt's branch

    # ---- structure ------------------------------------------------------------------------------------

    def transformers(self, pipe) -> list[nn.Module]:
        """The pipeline's denoising transformers (more than one for a mixture of experts)."""
        return [pipe.transformer]

    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        return getattr(transformer, self.blocks_attr)

    def block_name(self, index: int) -> str:
        """Block ``index``'s full module name, the prefix of its linears' names (e.g. "blocks.3")."""
        return f"{self.blocks_attr}.{index}"

    def block_linears(self, transformer: nn.Module) -> dict[str, str]:
        """Block-relative name -> native block-relative name of every linear an exporter quantizes."""
        raise NotImplementedError

    def input_groups(self, transformer: nn.Module) -> list[InputGroup]:
        """Every block linear in exactly one group, in the order the block runs them."""
        raise NotImplementedError

    def is_i2v(self, transformer: nn.Module) -> bool:
        raise NotImplementedError

    def block_dtype(self, transformer: nn.Module) -> torch.dtype:
        """The dtype the blocks compute in (some of a model's other parameters may be kept in fp32)."""
        raise NotImplementedError

    def hidden_size(self, transformer: nn.Module) -> int:
        """Width of the hidden states between blocks."""
        raise NotImplementedError

    def attention_heads(self, transformer: nn.Module) -> tuple[int, int]:
        """(heads, head dim) of the blocks' attention."""
        raise NotImplementedError

    def attention_sites(self, block: nn.Module) -> dict[str, nn.Module]:
        """A block's attention modules by role ("self", "cross")."""
        raise NotImplementedError

    attention_site_names: tuple[str, ...] = ("self", "cross")  # the keys of `attention_sites`

    def install_attention(self, transformer: nn.Module, attend_by_site: dict) -> int:
        """Run the attention of the named sites of every block through ``attend_by_site[site]``
        (vqx.quant.attention_plan.SiteAttention: ``active()`` and ``(q, k, v) -> out``, q/k/v [B, L, H, D]);
        returns how many attention modules changed."""
        raise NotImplementedError(f"model family {self.name} cannot quantize its attention")

    def quant_targets(self, transformer: nn.Module, selection: LayerSelection) -> list[QuantTarget]:
        blocks = self.blocks(transformer)
        linears = self.block_linears(transformer)
        out = []
        for i, block in enumerate(blocks):
            prefix = self.block_name(i)
            for local, native in linears.items():
                name = f"{prefix}.{local}"
                if selection.selects(i, len(blocks), name):
                    out.append(QuantTarget(i, local, block.get_submodule(local), name, f"{prefix}.{native}"))
        return out

    # ---- running blocks on captured calls -------------------------------------------------------------

    @torch.no_grad()
    def first_block_inputs(self, transformer: nn.Module, call: dict[str, torch.Tensor],
                           cache: dict | None = None) -> BlockInputs:
        """Run ``transformer(**call)`` only up to its first block and return that block's inputs, so the
        preamble (embeddings, conditioning) is always the model's own code. ``cache``: one dict per capture, where
        a family may keep inputs that depend only on the call's shapes, so that calls share them."""

        def grab(module, args, kwargs):
            raise _Stop(args)

        handle = self.blocks(transformer)[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            transformer(**call, return_dict=False)
        except _Stop as stop:
            return BlockInputs(stop.block_args[0], tuple(stop.block_args[1:]))
        finally:
            handle.remove()
        raise RuntimeError("transformer forward never reached its first block")

    def tokens_per_call(self, transformer: nn.Module, call: dict[str, torch.Tensor]) -> int:
        """Tokens (rows of the hidden states) per batch item of a captured call."""
        raise NotImplementedError

    def video_tokens(self, transformer: nn.Module, height: int, width: int, num_frames: int) -> int:
        """Tokens of a video of that size (the self-attention's sequence length)."""
        raise NotImplementedError

    def smoothing_groups(self, task: str) -> dict[str, str]:
        """The block input groups a smoothing factor can be folded for, in block order, for a model of ``task``:
        name -> ``InputGroup.kind`` (where the factor goes). What SmoothQuant's and AWQ's ``groups`` parameter may
        name; the kinds let an exporter refuse, before any model is built, smoothing it has no place for."""
        raise NotImplementedError

    def check_frames(self, num_frames: int) -> str | None:
        """Why the family cannot generate ``num_frames`` frames (None: it can)."""
        return None

    # ---- building and loading (vqx.models.loading calls these) -------------------------------------------

    def build_pipeline(self, model, dtype: torch.dtype, device: torch.device):
        """The pipeline a ``model`` config names (its ``source``: built in code, or a local folder), before it
        is moved to ``device``; raise UserError (one line) for a folder that is not a usable checkpoint."""
        raise NotImplementedError

    def check_model_folder(self, model) -> None:
        """Checks of ``model.path`` to run before any prompt file inside it is read (one-line UserError)."""

    def check_outliers(self, scale: float, sites: list[str]) -> str | None:
        """Validate ``model.outliers.scale`` and ``.sites`` before anything is built (one-line UserError); returns
        why the injected model holds a module no checkpoint of the family has (it cannot be exported), or None."""
        raise NotImplementedError(f"model family {self.name} cannot inject activation outliers")

    def inject_outliers(self, transformer: nn.Module, channels: int, scale: float, seed: int, sites: list[str]) -> None:
        """Activation outlier channels at ``sites`` that leave the float model's outputs unchanged (benchmarks)."""
        raise NotImplementedError(f"model family {self.name} cannot inject activation outliers")

    # ---- names and run-time structure -----------------------------------------------------------------

    def native_key(self, key: str) -> str:
        """A transformer state-dict key's native checkpoint name (raises KeyError on unknown keys)."""
        raise NotImplementedError

    def diffusers_key(self, native: str) -> str:
        """Inverse of `native_key`."""
        raise NotImplementedError

    def install_fused(self, transformer: nn.Module, blocks=None) -> int:
        """Give quantized blocks (all, or the indices in ``blocks``) the family's fused forward, which quantizes
        each input group once; returns how many blocks have it. Without one, linears quantize their own inputs."""
        return 0

    def unfused_block(self, block: nn.Module) -> nn.Module:
        """``block`` (changed in place) with the family's plain forward again: every linear quantizing its own
        input, as a reference computation wants."""
        return block


_ADAPTERS: dict[str, ModelAdapter] = {}  # transformer class path -> adapter
_BY_NAME: dict[str, ModelAdapter] = {}


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_adapter(transformer_cls: type | str):
    """Class decorator: register an adapter (instance of the decorated class) for a transformer class, given
    as the class or its dotted path (``"pkg.module.Class"``, so registering imports nothing)."""
    key = transformer_cls if isinstance(transformer_cls, str) else _key(transformer_cls)

    def wrap(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
        adapter = adapter_cls()
        _ADAPTERS[key] = _BY_NAME[adapter.name] = adapter
        return adapter_cls

    return wrap


def adapter_for(model: Any) -> ModelAdapter:
    """The adapter of a transformer, or of a pipeline's transformer (first match along the class's MRO)."""
    transformer = model if isinstance(model, nn.Module) else model.transformer
    for cls in type(transformer).__mro__:
        adapter = _ADAPTERS.get(_key(cls))
        if adapter is not None:
            return adapter
    known = ", ".join(k.rpartition(".")[2] for k in _ADAPTERS) or "none"
    raise TypeError(f"vqx has no model adapter for {type(transformer).__name__}; supported transformers: {known}")


def adapter_names() -> list[str]:
    return sorted(_BY_NAME)


def adapter_named(name: str) -> ModelAdapter:
    """A family's adapter by its name (for settings checked before any model is built)."""
    if name not in _BY_NAME:
        raise KeyError(f"no model adapter named {name!r}; known: {', '.join(sorted(_BY_NAME)) or 'none'}")
    return _BY_NAME[name]


# Shorthands for the callers that only hold a transformer.

def quant_targets(transformer: nn.Module, selection: LayerSelection) -> list[QuantTarget]:
    return adapter_for(transformer).quant_targets(transformer, selection)
