"""Every option of every group composes and validates; bad overrides fail with one line, no traceback."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import vqx.plugins  # noqa: F401
from vqx.commands.list_options import describe
from vqx.config.schema import GROUPS, RENAMED_OPTIONS
from vqx.config.validate import validate
from vqx.errors import UserError
from vqx.models.wan.checkpoint import missing_parts
from conftest import pin_tiny

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=pin_tiny(overrides))


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    cfg = _compose(overrides)
    if cfg.model.source == "mini" and missing_parts(Path(cfg.model.path)):  # not trained yet: says how
        with pytest.raises(UserError, match="vqx.testbed.train"):
            validate(cfg)
        return
    if cfg.model.source == "diffusers":
        with pytest.raises(UserError, match="model.path"):
            validate(cfg)
        cfg = _compose(overrides + ["model.path=/data/wan"])
    validate(cfg)
    assert cfg[group].name == RENAMED_OPTIONS.get((group, option), option) or group == "algorithm"


def test_old_option_names_still_work_with_one_deprecation_line(caplog):
    cfg = _compose(["export=fake", "eval=video", "eval.backend=kernel", "format=fp8"])
    with caplog.at_level("WARNING", logger="vqx"):
        validate(cfg)
        validate(cfg)  # idempotent: the run config holds the new names only
    assert cfg.export.name == "dequantized" and cfg.eval.gemm == "kernel" and cfg.eval.backend is None
    assert [r.getMessage() for r in caplog.records] == [
        "export=fake is deprecated; use export=dequantized (the same option)",
        "eval.backend is deprecated; use eval.gemm=kernel (the same setting)"]


@pytest.mark.parametrize("override,message", [
    ("model.sampler.guidance=-1", "model.sampler.guidance=-1.0 is out of range; it must be >= 0.0"),
    ("model.sampler.height=40", "model.sampler.height=40 must be a multiple of 16"),
    ("model.sampler.num_frames=6", "must be 4k+1"),
    ("model.task=t2i", "model.task='t2i' is not valid; valid choices: t2v, i2v"),
    ("+format.bits=4", "unknown key 'format.bits'; valid keys of format: name, skip_first_blocks"),
    ("format.skip_first_blocks=-1", "format.skip_first_blocks=-1 is out of range; it must be >= 0"),
    ("format.name=int4", "format.name='int4' is unknown; valid: none, w8a8, fp8"),
    ("model.family=hunyuan", "model.family='hunyuan' has no model adapter; valid: wan"),
    ("algorithm.steps=[magic]", "algorithm step 'magic' is unknown; valid steps: awq, gptq, rtn, smoothquant"),
    ("algorithm.groups=[ffn_out]", "algorithm.groups=['ffn_out'] has unknown group 'ffn_out'; valid for model=wan_tiny: "
                                   "self_attn_in, self_attn_out, cross_attn_q, cross_attn_out, ffn_in"),
    ("algorithm.groups=[]", "algorithm.groups=[] names no group; valid for model=wan_tiny"),
])
def test_validation_messages(override, message):
    with pytest.raises(UserError) as e:
        validate(_compose([override]))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


BAD_CLI = [
    (["format=int3"], "format=int3 is not an option of 'format'; valid: fp8, fp8_b128, fp8_static, fp8_w, fp_e2m5, fp_e3m4, mxfp4, mxfp6, mxfp8, none, nvfp4, w4a16_g128, w4a8, w8a16, w8a8"),
    (["model=wan_giant"], "model=wan_giant is not an option of 'model'; valid: wan2.1_i2v_14b_480p"),
    (["+unknown_key=1"], "unknown key 'unknown_key'; valid top-level keys: model, algorithm"),
    (["format.nope=1"], "Key 'nope' not in 'FormatSchema'"),
    (["model.sampler.steps=abc"], "'abc' of type 'str' could not be converted to Integer"),
    (["model.sampler.steps=0"], "model.sampler.steps=0 is out of range; it must be >= 1"),
    (["model.dtype=int4"], "model.dtype='int4' is not valid; valid choices: bfloat16, float16, float32"),
    (["calib.capture_window=[0.5,0.2]"], "calib.capture_window=[0.5, 0.2] is not valid; use [start, end] fractions"),
    (["calib.block_objective=guided", "model.sampler.guidance=1"],
     "calib.block_objective=guided combines the two guidance branches, but calib.guidance=1.0 runs only the cond branch"),
    (["calib.block_objective=joint"], "calib.block_objective='joint' is not valid; valid choices: branches, guided"),
    (["model=wan2.1_t2v_1.3b"], "needs model.path="),
    (["model=wan2.1_t2v_1.3b", "model.path=/nonexistent/wan"], "model.path=/nonexistent/wan is not a folder; expected a local diffusers-format folder"),
]


@pytest.mark.parametrize("args,message", BAD_CLI, ids=[" ".join(a) for a, _ in BAD_CLI])
def test_bad_overrides_fail_with_one_line(vqx_run_in_process, tmp_path, args, message):
    run_dir = tmp_path / "run"
    r = vqx_run_in_process([*args, f"hydra.run.dir={run_dir}"])
    _one_line_refusal(r, message)
    assert not (run_dir / "metrics.json").exists()


def _one_line_refusal(r, message):
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vqx: error: ")
    assert message in lines[0]
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("args,message", [BAD_CLI[0], BAD_CLI[-1]], ids=["composition", "validation"])
def test_the_real_process_exits_2_with_one_line(vqx_run, tmp_path, args, message):
    """The in-process runs above are run.py's own entry; here the process itself, as a user starts it: its exit
    code and stderr for a Hydra composition error and for a vqx validation error."""
    run_dir = tmp_path / "run"
    _one_line_refusal(vqx_run([*args, f"hydra.run.dir={run_dir}"]), message)
    assert not (run_dir / "metrics.json").exists()


def test_help_is_vqxs_own_page_and_its_examples_are_valid(vqx_run_in_process):
    r = vqx_run_in_process(["--help"], pin_model=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("vqx: post-training quantization of Wan video diffusion transformers")
    assert "Compose your configuration" not in r.stdout and "schema/" not in r.stdout  # Hydra's page, its schemas
    for option in (CONF / "format").glob("*.yaml"):  # every option, with what it is (the yaml's first comment)
        assert re.search(rf"^  {re.escape(option.stem)} +{re.escape(describe(option))}$", r.stdout, re.M), option.stem
    examples = [line.strip().split()[2:] for line in r.stdout.splitlines() if line.startswith("  vqx run ")]
    assert len(examples) == 3
    for overrides in examples:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        validate(cfg)  # settings only: a real checkpoint's folder is checked when a run starts
    composed = vqx_run_in_process(["--help", "format=fp8", "calib.num_prompts=3"], pin_model=False)
    assert composed.returncode == 0 and "Defaults (override any key as KEY=VALUE):" in composed.stdout
    defaults = composed.stdout.split("Defaults (override any key as KEY=VALUE):")[1]
    assert "name: fp8\n" in defaults and "num_prompts: 3\n" in defaults and "hydra:" not in defaults


def test_bad_values_and_help_answer_before_torch_is_imported():
    """A range, a choice, an unknown option, a recipe parameter and --help are answered from the schemas alone
    (vqx.schemas): the process never imports torch (20-30 s on a busy machine) to refuse a typo."""
    code = ("import sys, runpy; sys.argv = ['run.py', *sys.argv[1:]]\n"
            "try:\n    runpy.run_path('run.py', run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code)\n"
            "print('torch imported:', 'torch' in sys.modules)")
    for args, message in [(["algorithm.alpha=7"], "algorithm.alpha=7 is out of range"),
                          (["format=bogus"], "format=bogus is not an option of 'format'"),
                          (["algorithm=gptq", "algorithm.alpha=0.5"], "algorithm.alpha is not a parameter"),
                          (["calib.capture_window=[0.5,0.2]"], "calib.capture_window=[0.5, 0.2] is not valid"),
                          (["--help"], None)]:
        r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.stdout.splitlines()[-1] == "torch imported: False", (args, r.stdout, r.stderr)
        if message:
            assert "exit 2" in r.stdout and message in r.stderr, (args, r.stdout, r.stderr)
