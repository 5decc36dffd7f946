"""One eval sample's video: its prompt, seed, image and sampler settings through a pipeline, with a progress bar;
NaN/Inf activations stop it at once naming the step and layer, NaN pixels naming the sample."""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm

from ..diagnostics import nonfinite_guard
from ..errors import Fault
from ..models.sampling import SamplerSettings, generate
from ..prompts import PromptSample
from .videoio import to_uint8


class EvalSamples:
    """The eval prompt set with the run's sampler: per sample its settings and (I2V) its image, loaded once."""

    def __init__(self, samples: list[PromptSample], sampler: SamplerSettings, i2v: bool):
        self.samples, self.sampler, self.i2v = samples, sampler, i2v
        self._images: dict = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> PromptSample:
        return self.samples[i]

    def settings(self, i: int) -> SamplerSettings:
        s = self.samples[i]
        # a sample's own negative prompt (even "") replaces the run's default, as in calibration
        return self.sampler if s.negative_prompt is None else dataclasses.replace(self.sampler,
                                                                                  negative_prompt=s.negative_prompt)

    def image(self, i: int):
        if not self.i2v:
            return None
        if i not in self._images:
            self._images[i] = self.samples[i].load_image()
        return self._images[i]


def generate_sample(pipe, samples: EvalSamples, i: int, desc: str, quantized: bool) -> np.ndarray:
    """Sample ``i``'s video as uint8 frames; ``desc`` labels the progress bar ("quantized 2/8")."""
    s, settings = samples[i], samples.settings(i)
    done = [0]  # denoising steps finished: the step a NaN appears in is named in the error

    def on_step(k, n):
        done[0] = k + 1
        bar.update(1)

    where = lambda: f"while generating eval sample {i} ({desc.rsplit(' ', 1)[0]} model) at denoising step {done[0]}"  # noqa: E731
    fix = ("the format or algorithm breaks this layer: try another algorithm/format or format.skip_patterns for it"
           if quantized else "the float model itself overflows: try model.dtype=float32 or check the checkpoint")
    with tqdm(total=settings.steps, desc=desc, unit="step", leave=False, disable=None) as bar, \
            nonfinite_guard(pipe.transformer, where, fix):
        video = generate(pipe, s.prompt, settings, s.seed, image=samples.image(i), on_step=on_step)
    if not np.isfinite(video).all():
        raise Fault(f"the {'quantized model' if quantized else '16-bit model'} produced NaN/Inf pixels for eval sample "
                    f"{i} ({s.prompt[:50]!r}); " + ("the format or algorithm broke the model" if quantized
                                                    else "the float model itself is broken"))
    return to_uint8(video)
