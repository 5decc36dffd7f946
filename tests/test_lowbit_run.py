"""Every low-bit format end to end on the tiny Wan models (CPU, eager fake quantization)."""

import json

import pytest

LOWBIT = ["nvfp4", "mxfp8", "mxfp6", "mxfp4", "w4a16_g128", "w4a8", "fp8_static", "fp8_b128"]
LINEARS = {"wan_tiny": 20, "wan_tiny_i2v": 24}


@pytest.mark.parametrize("model", ["wan_tiny", "wan_tiny_i2v"])
def test_every_lowbit_format_runs_end_to_end(vqx_run, tmp_path, model):
    r = vqx_run(["-m", f"model={model}", f"format={','.join(LOWBIT)}", "algorithm=rtn", "export=none", "eval=none",
                 "logger=none", f"hydra.sweep.dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    seen = {}
    for job in sorted(p for p in tmp_path.iterdir() if p.name.isdigit()):
        m = json.loads((job / "metrics.json").read_text())
        seen[m["format"]] = m
        assert m["quantized_layers"] == LINEARS[model]
        errors = [layer["output_error"] for layer in m["layers"]]
        assert len(errors) == LINEARS[model] and all(0 < e < 0.5 for e in errors), (m["format"], errors)
    assert sorted(seen) == sorted(LOWBIT)
    # more bits, less error (same weights, same calibration): the grids are ordered as they should be
    err = {f: seen[f]["layer_error"]["mean"] for f in LOWBIT}
    assert err["mxfp8"] < err["mxfp6"] < err["mxfp4"] and err["nvfp4"] < err["mxfp4"]
    assert err["w4a16_g128"] < err["w4a8"]
    # calibrated activation values were recorded for the formats that have them (per input group)
    for f in ("nvfp4", "fp8_static"):
        groups = seen[f]["groups"]
        assert groups and all(g["act_absmax"] > 0 for g in groups), f
    assert not any("act_absmax" in g for g in seen["mxfp8"]["groups"])


def test_awq_with_group_clipping_then_gptq_beats_rounding_for_every_lowbit_format(vqx_run, tmp_path):
    r = vqx_run(["-m", "model=wan_tiny", f"format={','.join(LOWBIT)}", "algorithm=awq_gptq", "algorithm.clip=true",
                 "export=none", "eval=none", "logger=none", f"hydra.sweep.dir={tmp_path}",
                 f"cache_dir={tmp_path / 'cache'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    seen = set()
    for job in sorted(p for p in tmp_path.iterdir() if p.name.isdigit()):
        m = json.loads((job / "metrics.json").read_text())
        seen.add(m["format"])
        assert m["layer_error"]["mean"] < 0.9 * m["layer_error_rtn"]["mean"], m["format"]
        assert all(layer.get("method") == "gptq" for layer in m["layers"])
    assert seen == set(LOWBIT)
