"""Bad input the other test files do not already cover: each is refused with one line that names the problem
and the fix, the right exit code, no traceback and no output that looks finished.

Already covered elsewhere (not repeated here): tests/test_config.py (unknown option/key, wrong type, ranges,
unknown dtype, 4k+1 frames, multiples of 16, missing model.path, missing model folder), tests/test_prompts.py
(missing/malformed/wrongly shaped prompt files, task mismatches, missing/unreadable/truncated images),
tests/test_export.py (formats lightx2v cannot load, skips with lightx2v, existing target), tests/test_eval_video.py
and tests/test_eval_metrics.py (eval settings, LPIPS sizes and weights, `vqx score` inputs).

Refusals and faults with one stage patched from the outside run run.py's own entry in the test process
(`vqx_run_in_process`); runtime faults that need a process of their own (NaN activations from the weights, a file
size limit) run `python run.py` as a subprocess, as does tests/test_config.py's check of the process's exit code.
"""

import errno
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

import vqx.plugins  # noqa: F401
from conftest import ROOT
from vqx.prompts import load_prompt_set
from vqx.config.validate import validate
from vqx.errors import Fault, UserError, as_vqx_error, report_and_exit
from vqx.models.loading import load_pipeline
from vqx.runtime import resolve_device
from conftest import pin_tiny, run_vqx_in_process

CONF = ROOT / "conf"
# every group named, so these tests do not change meaning when conf/config.yaml's defaults change
PIN = ["algorithm=rtn", "format=w8a8", "export=none", "eval=none", "logger=none"]
# the real-model option pointed at a tiny folder, with the tiny model's sampler so a run takes seconds
SMALL = [*PIN, "model.sampler.height=32", "model.sampler.width=32", "model.sampler.num_frames=5", "model.sampler.steps=4",
         "model.calib_prompts=1", "calib.steps=2"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=pin_tiny(overrides))


