"""wan_mini: procedural data, prompt-following score, training into a loadable folder, the trained assets."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from vqx.errors import UserError
from vqx.testbed import data, score
from vqx.models.wan.checkpoint import check_mini_folder, missing_parts
from vqx.testbed.folder import default_folder

# Tiny sizes: a full train -> save -> load -> sample -> score run in seconds on a CPU.
TINY = ["--device", "cpu", "--size", "32", "--frames", "5", "--vae-frames", "5", "--vae-dim", "4", "--dim", "32",
        "--heads", "2",
        "--layers", "1", "--ffn", "64", "--text-dim", "16", "--vae-batch-size", "1", "--batch-size", "2",
        "--pool", "4", "--refresh", "2", "--refresh-every", "2", "--sample-steps", "2", "--score-samples", "1"]


def _frames(video: torch.Tensor) -> np.ndarray:
    return ((video + 1) / 2).permute(0, 2, 3, 4, 1).numpy()


def test_clips_are_seeded_and_in_range():
    a = data.sample_clips(6, torch.Generator().manual_seed(3))
    b = data.sample_clips(6, torch.Generator().manual_seed(3))
    c = data.sample_clips(6, torch.Generator().manual_seed(4))
    va, alpha = data.render(a, 64, 17)
    assert va.shape == (6, 3, 17, 64, 64) and alpha.shape == (6, 1, 17, 64, 64)
    assert torch.equal(va, data.render(b, 64, 17)[0]) and a.prompts() == b.prompts()
    assert not torch.equal(va, data.render(c, 64, 17)[0])
    assert va.min() >= -1 and va.max() <= 1
    assert (alpha.flatten(2).amax(dim=2) > 0.99).all()  # the object is in every frame


def test_prompts_follow_the_grammar_and_the_tokenizer_knows_every_word():
    prompts = data.all_prompts()
    assert len(prompts) == len(set(prompts)) == data.NUM_PROMPTS
    clips = data.sample_clips(32, torch.Generator().manual_seed(0))
    assert [prompts[i] for i in data.prompt_index(clips.labels)] == clips.prompts()
    assert torch.equal(data.labels_of(clips.prompts()), clips.labels)
    tok = data.build_tokenizer()
    unk = tok.convert_tokens_to_ids("<unk>")
    assert all(unk not in tok(p).input_ids for p in prompts)
    assert data.parse_prompt("a purple cat") is None
    calib, evals = data.prompt_sets()
    assert len(calib) >= 32 and len(evals) >= 8
    assert not {s["prompt"] for s in calib} & {s["prompt"] for s in evals}
    # more eval prompts extend the 8 (the bench's --samples): distinct through the cycle of 60, none a calib prompt
    more = data.eval_prompts(60)
    assert more[:8] == [s["prompt"] for s in evals] and len(set(more)) == 60
    assert not set(more) & {s["prompt"] for s in calib}
    with pytest.raises(ValueError, match="61 eval prompts: the grammar's cycle has 60"):
        data.eval_prompts(61)


def test_score_is_perfect_on_ground_truth_and_low_on_noise():
    clips = data.sample_clips(60, torch.Generator().manual_seed(1))
    videos = _frames(data.render(clips, 64, 17)[0])
    summary = score.summarize([score.score_video(v, p) for v, p in zip(videos, clips.prompts())])
    assert summary["mean"] == 1.0, summary
    gray = np.random.default_rng(0).uniform(0.3, 0.6, (17, 64, 64, 1)).repeat(3, axis=-1).astype(np.float32)
    miss = score.score_video(gray, clips.prompts()[0])
    assert not (miss["color"] or miss["direction"] or miss["shape"])
    # a clip shown backwards moves the other way
    flipped = score.score_video(videos[0][::-1], clips.prompts()[0])
    assert flipped["color"] and flipped["shape"] and not flipped["direction"]


def test_score_reads_no_object_from_scattered_pixels():
    # saturated specks in the four corners: no blob around their median, so no object (an untrained model's frames)
    video = np.zeros((5, 64, 64, 3), np.float32)
    for y in (0, 61):
        for x in (0, 61):
            video[:, y:y + 3, x:x + 3] = (1.0, 0.0, 0.0)
    assert score.read_video(video) == score.Reading(None, None, None, 0.0)


def test_prompt_table_matches_the_pipeline_encoding():
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from vqx.testbed.train import TEXT_LEN, build_models, parse_args, prompt_table

    import inspect

    # training pads prompts to TEXT_LEN tokens: it must be what WanPipeline.__call__ pads to when sampling
    assert inspect.signature(WanPipeline.__call__).parameters["max_sequence_length"].default == TEXT_LEN
    args = parse_args(["--out", "unused", *TINY])
    tok = data.build_tokenizer()
    text_encoder, vae, transformer = build_models(args, len(tok))
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder.float(), vae=vae, transformer=transformer,
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True))
    table, length = prompt_table(pipe, torch.device("cpu"))
    assert table.shape[:2] == (data.NUM_PROMPTS + 1, length)
    picks = [0, 1234, data.NUM_PROMPTS - 1]
    prompts = [data.all_prompts()[i] for i in picks]
    full, neg = pipe.encode_prompt(prompts, negative_prompt="", max_sequence_length=TEXT_LEN, device="cpu",
                                   dtype=torch.float32)  # as WanPipeline.__call__ does
    assert full.shape[1] == TEXT_LEN
    padded = torch.nn.functional.pad(table, (0, 0, 0, TEXT_LEN - length))
    torch.testing.assert_close(padded[picks], full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[-1:].expand_as(neg), neg, atol=1e-5, rtol=1e-5)  # the CFG-dropout prompt


@pytest.mark.slow  # three short trainings
def test_training_writes_a_loadable_folder(tmp_path):
    from diffusers import WanPipeline
    from omegaconf import OmegaConf

    from vqx.models.loading import load_pipeline
    from vqx.models.sampling import SamplerSettings, generate
    from vqx.testbed.train import main

    out = tmp_path / "wan_mini"
    # many planned steps, a budget of ~1 s: the stages stop early, record it, and the folder is still complete
    main(["--out", str(out), *TINY, "--steps-vae", "100000", "--steps-transformer", "100000", "--time-budget-s", "1"])
    assert missing_parts(out) == []
    info = json.loads((out / "training.json").read_text())
    for stage in ("vae", "transformer"):
        s = info["stages"][stage]
        assert s["stopped_early"] and 1 <= s["steps"] < 100000 and np.isfinite(s["final_loss"])
    assert info["score"]["n"] == 9 and info["score"]["ground_truth"]["mean"] > 0.9
    for name in ("model_card.md", "loss_curve.png", "samples/grid.png", "samples/samples.mp4"):
        assert (out / name).stat().st_size > 0
    assert max(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 15 * 2**20
    index = json.loads((out / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]  # loads in transformers 4 and 5

    pipe = WanPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.vae.config.latents_mean == info["latents_mean"]
    cfg = OmegaConf.create({"family": "wan", "source": "mini", "task": "t2v", "path": str(out), "dtype": "bfloat16", "device": "cpu",
                            "seed": 0})
    video = generate(load_pipeline(cfg), data.all_prompts()[0], SamplerSettings(32, 32, 5, 2, 5.0, 3.0), seed=0)
    assert video.shape == (5, 32, 32, 3) and np.isfinite(video).all()

    # a second run replaces the earlier wan_mini folder; another folder is refused
    argv = ["--out", str(out), *TINY, "--steps-vae", "1", "--steps-transformer", "1", "--score-samples", "0",
            "--note", "a test's run, 2 steps"]
    main(argv)
    info = json.loads((out / "training.json").read_text())
    assert info["stages"]["vae"]["steps"] == 1
    # what ran, as typed, and the note: the script records them, so training.json is never edited by hand
    assert info["command"] == shlex.join(["python", "-m", "vqx.testbed.train", *argv])
    assert info["note"] == "a test's run, 2 steps" and info["args"]["out"] == str(out)
    card = (out / "model_card.md").read_text()
    assert f"- command: `{info['command']}`" in card and "- note: a test's run, 2 steps" in card
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a wan_mini folder"):
        main(["--out", str(other), *TINY])
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("flag,value,message", [
    ("--frames", "6", "--frames 6 must be 4k+1"),
    ("--size", "40", "--size 40 must be a multiple of 16"),
    ("--heads", "3", "--dim 32 must split into --heads 3"),
    ("--device", "tpu", "--device 'tpu' is not a device"),
])
def test_bad_arguments_fail_in_one_line(tmp_path, flag, value, message):
    from vqx.testbed.train import main

    with pytest.raises(UserError) as e:
        main(["--out", str(tmp_path / "m"), *TINY, flag, value])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_folder_says_how_to_train(tmp_path):
    from hydra import compose, initialize_config_dir

    import vqx.plugins  # noqa: F401
    from vqx.config.validate import validate

    with pytest.raises(UserError, match="python -m vqx.testbed.train --out assets/wan_mini") as e:
        check_mini_folder(tmp_path / "absent")
    assert "\n" not in str(e.value)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="lacks training.json"):
        check_mini_folder(tmp_path / "half")
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=wan_mini", f"model.path={tmp_path / 'absent'}"])
    assert cfg.calib.path == str(tmp_path / "absent" / "calib" / "prompts.json")  # the model's own prompt sets
    assert cfg.eval.path == str(tmp_path / "absent" / "eval" / "prompts.json")
    with pytest.raises(UserError, match="vqx.testbed.train"):
        validate(cfg)


def test_committed_wan_mini_is_complete_small_and_the_default():
    from hydra import compose, initialize_config_dir

    folder = default_folder()
    assert missing_parts(folder) == []
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert {"model_card.md", "loss_curve.png", "grid.png", "samples.mp4", "training.json"} <= {p.name for p in files}
    info = json.loads((folder / "training.json").read_text())
    assert info["score"]["mean"] >= 2 * info["score"]["mean_chance"]
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        assert compose(config_name="config").model.name == "wan_mini"


def test_trained_wan_mini_follows_its_prompts():
    from hydra import compose, initialize_config_dir

    import vqx.plugins  # noqa: F401
    from vqx.prompts import load_prompt_set
    from vqx.config.validate import validate
    from vqx.models.loading import load_pipeline
    from vqx.models.sampling import SamplerSettings, generate

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=wan_mini", "model.device=cpu"])
    validate(cfg)
    assert len(load_prompt_set(cfg.calib.path, "t2v", "calib")) >= 32
    samples = load_prompt_set(cfg.eval.path, "t2v", "eval")
    assert len(samples) >= 8
    pipe = load_pipeline(cfg.model)
    settings = SamplerSettings.from_config(cfg.model.sampler)
    scores = [score.score_video(generate(pipe, s.prompt, settings, s.seed), s.prompt) for s in samples[:4]]
    summary = score.summarize(scores)
    assert summary["mean"] >= 2 * summary["mean_chance"], summary  # chance: 0.25
