"""`python run.py` end to end, as a user runs it (a new process; the format-selection cases through run.py's own
entry in the test process, which is the same code without the interpreter start-up)."""

import json

import pytest

from vqx.models.wan.layers import BLOCK_LINEARS_I2V_EXTRA, BLOCK_LINEARS_T2V

SPINE_ONLY = ["algorithm=rtn", "export=none", "eval=none", "logger=none"]  # the quantization spine alone
# RTN's relative layer output errors with the tiny models' default calibration (2 prompts x 10 steps), measured on
# wan_tiny and wan_tiny_i2v: w8a8 0.0033-0.0105, fp8 0.0123-0.0366. Bounds: half the smallest, 1.6x the largest.
LAYER_ERROR_BOUNDS = {"w8a8": (0.0016, 0.017), "fp8": (0.006, 0.06)}


@pytest.mark.parametrize("model,fmt,per_block", [
    ("wan_tiny", "w8a8", len(BLOCK_LINEARS_T2V)),
    ("wan_tiny", "fp8", len(BLOCK_LINEARS_T2V)),
    ("wan_tiny_i2v", "w8a8", len(BLOCK_LINEARS_T2V) + len(BLOCK_LINEARS_I2V_EXTRA)),
])
def test_run_writes_metrics(vqx_run, tmp_path, model, fmt, per_block):
    r = vqx_run([*SPINE_ONLY, f"model={model}", f"format={fmt}", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "complete" and m["format"] == fmt and m["model"] == model
    assert m["quantized_layers"] == 2 * per_block == len(m["layers"])
    low, high = LAYER_ERROR_BOUNDS[fmt]
    for layer in m["layers"]:
        assert low < layer["output_error"] < high, layer
    assert m["timings"]["total_s"] > 0
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "run.log").is_file()


def test_format_none_quantizes_nothing(vqx_run_in_process, tmp_path):
    r = vqx_run_in_process([*SPINE_ONLY, "format=none", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["quantized_layers"] == 0


def test_skip_blocks_and_patterns(vqx_run_in_process, tmp_path):
    r = vqx_run_in_process([*SPINE_ONLY, "format.skip_first_blocks=1", "format.skip_patterns=[*.ffn.*]", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    # block 0 is skipped whole; in block 1 the FFN linears stay float but are still worked on (their input
    # groups' transforms stay exact), so they are reported without an RTN error
    assert m["quantized_layers"] == 8 and all(e["name"].startswith("blocks.1.") for e in m["layers"])
    quantized = [e["name"] for e in m["layers"] if "output_error_rtn" in e]
    assert len(quantized) == 8 and not any(".ffn." in n for n in quantized)
    assert sorted(e["name"] for e in m["layers"] if "output_error_rtn" not in e) == ["blocks.1.ffn.net.0.proj",
                                                                                     "blocks.1.ffn.net.2"]


def test_multirun_makes_one_dir_per_job(vqx_run, tmp_path):
    r = vqx_run(["-m", *SPINE_ONLY, "format=w8a8,fp8", f"hydra.sweep.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr
    formats = sorted(json.loads((tmp_path / str(i) / "metrics.json").read_text())["format"] for i in (0, 1))
    assert formats == ["fp8", "w8a8"]


@pytest.mark.slow  # the whole default job on wan_mini: about a minute
def test_default_run_is_the_whole_job(vqx_run, tmp_path):
    """No overrides: calibrate, SmoothQuant then GPTQ at W8A8, verified lightx2v export, video scores, offline W&B."""
    run_dir = tmp_path / "run"
    r = vqx_run([f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"], env={"WANDB_API_KEY": ""},
                pin_model=False)
    assert r.returncode == 0, r.stderr
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["algorithm"] == "smoothquant_gptq" and m["format"] == "w8a8" and m["model"] == "wan_mini"
    assert m["calibration"]["calls"] > 0 and m["groups"]
    for key in ("lpips", "psnr", "ssim"):
        assert m[key] == m[key] and m["noise_floor"][key] == m["noise_floor"][key]  # present, not NaN
    assert (run_dir / "export" / "manifest.json").is_file() and (run_dir / "export" / "config.json").is_file()
    assert any((run_dir / "videos").glob("*side_by_side*.mp4"))
    assert (run_dir / "wandb").is_dir()
