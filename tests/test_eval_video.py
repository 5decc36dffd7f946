"""eval=video: settings, paired generation, the shared reference cache, and runs end to end."""

import json
import threading
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import torch
from hydra import compose, initialize_config_dir

import vqx.plugins  # noqa: F401
from conftest import ROOT
from vqx.config.validate import validate
from vqx.errors import UserError
from vqx.eval.references import CACHE_KIND, ReferenceCache
from vqx.eval.video import VideoEvaluator
from vqx.eval.videoio import read_video
from vqx.models.loading import load_pipeline
from vqx.models.sampling import SamplerSettings, generate
from vqx.quant.formats import uniform
from vqx.stages import RunState
from conftest import pin_tiny

TINY = SamplerSettings(height=32, width=32, num_frames=5, steps=4, guidance=5.0, shift=3.0)
PROMPTS = {"version": 1, "task": "t2v", "samples": [{"prompt": "a red ball bounces", "seed": 1},
                                                     {"prompt": "a cat walks in the snow", "seed": 2}]}


def _compose(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=pin_tiny(["eval=video", *overrides]))


# ---- settings --------------------------------------------------------------------------------------

def test_eval_sampler_defaults_to_the_models_recommendation():
    tiny = _compose([])
    assert (tiny.eval.height, tiny.eval.width, tiny.eval.num_frames, tiny.eval.steps) == (32, 32, 5, 4)
    assert tiny.eval.num_samples == 2  # keeps `python run.py eval=video` short on tiny models
    big = _compose(["model=wan2.1_i2v_14b_720p", "model.path=/data/wan"])
    validate(big)
    assert (big.eval.height, big.eval.width, big.eval.num_frames, big.eval.steps, big.eval.guidance, big.eval.shift) == \
        (720, 1280, 81, 50, 5.0, 5.0)
    assert big.eval.num_samples is None  # real models: the whole eval prompt set
    assert _compose(["model.sampler.steps=7"]).eval.steps == 7