def one_line_error(r, code):
    """The CLI contract for a failed run: exit code, one stderr line, no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.lstrip().startswith(("Writing", "Loading"))]
    assert r.returncode == code, r.stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("vqx: error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout
    return errors[0]


def assert_nothing_finished(run_dir: Path):
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / "export").exists()


# ---- config: values validate() must refuse -----------------------------------------------------------

BAD_CONFIG = [
    (["algorithm=smoothquant", "algorithm.alpha=1.5"], "algorithm.alpha=1.5 is out of range; it must be >= 0.0 and <= 1.0"),
    (["algorithm=smoothquant", "algorithm.alpha=-0.1"], "algorithm.alpha=-0.1 is out of range"),
    (["algorithm=smoothquant", "algorithm.alpha=best"], "algorithm.alpha='best' is not valid; use a number in [0.0, 1.0] or 'auto'"),
    (["calib.steps=0"], "calib.steps=0 is out of range; it must be >= 1"),
    (["calib.num_prompts=0"], "calib.num_prompts=0 is out of range; it must be >= 1"),
    (["calib.capture_steps=0"], "calib.capture_steps=0 is out of range; it must be >= 1"),
    (["calib.num_frames=8"], "calib.num_frames=8 must be 4k+1"),
    (["calib.height=100"], "calib.height=100 must be a multiple of 16 (e.g. 96)"),
    (["calib.width=8"], "calib.width=8 is out of range; it must be >= 16"),
    (["calib.propagate=both"], "calib.propagate='both' is not valid; valid choices: fp, quant"),
    (["calib.hessian_tokens=0"], "calib.hessian_tokens=0 is out of range; it must be >= 1"),
    (["model.sampler.shift=0"], "model.sampler.shift=0.0 is out of range; it must be > 0.0"),
    (["algorithm=gptq", "algorithm.damp=0"], "algorithm.damp=0.0 is out of range; it must be > 0.0 and <= 1.0"),
    (["algorithm=awq", "algorithm.grid=0"], "algorithm.grid=0 is out of range; it must be >= 1 and <= 1000"),
    (["export=lightx2v", "export.verify_tolerance=0"], "export.verify_tolerance=0.0 is out of range; it must be > 0.0"),
    (["export=lightx2v", "export.dtype=float16"], "export.dtype='float16' is not valid; valid choices: bfloat16, float32"),
    (["format.skip_last_blocks=-2"], "format.skip_last_blocks=-2 is out of range; it must be >= 0"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIG, ids=[" ".join(o) for o, _ in BAD_CONFIG])
def test_bad_config_values(overrides, message):
    with pytest.raises(UserError) as e:
        validate(_compose(overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,message", [
    ("tpu", "model.device='tpu' is not a device; valid: auto, cpu, cuda, cuda:N"),
    ("cuda", "model.device=cuda but no CUDA device is visible; use model.device=cpu or auto"),
])
def test_bad_device(name, message):
    if name == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(name)


def test_research_format_with_lightx2v_export_is_refused_on_the_cli(vqx_run_in_process, tmp_path):
    # in-process for every format in test_export.py; here the CLI path of the research float formats
    r = vqx_run_in_process(["format=fp_e3m4", "export=lightx2v", "logger=none", f"hydra.run.dir={tmp_path}"])
    line = one_line_error(r, 2)
    assert "format=fp_e3m4" in line and "w8a8, fp8" in line
    assert_nothing_finished(tmp_path)


def test_i2v_prompts_with_a_t2v_model_are_refused_before_the_model(vqx_run_in_process, tmp_path):
    r = vqx_run_in_process([*PIN, f"calib.path={ROOT / 'assets/wan_i2v/calib/prompts.json'}", f"hydra.run.dir={tmp_path}"])
    line = one_line_error(r, 2)
    assert "i2v" in line and "t2v" in line
    assert_nothing_finished(tmp_path)
    log = tmp_path / "run.log"
    assert not log.exists() or "model wan_tiny" not in log.read_text()  # refused before the model was built


# ---- data: prompt files and images not covered by test_prompts.py ------------------------------------

def test_empty_prompt_file(tmp_path):
    f = tmp_path / "prompts.json"
    f.write_bytes(b"")
    with pytest.raises(UserError) as e:
        load_prompt_set(str(f), "t2v", "calib")
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def _i2v_file(tmp_path, image_name):
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps({"version": 1, "task": "i2v", "samples": [{"prompt": "a cat", "seed": 1, "image": image_name}]}))
    return f


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_image_modes_load_as_rgb(tmp_path, mode):
    # other modes are converted (alpha dropped), never passed on as a 1/2/4-channel tensor
    ext = "tiff" if mode == "CMYK" else "png"
    Image.new(mode, (40, 24)).save(tmp_path / f"img.{ext}")
    sample = load_prompt_set(str(_i2v_file(tmp_path, f"img.{ext}")), "i2v", "calib")[0]
    img = sample.load_image()
    assert img.mode == "RGB" and img.size == (40, 24)


def test_image_that_is_a_folder(tmp_path):
    (tmp_path / "img.png").mkdir()
    with pytest.raises(UserError) as e:
        load_prompt_set(str(_i2v_file(tmp_path, "img.png")), "i2v", "calib")
    assert "img.png" in str(e.value) and "is not a file" in str(e.value)


# ---- model: a broken local diffusers folder ----------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from vqx.models.wan.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("model") / "Wan-tiny-Diffusers"
    build_tiny_pipeline("t2v").save_pretrained(folder)
    return folder


@pytest.fixture
def model_copy(tiny_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    return folder


def _model_cfg(path, task="t2v"):
    return OmegaConf.create({"family": "wan", "source": "diffusers", "path": str(path), "task": task, "dtype": "bfloat16",
                             "device": "cpu", "seed": 0})


WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _edit_config(folder, **changes):
    f = folder / "transformer/config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _edit_weight(folder, name, value):
    f = folder / WEIGHTS
    tensors = load_file(f)
    tensors[name].view(-1)[3] = value
    save_file(tensors, f, metadata={"format": "pt"})


def test_saved_tiny_folder_loads(model_copy):
    """The corruptions below start from a folder that loads: a refusal is due to the corruption only."""
    pipe = load_pipeline(_model_cfg(model_copy))
    assert pipe.transformer.config.num_layers == 2


def _truncate(folder):
    f = folder / WEIGHTS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage_header(folder):
    f = folder / WEIGHTS
    f.write_bytes((100).to_bytes(8, "little") + b"{not json" + b" " * 200)


def _tiny_file(folder):
    (folder / WEIGHTS).write_bytes(b"abc")


BAD_FOLDERS = {
    "no_model_index": (lambda d: (d / "model_index.json").unlink(), "has no model_index.json, so it is not a diffusers pipeline folder"),
    "model_index_not_json": (lambda d: (d / "model_index.json").write_text("{oops"), "model_index.json is not valid JSON"),
    "missing_subfolder": (lambda d: shutil.rmtree(d / "vae"), "lacks the subfolder(s) vae"),
    "no_transformer_weights": (lambda d: (d / WEIGHTS).unlink(), "holds no .safetensors weights"),
    "truncated_safetensors": (_truncate, "diffusion_pytorch_model.safetensors is truncated or corrupt: its header describes"),
    "garbage_safetensors_header": (_garbage_header, "has a corrupt safetensors header"),
    "file_shorter_than_a_header": (_tiny_file, "is truncated or not a safetensors file (3 bytes"),
    "truncated_vae_weights": (lambda d: (d / "vae/diffusion_pytorch_model.safetensors").write_bytes(
        (d / "vae/diffusion_pytorch_model.safetensors").read_bytes()[:-10]), "vae/diffusion_pytorch_model.safetensors is truncated"),
    "config_wrong_width": (lambda d: _edit_config(d, ffn_dim=128),
                           "transformer tensor blocks.0.ffn.net.0.proj.weight has shape [64, 32] in the weights but [128, 32] by the config"),
    "config_more_layers": (lambda d: _edit_config(d, num_layers=3), "the transformer weights lack 27 tensor(s) the config needs (first: blocks.2."),
    "config_fewer_layers": (lambda d: _edit_config(d, num_layers=1), "hold 27 tensor(s) the config has no place for (first: blocks.1."),
    "config_not_json": (lambda d: (d / "transformer/config.json").write_text("{nope"), "transformer/config.json is not a valid WanTransformer3DModel config"),
    "config_missing": (lambda d: (d / "transformer/config.json").unlink(), "transformer has no config.json"),
    "nan_weight": (lambda d: _edit_weight(d, "blocks.1.attn1.to_k.weight", float("nan")),
                   "transformer weight blocks.1.attn1.to_k.weight holds 1 NaN/Inf value(s)"),
    "inf_weight": (lambda d: _edit_weight(d, "proj_out.bias", float("inf")), "transformer weight proj_out.bias holds 1 NaN/Inf value(s)"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_broken_model_folder(model_copy, case):
    corrupt, message = BAD_FOLDERS[case]
    corrupt(model_copy)
    with pytest.raises(UserError) as e:
        load_pipeline(_model_cfg(model_copy))
    text = str(e.value)
    assert message in text and "\n" not in text
    # every message says what to do, not only what is wrong
    assert any(w in text for w in ("copy", "expected", "use the config.json", "pick")), text


def test_t2v_folder_for_an_i2v_model(model_copy):
    with pytest.raises(UserError, match="declares 'WanPipeline' but model.task=i2v needs WanImageToVideoPipeline"):
        load_pipeline(_model_cfg(model_copy, task="i2v"))


@pytest.mark.parametrize("case", ["truncated_safetensors", "nan_weight"])
def test_broken_model_folder_on_the_cli(vqx_run_in_process, model_copy, tmp_path, case):
    corrupt, message = BAD_FOLDERS[case]
    corrupt(model_copy)
    run_dir = tmp_path / "run"
    r = vqx_run_in_process(["model=wan2.1_t2v_1.3b", f"model.path={model_copy}", *SMALL, f"hydra.run.dir={run_dir}",
                 f"cache_dir={tmp_path / 'cache'}"])
    assert message in one_line_error(r, 2)
    assert_nothing_finished(run_dir)
    assert not (tmp_path / "cache").exists()  # refused before any calibration work


# ---- runtime: NaN/Inf activations ----------------------------------------------------------------------

HUGE = 3e38  # finite in bf16 (max 3.39e38); a linear with such weights overflows to Inf


def test_nan_activations_in_calibration_name_block_layer_and_step(vqx_run, model_copy, tmp_path):
    _edit_weight(model_copy, "blocks.1.ffn.net.2.weight", HUGE)
    f = model_copy / WEIGHTS  # a whole row huge, so the output overflows whatever the input signs
    t = load_file(f)
    t["blocks.1.ffn.net.2.weight"][0].fill_(HUGE)
    save_file(t, f, metadata={"format": "pt"})
    run_dir = tmp_path / "run"
    r = vqx_run(["model=wan2.1_t2v_1.3b", f"model.path={model_copy}", *SMALL, f"hydra.run.dir={run_dir}",
                 f"cache_dir={tmp_path / 'cache'}"])
    line = one_line_error(r, 1)
    assert "non-finite activations (NaN/Inf)" in line and "block 1, layer ffn.net.2" in line, line
    assert re.search(r"capturing calibration prompt 0 at denoising step \d+ \((cond|uncond) branch\)", line), line
    assert "model.dtype=float32" in line
    assert_nothing_finished(run_dir)
    assert not [p for p in (tmp_path / "cache").rglob("MANIFEST.json")]  # no cache entry of a broken capture
    assert json.loads((run_dir / "error.json").read_text())["type"] == "Fault"


def test_nan_activations_in_the_block_pass_name_block_layer_and_step(tmp_path, tiny_t2v):
    """The capture was fine (e.g. cached) but a block's float output overflows when the statistics are gathered."""
    import copy

    from vqx.algorithms.runner import quantize_blockwise
    from vqx.cache import DiskCache
    from vqx.calib.capture import load_or_capture
    from vqx.models.adapter import LayerSelection, quant_targets
    from vqx.quant.formats import get_scheme

    cfg = _compose([*PIN, "calib.num_prompts=1", "calib.steps=2"])
    pipe = copy.deepcopy(tiny_t2v)
    capture = load_or_capture(pipe, cfg.calib, "t2v", {"name": "t"}, DiskCache(tmp_path))
    with torch.no_grad():
        pipe.transformer.blocks[1].attn1.to_v.weight[0].fill_(HUGE)
    targets = quant_targets(pipe.transformer, LayerSelection())
    with pytest.raises(Fault) as e:
        quantize_blockwise(pipe.transformer, capture, targets, get_scheme("w8a8"), cfg.algorithm, cfg.calib)
    text = str(e.value)
    assert "first in block 1, layer attn1.to_v" in text and "calibration prompt 0 at denoising step 0 (cond branch)" in text
    assert "\n" not in text


