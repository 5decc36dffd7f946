"""Quantized attention in a pipeline: which sites, which denoising steps, from the ``attention`` config group.

`AttentionRuntime` is what a run installs (through the model adapter's attention sites): one callable per site
that runs the emulated attention (vqx.quant.attention) unless the current denoising step is one of
``full_precision_steps`` or the runtime is suspended (exports record 16-bit attention: the deployment engine
picks its attention kernel at run time, not from the checkpoint). A `StepClock` on each transformer tells the
step from the timestep the sampler passes: denoising timesteps fall within a trajectory, so an equal timestep is
the same step (the two guidance branches), a smaller one the next step, a larger one a new trajectory.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import AttentionScheme, attention

log = logging.getLogger("vqx")

STEP_NAMES = ("first", "last")


@dataclass(frozen=True)
class AttentionPlan:
    scheme: AttentionScheme
    sites: tuple[str, ...]
    full_precision_steps: tuple[int, ...]  # resolved, 0-based, in [0, num_steps)
    num_steps: int

    def describe(self) -> dict:
        return {"name": self.scheme.name, "sites": list(self.sites),
                "full_precision_steps": list(self.full_precision_steps), "num_steps": self.num_steps,
                "scheme": {k: v for k, v in vars(self.scheme).items() if k != "name"}}


def resolve_steps(items, num_steps: int) -> tuple[int, ...]:
    """``full_precision_steps`` entries (first, last, an index, negative from the end) as sorted step indices;
    ValueError (one line) for anything else."""
    out = set()
    for item in items:
        if item in STEP_NAMES:
            out.add(0 if item == "first" else num_steps - 1)
        elif isinstance(item, int) and not isinstance(item, bool) and -num_steps <= item < num_steps:
            out.add(item % num_steps)
        else:
            raise ValueError(f"attention.full_precision_steps has {item!r}; valid: first, last, or a step index "
                             f"in [{-num_steps}, {num_steps - 1}] ({num_steps} denoising steps)")
    return tuple(sorted(out))


def scheme_from_config(node) -> AttentionScheme | None:
    """The attention scheme an ``attention`` config node asks for (None for ``none``)."""
    if node.name == "none":
        return None
    keys = [f for f in AttentionScheme.__dataclass_fields__ if f != "name"]
    return AttentionScheme(name=str(node.name), **{k: node[k] for k in keys})


def plan_from_config(node, num_steps: int, valid_sites: tuple[str, ...]) -> AttentionPlan | None:
    """Check and resolve the ``attention`` group (ValueError, one line, on a bad value); None for ``none``."""
    scheme = scheme_from_config(node)
    if scheme is None:
        return None
    sites = tuple(node.sites)
    bad = [s for s in sites if s not in valid_sites]
    if bad or not sites:
        what = "names no site" if not sites else f"has unknown site {bad[0]!r}"
        raise ValueError(f"attention.sites={list(sites)} {what}; valid: {', '.join(valid_sites)}")
    return AttentionPlan(scheme, sites, resolve_steps(list(node.full_precision_steps), num_steps), num_steps)


@dataclass
class StepClock:
    """The denoising step of the current transformer call, from its timestep (module doc)."""

    step: int = -1
    last_timestep: float | None = None
    handles: list = field(default_factory=list)

    def watch(self, transformer: nn.Module) -> None:
        self.handles.append(transformer.register_forward_pre_hook(self._tick, with_kwargs=True))

    def _tick(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            return
        value = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        if self.last_timestep is None or value > self.last_timestep:
            self.step = 0
        elif value < self.last_timestep:
            self.step += 1
        self.last_timestep = value

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def sageattention_version() -> str | None:
    """The installed ``sageattention`` distribution's version, or None."""
    try:
        return importlib.metadata.version("sageattention")
    except importlib.metadata.PackageNotFoundError:
        return None