@pytest.mark.parametrize("override,message", [
    ("eval.num_frames=6", "eval.num_frames=6 must be 4k+1"),
    ("eval.height=40", "eval.height=40 must be a multiple of 16"),
    ("eval.width=8", "eval.width=8 is out of range; it must be >= 16"),
    ("eval.steps=0", "eval.steps=0 is out of range; it must be >= 1"),
    ("eval.num_samples=0", "eval.num_samples=0 is out of range; it must be >= 1"),
    ("eval.lpips_net=squeeze", "eval.lpips_net='squeeze' is not valid; valid choices: alex, vgg"),
    ("eval.noise_floor=magic", "eval.noise_floor='magic' is not valid; valid choices: auto, none, sdpa_math"),
])
def test_invalid_eval_settings_are_rejected(override, message):
    with pytest.raises(UserError) as e:
        validate(_compose([override]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_invalid_eval_settings_stop_the_run_before_any_model(vqx_run_in_process, tmp_path):
    r = vqx_run_in_process(["eval=video", "eval.num_frames=6", f"hydra.run.dir={tmp_path}"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "eval.num_frames=6 must be 4k+1" in lines[0], r.stderr
    log = tmp_path / "run.log"
    assert not (tmp_path / "metrics.json").exists()
    assert not log.exists() or "model wan_tiny" not in log.read_text()  # failed before loading the model


def test_cuda_only_noise_floor_refused_on_cpu(tmp_path):
    cfg = _compose(["eval.noise_floor=sdpa_efficient", "model.device=cpu", f"cache_dir={tmp_path}"])
    with pytest.raises(UserError, match="eval.noise_floor=sdpa_efficient needs a CUDA device"):
        VideoEvaluator(cfg, tmp_path).check()


# ---- paired generation and the reference cache -----------------------------------------------------

def test_same_seed_generates_bitwise_equal_videos_on_cpu(tiny_t2v):
    a = generate(tiny_t2v, "a red ball bounces", TINY, seed=5)
    b = generate(tiny_t2v, "a red ball bounces", TINY, seed=5)
    c = generate(tiny_t2v, "a red ball bounces", TINY, seed=6)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return path


def _evaluator(tmp_path, prompt_file, *overrides, run="run"):
    cfg = _compose([f"eval.path={prompt_file}", f"cache_dir={tmp_path / 'cache'}", "model.device=cpu", *overrides])
    validate(cfg)
    ev = VideoEvaluator(cfg, tmp_path / run)
    ev.check()
    return cfg, ev


def test_cache_key_covers_everything_that_determines_a_reference(tmp_path, prompt_file, tiny_t2v):
    cfg, ev = _evaluator(tmp_path, prompt_file)
    ev.references = ReferenceCache(cfg.cache_dir, cfg.model, tiny_t2v, ev.device)
    base = ev.references.entry_dir(ev.identity(0, "reference"))
    keys = {base, ev.references.entry_dir(ev.identity(1, "reference")),  # other prompt and seed
            ev.references.entry_dir(ev.identity(0, "noise_floor/sdpa_math"))}
    for override in ["eval.steps=3", "eval.guidance=4", "eval.shift=2", "eval.height=48", "eval.width=48",
                     "eval.num_frames=9", "eval.negative_prompt=blurry", "model.dtype=float32", "model.name=other"]:
        other_cfg, other = _evaluator(tmp_path, prompt_file, override)
        other.references = ReferenceCache(other_cfg.cache_dir, other_cfg.model, tiny_t2v, other.device)
        keys.add(other.references.entry_dir(other.identity(0, "reference")))
    assert len(keys) == 12
    weights = ev.references.base_identity["model"]["weights"]
    with torch.no_grad():
        tiny_t2v.transformer.proj_out.bias.add_(1)  # other weights, same config
    try:
        assert ReferenceCache(cfg.cache_dir, cfg.model, tiny_t2v, ev.device).base_identity["model"]["weights"] != weights
    finally:
        with torch.no_grad():
            tiny_t2v.transformer.proj_out.bias.sub_(1)


def test_references_cached_and_paired_with_the_same_noise(tmp_path, prompt_file):
    cfg, first = _evaluator(tmp_path, prompt_file, "eval.noise_floor_samples=1")
    pipe = load_pipeline(cfg.model)
    first.before_quantization(pipe)
    assert [r["cache_hit"] for r in first.refs + first.floors] == [False] * 3

    _, second = _evaluator(tmp_path, prompt_file, "eval.noise_floor_samples=1", run="run2")
    second.before_quantization(pipe)
    assert [r["cache_hit"] for r in second.refs + second.floors] == [True] * 3
    assert [r["path"] for r in second.refs] == [r["path"] for r in first.refs]
    fresh = np.round(np.clip(generate(pipe, "a red ball bounces", TINY, seed=1), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(np.load(second.refs[0]["path"]), fresh)  # the cache holds exactly the 8-bit frames

    # An unquantized "quantized" model must reproduce its references exactly: same noise, same settings.
    state = RunState(cfg=cfg, run_dir=tmp_path / "run2", pipe=pipe, format=uniform(None), targets=[],
                     quantized={}, runtime_smoothing={})
    m = second.evaluate(state)
    assert (m["lpips"], m["psnr"], m["lpips_std"]) == (0.0, 100.0, 0.0)
    assert m["ssim"] == pytest.approx(1.0, abs=1e-9)
    floor = m["noise_floor"]
    assert floor["method"] == "sdpa_math" and "_native_math" in floor["description"]
    assert floor["samples"] == 1 and floor["identical_videos"] == 0 and 0 < floor["lpips"] < 0.05 and 30 < floor["psnr"] < 100
    assert [v["prompt"] for v in m["videos"]] == ["a red ball bounces", "a cat walks in the snow"]
    assert len(m["per_frame"]["psnr"]) == 5
    for v in m["videos"]:
        for f in v["files"].values():
            assert (tmp_path / "run2" / f).stat().st_size > 0
    assert (tmp_path / "run2" / "per_frame.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- end to end ------------------------------------------------------------------------------------

def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _check_eval_outputs(run_dir: Path, samples: int, frames: int = 5):
    m = _metrics(run_dir)
    for key in ("lpips", "psnr", "ssim", "lpips_std", "psnr_std", "ssim_std"):
        assert np.isfinite(m[key]), key
    assert 0 <= m["lpips"] < 1 and 0 < m["psnr"] <= 100 and 0 < m["ssim"] <= 1
    assert m["noise_floor"]["method"] == "sdpa_math" and np.isfinite(m["noise_floor"]["lpips"])
    assert m["eval"]["samples"] == len(m["videos"]) == samples
    for v in m["videos"]:
        assert len(v["per_frame"]["lpips"]) == frames
        for f in v["files"].values():
            video = read_video(run_dir / f)
            assert video.shape[0] == frames and video.shape[1] >= 128
    assert (run_dir / "per_frame.png").is_file()
    for v in m["videos"]:  # reference | quantized | difference, first / middle / last frame (content: test_eval_metrics)
        ref = read_video(run_dir / v["files"]["reference"])
        strip = np.asarray(Image.open(run_dir / v["strip"]))
        assert strip.dtype == np.uint8 and strip.shape[2] == 3 and strip.shape[0] % 3 == 0 and strip.shape[1] % 3 == 0
        assert strip.shape[0] <= 3 * ref.shape[1] and strip.shape[1] // 3 <= ref.shape[2]  # raw frames, not upscaled
    return m


def _scores(m: dict) -> dict:
    keys = ("lpips", "psnr", "ssim", "lpips_std", "psnr_std", "ssim_std", "per_frame")
    return {"summary": {k: m[k] for k in keys}, "floor": {k: m["noise_floor"][k] for k in ("lpips", "psnr", "ssim")},
            "videos": [{k: v[k] for k in ("prompt", "seed", "lpips", "psnr", "ssim", "per_frame")} for v in m["videos"]]}


def test_eval_video_t2v_end_to_end_concurrent_runs_share_the_cache(vqx_run, tmp_path):
    """`python run.py eval=video` twice at once on one cache: every reference is built exactly once, both
    jobs read it whole, and their metrics are identical."""
    results = {}

    def job(name):
        # export and W&B have their own end-to-end runs (test_export.py, test_wandb.py, test_run.py's default job)
        results[name] = vqx_run(["eval=video", "eval.num_samples=2", "export=none", "logger=none",
                                 f"hydra.run.dir={tmp_path / name}"], env={"VQX_CACHE_DIR": str(tmp_path / "cache")})

    threads = [threading.Thread(target=job, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results.values():
        assert r.returncode == 0, r.stderr
    a, b = (_check_eval_outputs(tmp_path / n, samples=2) for n in ("a", "b"))
    assert a["lpips"] > 0  # w8a8 changes the videos
    assert a["eval"]["sampler"] == {"height": 32, "width": 32, "num_frames": 5, "steps": 4, "guidance": 5.0,
                                    "shift": 3.0, "negative_prompt": ""}
    built = a["eval"]["reference_cache"]["built"] + b["eval"]["reference_cache"]["built"]
    hits = a["eval"]["reference_cache"]["hits"] + b["eval"]["reference_cache"]["hits"]
    assert (built, hits) == (4, 4)  # 2 references + 2 noise-floor videos, each built by one job only
    assert _scores(a) == _scores(b)
    leftovers = [p for p in (tmp_path / "cache" / CACHE_KIND).rglob(".*") if p.is_dir()]
    assert leftovers == []  # no half-built entries


@pytest.mark.slow  # I2V references, noise floor and videos with the CLIP image encoder
def test_eval_video_i2v_end_to_end(vqx_run, tmp_path):
    r = vqx_run(["model=wan_tiny_i2v", "eval=video", "export=none", "logger=none", f"hydra.run.dir={tmp_path}"],
                env={"VQX_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    m = _check_eval_outputs(tmp_path, samples=2)
    assert all(Path(v["image"]).is_file() for v in m["videos"])


@pytest.mark.parametrize("fmt", ["fp8", "w8a8"])
def test_eval_kernel_gemm_videos_match_the_fake_gemm(tmp_path, monkeypatch, fmt):
    """eval.gemm=kernel (the 8-bit GEMMs lightx2v runs) generates nearly fake quantization's video: the same RTN
    model evaluated once per GEMM, the two quantized videos compared with each other directly."""
    import vqx.eval.video as video_module
    from vqx import experiment
    from vqx.eval import metrics as M
    from vqx.eval.videoio import to_float
    from vqx.quant.linear import QuantLinear

    generated = {}
    real = video_module.generate_sample

    def spy(pipe, samples, i, desc, quantized):
        video = real(pipe, samples, i, desc, quantized)
        if quantized:  # the GEMM every quantized linear ran while this video was generated
            generated[gemm] = (video, {q.backend for q in pipe.transformer.modules() if isinstance(q, QuantLinear)})
        return video

    monkeypatch.setattr(video_module, "generate_sample", spy)
    metrics = {}
    for gemm in ("fake", "kernel"):
        cfg = _compose(["algorithm=rtn", f"format={fmt}", "export=none", "logger=none", "eval.noise_floor=none",
                        "eval.save_videos=false", "eval.num_samples=1", f"eval.gemm={gemm}", "calib.num_prompts=1",
                        "calib.steps=2", f"cache_dir={tmp_path / 'cache'}"])
        metrics[gemm] = experiment.run(cfg, tmp_path / gemm)
    (fake, fake_gemms), (kernel, kernel_gemms) = generated["fake"], generated["kernel"]
    assert (fake_gemms, kernel_gemms) == ({"fake"}, {"kernel"})
    assert not np.array_equal(fake, kernel)  # two computations: the kernel GEMMs did run
    # Measured (wan_tiny, RTN, sample 0, CPU): kernel vs fake PSNR 49.1 dB (fp8) and 51.3 dB (w8a8), frames >= 44.7 dB;
    # their LPIPS to the reference differ by 9e-6 (fp8) and 1.8e-5 (w8a8). Bounds: 9 dB below the lower PSNR, and
    # 10x the larger LPIPS gap. A wrong scale or a dropped bias in the kernel path costs tens of dB.
    psnr = float(M.psnr_frames(to_float(fake), to_float(kernel)).mean())
    assert psnr >= 40.0, psnr
    assert abs(metrics["kernel"]["lpips"] - metrics["fake"]["lpips"]) < 2e-4, (metrics["kernel"]["lpips"],
                                                                              metrics["fake"]["lpips"])


def test_eval_kernel_gemm_refuses_weight_only_formats(vqx_run_in_process, tmp_path):
    # typed with the option's old name, eval.backend: it still works, after one deprecation line (on the console:
    # a refused run leaves no run dir, so no run.log)
    run_dir = tmp_path / "run"
    r = vqx_run_in_process(["format=w8a16", "export=none", "logger=none", "eval.backend=kernel", f"hydra.run.dir={run_dir}"])
    assert r.returncode == 2 and "eval.gemm=kernel needs 8-bit weights and activations" in r.stderr
    assert "eval.backend is deprecated; use eval.gemm=kernel" in r.stdout
    assert not run_dir.exists()


@pytest.mark.parametrize("fmt,gpus", [("nvfp4", "lightx2v_kernel's NVFP4 GEMM, built for sm_120a (RTX 50-class) only"),
                                      ("mxfp8", "lightx2v_kernel's MX GEMMs, built for sm_120a (RTX 50-class) only"),
                                      ("w4a16_g128", "Marlin's int4 x fp16 GEMM (Ampere and later: A100, H100/H200, "
                                                     "RTX 30/40)")])
def test_eval_kernel_gemm_refusal_names_the_gpus_a_lowbit_format_needs(vqx_run_in_process, tmp_path, fmt, gpus):
    r = vqx_run_in_process([f"format={fmt}", "export=none", "logger=none", "eval.gemm=kernel",
                            f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"vqx: error: eval.gemm=kernel needs 8-bit weights and activations (format=w8a8, fp8, fp8_static or fp8_b128), not format={fmt} "
        f"(lightx2v runs it on {gpus}); use eval.gemm=fake, the same numbers emulated")