def test_nan_activations_in_evaluation_name_sample_step_and_layer(tmp_path, tiny_t2v):
    import copy

    from vqx.eval.generation import generate_sample
    from vqx.eval.video import VideoEvaluator

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"version": 1, "task": "t2v", "samples": [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}]}))
    cfg = _compose(["algorithm=rtn", "export=none", "logger=none", "eval=video", f"eval.path={prompts}", f"cache_dir={tmp_path / 'cache'}", "model.device=cpu"])
    ev = VideoEvaluator(cfg, tmp_path / "run")
    ev.check()
    pipe = copy.deepcopy(tiny_t2v)
    with torch.no_grad():
        pipe.transformer.blocks[0].ffn.net[2].bias[5] = float("nan")
    with pytest.raises(Fault) as e:
        generate_sample(pipe, ev.samples, 1, "quantized 2/2", quantized=True)
    text = str(e.value)
    assert "eval sample 1 (quantized model) at denoising step 0" in text and "block 0, layer ffn.net.2" in text, text
    assert "format.skip_patterns" in text and "\n" not in text


# ---- runtime: disk full, out of memory ---------------------------------------------------------------

def run_patched(monkeypatch, target: str, replacement, args, debug=False):
    """`run.py` through its own entry, with one stage (``target``, "module.attribute") replaced from outside the
    product code; in-process, the patch undone afterwards."""
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, replacement)
    return run_vqx_in_process(args, env={"VQX_DEBUG": "1"} if debug else None)