def sageattention_kernel(scheme: AttentionScheme, sage1: AttentionScheme):
    """(the real kernel for ``scheme``, why not): SageAttention1's Triton kernel from the ``sageattention`` package
    for attention=sage1 with the preset's numbers (``sage1``), taking q/k/v [B, L, H, D] (its "NHD" layout):
    ``sageattn_qk_int8_pv_fp16_triton`` in SageAttention 2.x, ``sageattn`` in 1.x (PyPI's release, the same Triton
    kernel, which subtracts K's mean from K in place: it gets a copy)."""
    if scheme != sage1:
        return None, f"no real kernel for attention={scheme.name} (only sage1 with its preset numbers)"
    try:
        import sageattention
    except ImportError as e:
        return None, f"the sageattention package is not importable ({e})"
    sage1_triton = getattr(sageattention, "sageattn_qk_int8_pv_fp16_triton", None)
    if sage1_triton is None:
        version = sageattention_version() or "unknown"
        if not version.startswith("1."):
            return None, f"sageattention {version} has no sageattn_qk_int8_pv_fp16_triton (2.x) and is not 1.x"
        sage1_triton = lambda q, k, v, **kw: sageattention.sageattn(q, k.clone(), v, **kw)  # noqa: E731

    def kernel(q, k, v):
        return sage1_triton(q, k, v, tensor_layout="NHD", smooth_k=scheme.smooth_k)
    return kernel, None


class SiteAttention:
    """``attend(q, k, v)`` for one attention site, q/k/v [B, L, H, D] as diffusers passes them: the emulation, or
    the runtime's real kernel (whose first call per site is also emulated, to report their difference)."""

    def __init__(self, runtime: "AttentionRuntime", site: str):
        self.runtime, self.site = runtime, site

    def active(self) -> bool:
        return self.runtime.active()

    def emulate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.runtime.plan.scheme)
        return out.transpose(1, 2)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        rt.calls[self.site] = rt.calls.get(self.site, 0) + 1
        if rt.kernel is None:
            return self.emulate(q, k, v)
        try:
            out = rt.kernel(q, k, v)
        except Exception as e:  # noqa: BLE001 - e.g. no CUDA device: the emulation serves, and the report says why
            log.warning("attention=%s: the real kernel failed (%s: %s); emulating instead", rt.plan.scheme.name,
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            rt.kernel, rt.kernel_why = None, f"the real kernel failed: {type(e).__name__}"
            return self.emulate(q, k, v)
        if self.site not in rt.kernel_vs_emulation:
            want = self.emulate(q, k, v).float()
            rt.kernel_vs_emulation[self.site] = float((out.float() - want).norm() / want.norm().clamp_min(1e-30))
        return out


class AttentionRuntime:
    """A plan installed in a pipeline's transformers (module doc)."""

    def __init__(self, plan: AttentionPlan, kernel=None, kernel_why: str | None = None):
        self.plan = plan
        self.clock = StepClock()
        self.suspended = False
        self.calls: dict[str, int] = {}  # quantized attention calls per site (a check that it ran)
        self.kernel, self.kernel_why = kernel, kernel_why  # a real kernel (eval.gemm=kernel), or why not
        self.kernel_vs_emulation: dict[str, float] = {}  # per site: relative L2 difference on its first call

    def report(self) -> dict:
        """metrics.json's ``attention``: the plan, and with eval.gemm=kernel what ran."""
        out = self.plan.describe()
        if self.kernel is not None or self.kernel_why is not None:
            out["kernel"] = {"used": self.kernel is not None, "why_not": self.kernel_why,
                             "relative_difference_to_emulation": dict(self.kernel_vs_emulation)}
        return out

    def active(self) -> bool:
        return not self.suspended and self.clock.step not in self.plan.full_precision_steps

    def install(self, adapter, transformers: list[nn.Module]) -> int:
        """Route the plan's sites of every block of ``transformers`` through this runtime; returns how many
        attention modules now run it."""
        done = 0
        for tr in transformers:
            self.clock.watch(tr)
            done += adapter.install_attention(tr, {site: SiteAttention(self, site) for site in self.plan.sites})
        log.info("attention=%s on %d attention modules (sites %s)%s", self.plan.scheme.name, done,
                 ", ".join(self.plan.sites),
                 f", 16-bit at steps {list(self.plan.full_precision_steps)}" if self.plan.full_precision_steps else "")
        return done


@contextlib.contextmanager
def suspended(runtime: AttentionRuntime | None):
    """16-bit attention inside the block (exports record what the deployment's 16-bit math computes)."""
    if runtime is None:
        yield
        return
    before, runtime.suspended = runtime.suspended, True
    try:
        yield
    finally:
        runtime.suspended = before
