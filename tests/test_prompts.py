"""Prompt sets: the shipped files load and are disjoint, the I2V images are what the script draws, and
every malformed file fails with one line naming the file, the entry and what is expected."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vqx
from vqx.prompts import PromptSample, default_prompt_file, load_prompt_set
from vqx.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SEED_RANGE = "[0, 4294967295]"


def _script():
    spec = importlib.util.spec_from_file_location("make_i2v_assets", ROOT / "scripts" / "make_i2v_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png(path: Path, mode="RGB", size=(8, 6)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path.name


def _write(tmp_path: Path, doc, name="prompts.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


def _doc(task="t2v", samples=None, **top):
    if samples is None:
        samples = [{"prompt": "a red ball bounces", "seed": 1}]
    return {"version": 1, "task": task, "samples": samples, **top}


def _error(path, task="t2v", split="calib", limit=None) -> str:
    with pytest.raises(UserError) as info:
        load_prompt_set(path, task, split, limit)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- the shipped sets

SHIPPED = [("t2v", "calib", 64), ("t2v", "eval", 16), ("i2v", "calib", 16), ("i2v", "eval", 8)]


@pytest.mark.parametrize("task,split,minimum", SHIPPED, ids=[f"{t}-{s}" for t, s, _ in SHIPPED])
def test_shipped_set_loads(task, split, minimum):
    samples = load_prompt_set(None, task, split)
    assert len(samples) >= minimum
    assert len({s.prompt for s in samples}) == len(samples)  # no accidental repeats
    for s in samples:
        assert isinstance(s, PromptSample) and s.prompt and isinstance(s.seed, int)
        assert (s.image_path is not None) == (task == "i2v")
    assert load_prompt_set(default_prompt_file(task, split), task, split) == samples


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_shipped_calib_and_eval_are_disjoint(task):
    calib, evals = load_prompt_set(None, task, "calib"), load_prompt_set(None, task, "eval")
    assert not {s.prompt for s in calib} & {s.prompt for s in evals}
    if task == "i2v":
        assert not {s.image_path for s in calib} & {s.image_path for s in evals}
        pixels = {Image.open(s.image_path).tobytes() for s in calib}
        assert not any(Image.open(s.image_path).tobytes() in pixels for s in evals)


def test_shipped_i2v_images_are_rgb_832x480_and_small():
    paths = [s.image_path for split in ("calib", "eval") for s in load_prompt_set(None, "i2v", split)]
    for sample in load_prompt_set(None, "i2v", "calib") + load_prompt_set(None, "i2v", "eval"):
        img = sample.load_image()
        assert (img.mode, img.size) == ("RGB", (832, 480)), sample.image_path
        with Image.open(sample.image_path) as raw:
            assert raw.mode == "RGB"
    assert sum(Path(p).stat().st_size for p in paths) < 3_000_000


def test_default_prompt_file_is_in_the_package_assets():
    assets = Path(vqx.__file__).resolve().parent / "assets"  # shipped in the wheel; the checkout's assets/ links here
    assert default_prompt_file("t2v", "calib") == assets / "wan_t2v" / "calib" / "prompts.json"
    assert default_prompt_file("i2v", "eval") == assets / "wan_i2v" / "eval" / "prompts.json"
    with pytest.raises(UserError, match="prompt set split 'train' is not one of calib, eval"):
        default_prompt_file("t2v", "train")
    with pytest.raises(UserError, match="prompt set task 't2i' is not one of t2v, i2v"):
        load_prompt_set(None, "t2i", "calib")


# Drawn vs shipped images: Pillow versions anti-alias a few edge pixels differently, so the images are compared by
# content. Measured against the shipped files (drawn by Pillow 13.0): Pillow 11.3, 12.0 and 13.0 redraw them pixel
# for pixel; 10.4 differs in at most 3 pixels of an image (7.5e-6 of them, PSNR >= 59.5 dB); 9.5 in at most 0.10%
# (PSNR >= 39.8 dB). A drawing change is far outside: the next seed of the same scene differs in >= 56% of the
# pixels at <= 20.6 dB. Bounds: 5x the worst measured fraction, and 4.8 dB below the worst measured PSNR.
MAX_DIFFERING_PIXELS = 0.005
MIN_PSNR_DB = 35.0


def _content_difference(a: Image.Image, b: Image.Image) -> tuple[float, float]:
    """(fraction of pixels that differ, PSNR in dB) of two same-size RGB images."""
    assert (a.mode, a.size) == (b.mode, b.size)
    x, y = (np.asarray(im, dtype=np.float64) for im in (a, b))
    diff = np.abs(x - y)
    mse = float((diff ** 2).mean())
    return float((diff.max(axis=-1) > 0).mean()), (float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse))


def _same_content(a: Image.Image, b: Image.Image) -> bool:
    fraction, psnr = _content_difference(a, b)
    return fraction <= MAX_DIFFERING_PIXELS and psnr >= MIN_PSNR_DB


def test_script_redraws_the_shipped_files():
    script = _script()
    first, second = script.draw_scene("countryside", 3000), script.draw_scene("countryside", 3000)
    assert first.tobytes() == second.tobytes()
    assert script._png_bytes(first, "n") == script._png_bytes(second, "n")  # byte-identical on one machine
    assert not _same_content(script.draw_scene("countryside", 3001), first)  # the comparison tells scenes apart
    stale = []
    for split in script.SCENES:
        doc, images = script.build(split)
        folder = ROOT / "assets" / "wan_i2v" / split
        if (folder / "prompts.json").read_text(encoding="utf-8") != script.json_text(doc):
            stale.append(f"{split}/prompts.json")
        for rel, _, drawn in images:
            with Image.open(folder / rel) as shipped:
                if not _same_content(shipped.convert("RGB"), drawn):
                    stale.append(f"{split}/{rel}: {_content_difference(shipped.convert('RGB'), drawn)}")
    assert stale == [], "stale I2V assets: run python scripts/make_i2v_assets.py"


def test_script_writes_a_fresh_folder_that_loads(tmp_path):
    script = _script()
    script.sync(tmp_path)
    samples = load_prompt_set(tmp_path / "eval" / "prompts.json", "i2v", "eval")
    shipped = load_prompt_set(None, "i2v", "eval")
    assert [(s.prompt, s.seed) for s in samples] == [(s.prompt, s.seed) for s in shipped]
    with Image.open(samples[0].image_path) as fresh, Image.open(shipped[0].image_path) as committed:
        assert _same_content(fresh.convert("RGB"), committed.convert("RGB"))
    assert script.sync(tmp_path) == []  # a rerun rewrites nothing


# ---------------------------------------------------------------- well-formed files

def test_fields_paths_and_limit(tmp_path):
    _png(tmp_path / "images" / "a.png", mode="RGBA")  # alpha and palette images load as RGB
    _png(tmp_path / "images" / "b.png", mode="P")
    absolute = tmp_path / "elsewhere.png"
    _png(absolute, mode="L")
    samples = [
        {"prompt": "  a cat on a boat  ", "seed": 0, "image": "images/a.png", "negative_prompt": "blurry"},
        {"prompt": "a dog", "seed": 4294967295, "image": "images/b.png", "negative_prompt": ""},
        {"prompt": "a dog", "seed": 4294967295, "image": str(absolute)},  # duplicates are fine
    ]
    path = _write(tmp_path, _doc("i2v", samples, description="mine"))
    got = load_prompt_set(str(path), "i2v", "eval")
    assert got[0] == PromptSample("a cat on a boat", 0, str(tmp_path / "images" / "a.png"), "blurry")
    assert got[1].negative_prompt == "" and got[2].negative_prompt is None
    assert got[2].image_path == str(absolute)
    assert all(s.load_image().mode == "RGB" for s in got)
    assert load_prompt_set(path, "i2v", "eval", limit=2) == got[:2]
    assert load_prompt_set(path, "i2v", "eval", limit=3) == got


def test_version_may_be_omitted_and_bom_is_tolerated(tmp_path):
    doc = {"task": "t2v", "samples": [{"prompt": "snow falls", "seed": 3}]}
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())
    assert load_prompt_set(path, "t2v", "calib") == [PromptSample("snow falls", 3)]


def test_limit_errors(tmp_path):
    path = _write(tmp_path, _doc())
    assert _error(path, limit=2) == (f"prompt file {path} has 1 samples but 2 were asked for -- "
                                     "ask for at most 1 or add samples to the file")
    assert _error(path, limit=0).startswith("prompt limit 0 is not a positive integer")


# ---------------------------------------------------------------- malformed files: one case each

def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    assert _error(path) == (f"prompt file {path} does not exist -- pass the path of a prompts.json "
                            "(format: assets/README.md)")


def test_folder_instead_of_file(tmp_path):
    assert _error(tmp_path) == (f"prompt file {tmp_path} is not a file -- pass the path of a prompts.json, "
                                "not a folder")


def test_not_utf8(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b'{"task": "t2v",\n "samples": [{"prompt": "caf\xe9", "seed": 1}]}')
    assert _error(path) == f"prompt file {path} is not UTF-8 text (line 2, byte 44) -- save it as UTF-8 JSON"


def test_malformed_json_names_the_line(tmp_path):
    path = _write(tmp_path, '{\n  "version": 1,\n  "task": "t2v"\n  "samples": []\n}')
    assert _error(path) == (f"prompt file {path} is not valid JSON: line 4 column 3: Expecting ',' delimiter "
                            "-- fix the syntax (format: assets/README.md)")


def test_top_level_not_an_object(tmp_path):
    path = _write(tmp_path, [{"prompt": "a", "seed": 1}])
    assert _error(path) == (f'prompt file {path}: top level is a list, expected an object {{"version": 1, '
                            f'"task": "t2v"|"i2v", "samples": [{{"prompt": ..., "seed": ...}}, ...]}} '
                            f'(wrap the list as the "samples" of an object)')


def test_unknown_top_level_field(tmp_path):
    path = _write(tmp_path, _doc(sample=[]))
    assert _error(path) == (f"prompt file {path}: unknown top-level field 'sample' -- valid fields: "
                            "version, task, description, samples")


def test_no_samples_list(tmp_path):
    path = _write(tmp_path, {"version": 1, "task": "t2v"})
    assert _error(path) == (f'prompt file {path}: no "samples" list -- add "samples": '
                            '[{"prompt": ..., "seed": ...}, ...]')


def test_samples_not_a_list(tmp_path):
    path = _write(tmp_path, _doc(samples={"prompt": "a", "seed": 1}))
    assert _error(path) == (f'prompt file {path}: "samples" is an object, expected a list of '
                            '{"prompt": ..., "seed": ...} objects')


def test_empty_samples(tmp_path):
    path = _write(tmp_path, _doc(samples=[]))
    assert _error(path) == (f'prompt file {path}: "samples" is empty -- add at least one '
                            '{"prompt": ..., "seed": ...}')


def test_entry_not_an_object(tmp_path):
    path = _write(tmp_path, _doc(samples=[{"prompt": "a", "seed": 1}, "a cat"]))
    assert _error(path) == (f'prompt file {path}: samples[1] is a string, expected an object '
                            '{"prompt": ..., "seed": ...}')


def test_missing_prompt(tmp_path):
    path = _write(tmp_path, _doc(samples=[{"seed": 1}]))
    assert _error(path) == f'prompt file {path}: samples[0] has no "prompt" -- add the text prompt as a non-empty string'


def test_empty_prompt(tmp_path):
    path = _write(tmp_path, _doc(samples=[{"prompt": "a", "seed": 1}, {"prompt": "  ", "seed": 2}]))
    assert _error(path) == f"prompt file {path}: samples[1].prompt is empty -- write the text prompt"


def test_non_string_prompt(tmp_path):
    path = _write(tmp_path, _doc(samples=[{"prompt": ["a", "b"], "seed": 1}]))
    assert _error(path) == f'prompt file {path}: samples[0].prompt must be a string, got a list ["a", "b"]'


def test_missing_seed(tmp_path):
    path = _write(tmp_path, _doc(samples=[{"prompt": "a"}]))
    assert _error(path) == f'prompt file {path}: samples[0] has no "seed" -- add an integer seed in {SEED_RANGE}'


@pytest.mark.parametrize("seed,shown", [("42", 'a string "42"'), (1.5, "a number 1.5"), (True, "a boolean true"),
                                        (None, "null")])
def test_bad_seed_type(tmp_path, seed, shown):
    path = _write(tmp_path, _doc(samples=[{"prompt": "a", "seed": seed}]))
    assert _error(path) == f"prompt file {path}: samples[0].seed must be an integer in {SEED_RANGE}, got {shown}"


def test_seed_out_of_range(tmp_path):
    path = _write(tmp_path, _doc(samples=[{"prompt": "a", "seed": -1}]))
    assert _error(path) == f"prompt file {path}: samples[0].seed -1 is out of range -- use an integer in {SEED_RANGE}"


def test_bad_negative_prompt(tmp_path):
    path = _write(tmp_path, _doc(samples=[{"prompt": "a", "seed": 1, "negative_prompt": 0}]))
    assert _error(path) == f"prompt file {path}: samples[0].negative_prompt must be a string, got an integer 0"


def test_unknown_sample_field(tmp_path):
    path = _write(tmp_path, _doc(samples=[{"prompt": "a", "seed": 1, "negative": "blur"}]))
    assert _error(path) == (f"prompt file {path}: samples[0] has unknown field 'negative' -- valid fields: "
                            "prompt, seed, negative_prompt")


def test_missing_or_bad_task_and_version(tmp_path):
    no_task = _write(tmp_path, {"version": 1, "samples": []}, "a.json")
    assert _error(no_task) == f'prompt file {no_task}: no "task" field -- add "task": "t2v" (the kind of run it is for)'
    bad_task = _write(tmp_path, _doc(task="video"), "b.json")
    assert _error(bad_task) == f'prompt file {bad_task}: "task" is "video", expected "t2v" or "i2v"'
    future = _write(tmp_path, _doc(version=2), "c.json")
    assert _error(future) == (f'prompt file {future}: "version" is 2, this vqx reads version 1 -- set "version": 1 '
                              "(format: assets/README.md)")


def test_t2v_file_for_an_i2v_run(tmp_path):
    path = _write(tmp_path, _doc("t2v"))
    assert _error(path, task="i2v") == (f'prompt file {path} is a t2v prompt set ("task": "t2v") but this run is '
                                        'i2v -- pass an i2v prompt file (with an "image" in each sample)')


def test_i2v_file_for_a_t2v_run(tmp_path):
    path = _write(tmp_path, _doc("i2v", [{"prompt": "a", "seed": 1, "image": _png(tmp_path / "a.png")}]))
    assert _error(path, task="t2v") == (f'prompt file {path} is an i2v prompt set ("task": "i2v") but this run is '
                                        't2v -- pass a t2v prompt file (without images)')


def test_t2v_sample_with_an_image(tmp_path):
    path = _write(tmp_path, _doc("t2v", [{"prompt": "a", "seed": 1, "image": "a.png"}]))
    assert _error(path) == (f'prompt file {path}: samples[0].image: t2v samples take no image -- remove it, or set '
                            '"task": "i2v" and use the file for an i2v run')


def test_i2v_sample_without_image(tmp_path):
    path = _write(tmp_path, _doc("i2v", [{"prompt": "a", "seed": 1}]))
    assert _error(path, task="i2v") == (f'prompt file {path}: samples[0] has no "image" -- i2v samples need a '
                                        'conditioning image path relative to the prompt file, e.g. '
                                        '"image": "images/calib_000.png"')


def test_i2v_image_not_a_string(tmp_path):
    path = _write(tmp_path, _doc("i2v", [{"prompt": "a", "seed": 1, "image": 7}]))
    assert _error(path, task="i2v") == (f"prompt file {path}: samples[0].image must be a non-empty path string "
                                        "relative to the prompt file, got an integer 7")


def test_i2v_image_missing(tmp_path):
    path = _write(tmp_path, _doc("i2v", [{"prompt": "a", "seed": 1, "image": "images/gone.png"}]))
    full = tmp_path / "images" / "gone.png"
    assert _error(path, task="i2v") == (f"prompt file {path}: samples[0].image 'images/gone.png' ({full}) does not "
                                        "exist -- fix the path (it is relative to the prompt file)")


def test_i2v_image_unreadable(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    path = _write(tmp_path, _doc("i2v", [{"prompt": "a", "seed": 1, "image": "notes.png"}]))
    message = _error(path, task="i2v")
    assert message.startswith(f"prompt file {path}: samples[0].image 'notes.png' ({tmp_path / 'notes.png'}) is not "
                              "a readable image (UnidentifiedImageError: ")
    assert message.endswith("-- replace it with a readable RGB PNG or JPEG")


def test_i2v_image_truncated(tmp_path):
    good = tmp_path / "good.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    path = _write(tmp_path, _doc("i2v", [{"prompt": "a", "seed": 1, "image": "cut.png"}]))
    message = _error(path, task="i2v")
    assert message.startswith(f"prompt file {path}: samples[0].image 'cut.png' ({tmp_path / 'cut.png'}) is not "
                              "a readable image (")
    assert message.endswith("-- replace it with a readable RGB PNG or JPEG")


def test_load_image_errors_name_the_file(tmp_path):
    image = tmp_path / "a.png"
    _png(image)
    sample = load_prompt_set(_write(tmp_path, _doc("i2v", [{"prompt": "a", "seed": 1, "image": "a.png"}])),
                             "i2v", "calib")[0]
    image.unlink()  # removed between loading the set and using it
    with pytest.raises(UserError) as info:
        sample.load_image()
    assert str(info.value) == (f"conditioning image {image} does not exist -- it was there when the prompt set "
                               "was loaded; restore it")
    with pytest.raises(UserError, match="prompt 'a cat' has no conditioning image"):
        PromptSample("a cat", 1).load_image()