def _raise(exc):
    def raises(*args, **kwargs):
        raise exc
    return raises


FAST = ["model=wan_tiny", *PIN, "calib.num_prompts=1", "calib.steps=2"]


def test_disk_full_writing_metrics(monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    r = run_patched(monkeypatch, "vqx.experiment.write_json_atomic",
                    lambda p, d: _raise(OSError(errno.ENOSPC, "No space left on device", str(p)))(),
                    [*FAST, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"])
    line = one_line_error(r, 1)
    assert f"cannot write {run_dir / 'metrics.json'}: the disk is full; free space there" in line, line
    assert_nothing_finished(run_dir)


def test_file_size_limit_while_writing_the_calibration_cache(tmp_path):
    """A real write failure (ulimit -f; EFBIG like ENOSPC): safetensors' own error becomes one line naming the file."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (48_000, 48_000))

    run_dir = tmp_path / "run"
    env = {"VQX_CACHE_DIR": str(tmp_path / "cache")}
    full_env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", **env}
    full_env.pop("VQX_DEBUG", None)
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), *FAST, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, preexec_fn=limit)
    line = one_line_error(r, 1)
    assert "calls.safetensors: the file size limit (ulimit -f) is exceeded" in line, line
    assert_nothing_finished(run_dir)
    assert not list((tmp_path / "cache").rglob("MANIFEST.json"))  # the half-written entry was never published


def test_unwritable_run_dir(vqx_run_in_process, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the run dir's parent should be: fails even as root
    r = vqx_run_in_process([*FAST, f"hydra.run.dir={blocker / 'run'}"])
    line = one_line_error(r, 2)
    assert str(blocker) in line, line


OOM = ("vqx.experiment.quantize_blockwise", _raise(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")))


def test_gpu_out_of_memory_says_what_to_reduce(monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    r = run_patched(monkeypatch, *OOM, [*FAST, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"])
    line = one_line_error(r, 1)
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB)" in line
    for knob in ("calib.height/width/num_frames", "calib.num_prompts", "calib.hessian_tokens"):
        assert knob in line
    assert_nothing_finished(run_dir)
    assert "out of GPU memory" in json.loads((run_dir / "error.json").read_text())["error"]


def test_debug_shows_where_a_mapped_fault_came_from(monkeypatch, tmp_path):
    r = run_patched(monkeypatch, *OOM, [*FAST, f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"],
                    debug=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "OutOfMemoryError" in r.stderr
    assert "in raises" in r.stderr  # the original frame where it was raised, not only the mapped Fault


@pytest.mark.parametrize("exc,code,text", [
    (RuntimeError("CUDA error: out of memory"), 1, "out of GPU memory"),
    (MemoryError(), 1, "out of host memory"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/c/x"), 1, "cannot write /c/x: the disk quota is exceeded"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), 2, "cannot write /ro/x: the file system is read-only; make it writable"),
    (OSError(errno.EACCES, "Permission denied", "/p/x"), 2, "cannot access /p/x: permission is denied"),
])
def test_storage_and_memory_errors_map_to_one_line(capsys, exc, code, text):
    with pytest.raises(SystemExit) as e:
        report_and_exit(exc)
    err = capsys.readouterr().err
    assert e.value.code == code and text in err and err.count("\n") == 1
    assert as_vqx_error(ValueError("x")).__class__ is ValueError  # bugs stay bugs


def test_ctrl_c_maps_to_exit_130_even_when_c_code_turned_it_into_another_error():
    from vqx.errors import Interrupted, as_vqx_error

    assert isinstance(as_vqx_error(KeyboardInterrupt()), Interrupted) and Interrupted.exit_code == 130
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
    except ValueError as e:
        assert isinstance(as_vqx_error(e), Interrupted)
    assert not isinstance(as_vqx_error(ValueError("a plain bug")), Interrupted)
