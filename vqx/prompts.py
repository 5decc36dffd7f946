"""Prompt sets for calibration and evaluation: a JSON file of prompts with fixed seeds (and, for I2V,
conditioning images), loaded and checked in full before any model is built.

The format is documented in assets/README.md. Every problem is a one-line `UserError` that names the
file, the entry (``samples[3].seed``) and what is expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .errors import UserError
from .runtime import package_path

__all__ = ["PromptSample", "default_prompt_file", "load_prompt_set"]

TASKS = ("t2v", "i2v")
SPLITS = ("calib", "eval")
FORMAT_VERSION = 1
# numpy's and most tools' seed range; torch accepts it too, so a seed means the same thing everywhere.
SEED_MAX = 2**32 - 1

_TOP_KEYS = ("version", "task", "description", "samples")
_SAMPLE_KEYS = {"t2v": ("prompt", "seed", "negative_prompt"), "i2v": ("prompt", "seed", "image", "negative_prompt")}
_FORMAT_HINT = "format: assets/README.md"


@dataclass(frozen=True)
class PromptSample:
    prompt: str
    seed: int
    image_path: str | None = None  # absolute path, i2v only
    # None: use the run's default negative prompt; a string (even "") replaces it for this sample.
    negative_prompt: str | None = None

    def load_image(self) -> "Image.Image":
        """The conditioning image as RGB (EXIF rotation applied, alpha dropped)."""
        if self.image_path is None:
            raise UserError(f"prompt {self.prompt[:60]!r} has no conditioning image -- "
                            "image-to-video needs an i2v prompt set whose samples have an \"image\"")
        try:
            return _read_rgb(Path(self.image_path))
        except _ImageProblem as exc:
            fix = ("it was there when the prompt set was loaded; restore it" if exc.missing
                   else "replace it with a readable RGB PNG or JPEG")
            raise UserError(f"conditioning image {self.image_path} {exc} -- {fix}") from None


def default_prompt_file(task: str, split: str) -> Path:
    """assets/wan_{task}/{split}/prompts.json, shipped inside the vqx package."""
    _check_choice("task", task, TASKS)
    _check_choice("split", split, SPLITS)
    return package_path(f"assets/wan_{task}/{split}/prompts.json")


def load_prompt_set(path: str | Path | None, task: str, split: str, limit: int | None = None) -> list[PromptSample]:
    """Read and validate a prompt set; ``path=None`` is the shipped default for (task, split).

    The whole file is checked, images included (opened and decoded), so a bad entry stops the run before
    any model is built. ``limit`` keeps the first ``limit`` samples and must not exceed the file's count,
    so a run never silently calibrates on fewer prompts than it asked for.
    """
    _check_choice("task", task, TASKS)
    _check_choice("split", split, SPLITS)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"prompt limit {limit!r} is not a positive integer -- pass a sample count >= 1 "
                        "or no limit to use the whole prompt set")

    if path is None:
        file = default_prompt_file(task, split)
        if not file.is_file():
            raise UserError(f"default {task} {split} prompt file {file} is missing -- the vqx package ships it; "
                            "reinstall vqx or pass a prompt file")
    else:
        file = Path(path).expanduser().resolve()
    data = _read_json(file)
    samples = _parse(data, file, task)

    if limit is not None:
        if limit > len(samples):
            raise UserError(f"prompt file {file} has {len(samples)} samples but {limit} were asked for -- "
                            f"ask for at most {len(samples)} or add samples to the file")
        samples = samples[:limit]
    return samples


class _ImageProblem(Exception):
    """Why an image cannot be used; callers add which file and entry it is."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def _read_rgb(path: Path) -> Image.Image:
    if not path.exists():
        raise _ImageProblem("does not exist", missing=True)
    if not path.is_file():
        raise _ImageProblem("is not a file")
    # PIL signals bad data with many exception types (OSError, SyntaxError, struct.error, zlib.error,
    # DecompressionBombError, ...); for "can this file be used" any of them means no.
    try:
        with Image.open(path) as im:
            im.verify()  # checksums and structure, without decoding pixels
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")  # full decode: catches truncated data
    except Exception as exc:  # noqa: BLE001 -- see above
        raise _ImageProblem(f"is not a readable image ({type(exc).__name__}: {_short(exc)})") from None
    if rgb.width < 1 or rgb.height < 1:
        raise _ImageProblem(f"has no pixels ({rgb.width}x{rgb.height})")
    return rgb


def _read_json(file: Path) -> Any:
    if not file.exists():
        raise UserError(f"prompt file {file} does not exist -- pass the path of a prompts.json ({_FORMAT_HINT})")
    if not file.is_file():
        raise UserError(f"prompt file {file} is not a file -- pass the path of a prompts.json, not a folder")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read prompt file {file}: {exc.strerror or exc} -- check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM from editors that write one
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"prompt file {file} is not UTF-8 text (line {line}, byte {exc.start}) -- "
                        "save it as UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"prompt file {file} is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg} "
                        f"-- fix the syntax ({_FORMAT_HINT})") from None


def _parse(data: Any, file: Path, task: str) -> list[PromptSample]:
    where = f"prompt file {file}"
    shape = '{"version": 1, "task": "t2v"|"i2v", "samples": [{"prompt": ..., "seed": ...}, ...]}'
    if not isinstance(data, dict):
        hint = " (wrap the list as the \"samples\" of an object)" if isinstance(data, list) else ""
        raise UserError(f"{where}: top level is {_kind(data)}, expected an object {shape}{hint}")
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown top-level field {unknown[0]!r} -- valid fields: {', '.join(_TOP_KEYS)}")

    version = data.get("version", FORMAT_VERSION)
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise UserError(f"{where}: \"version\" is {json.dumps(version)}, this vqx reads version {FORMAT_VERSION} "
                        f"-- set \"version\": {FORMAT_VERSION} ({_FORMAT_HINT})")
    if "task" not in data:
        raise UserError(f"{where}: no \"task\" field -- add \"task\": \"{task}\" (the kind of run it is for)")
    file_task = data["task"]
    if file_task not in TASKS:
        raise UserError(f"{where}: \"task\" is {json.dumps(file_task)}, expected \"t2v\" or \"i2v\"")
    if file_task != task:
        need = "with an \"image\" in each sample" if task == "i2v" else "without images"
        raise UserError(f"{where} is {_a(file_task)} prompt set (\"task\": \"{file_task}\") but this run is {task} "
                        f"-- pass {_a(task)} prompt file ({need})")
    desc = data.get("description")
    if desc is not None and not isinstance(desc, str):
        raise UserError(f"{where}: \"description\" must be a string, got {_kind(desc)}")

    if "samples" not in data:
        raise UserError(f"{where}: no \"samples\" list -- add \"samples\": [{{\"prompt\": ..., \"seed\": ...}}, ...]")
    raw_samples = data["samples"]
    if not isinstance(raw_samples, list):
        raise UserError(f"{where}: \"samples\" is {_kind(raw_samples)}, expected a list of "
                        "{\"prompt\": ..., \"seed\": ...} objects")
    if not raw_samples:
        raise UserError(f"{where}: \"samples\" is empty -- add at least one {{\"prompt\": ..., \"seed\": ...}}")
    return [_parse_sample(entry, i, file, task) for i, entry in enumerate(raw_samples)]


def _parse_sample(entry: Any, i: int, file: Path, task: str) -> PromptSample:
    at = f"prompt file {file}: samples[{i}]"
    if not isinstance(entry, dict):
        raise UserError(f"{at} is {_kind(entry)}, expected an object {{\"prompt\": ..., \"seed\": ...}}")
    valid = _SAMPLE_KEYS[task]
    for key in entry:
        if key not in valid:
            if key == "image" and task == "t2v":
                raise UserError(f"{at}.image: t2v samples take no image -- remove it, or set \"task\": \"i2v\" "
                                "and use the file for an i2v run")
            raise UserError(f"{at} has unknown field {key!r} -- valid fields: {', '.join(valid)}")

    if "prompt" not in entry:
        raise UserError(f"{at} has no \"prompt\" -- add the text prompt as a non-empty string")
    prompt = entry["prompt"]
    if not isinstance(prompt, str):
        raise UserError(f"{at}.prompt must be a string, got {_got(prompt)}")
    if not prompt.strip():
        raise UserError(f"{at}.prompt is empty -- write the text prompt")

    if "seed" not in entry:
        raise UserError(f"{at} has no \"seed\" -- add an integer seed in [0, {SEED_MAX}]")
    seed = entry["seed"]
    # bool is an int subclass in Python and 1.0 parses as float: both are typos for a seed.
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{at}.seed must be an integer in [0, {SEED_MAX}], got {_got(seed)}")
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"{at}.seed {seed} is out of range -- use an integer in [0, {SEED_MAX}]")

    negative = entry.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise UserError(f"{at}.negative_prompt must be a string, got {_got(negative)}")

    image_path = None
    if task == "i2v":
        if "image" not in entry:
            raise UserError(f"{at} has no \"image\" -- i2v samples need a conditioning image path "
                            "relative to the prompt file, e.g. \"image\": \"images/calib_000.png\"")
        rel = entry["image"]
        if not isinstance(rel, str) or not rel.strip():
            raise UserError(f"{at}.image must be a non-empty path string relative to the prompt file, "
                            f"got {_got(rel)}")
        image = (file.parent / rel).resolve()  # an absolute "image" stays as it is
        try:
            _read_rgb(image)
        except _ImageProblem as exc:
            fix = ("fix the path (it is relative to the prompt file)" if exc.missing
                   else "replace it with a readable RGB PNG or JPEG")
            raise UserError(f"{at}.image {rel!r} ({image}) {exc} -- {fix}") from None
        image_path = str(image)

    return PromptSample(prompt=prompt.strip(), seed=seed, image_path=image_path, negative_prompt=negative)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"prompt set {name} {value!r} is not one of {', '.join(choices)}")


def _a(task: str) -> str:
    return f"an {task}" if task == "i2v" else f"a {task}"


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _got(value: Any) -> str:
    return "null" if value is None else f"{_kind(value)} {_short_json(value)}"


def _short_json(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 120 else text[:117] + "..."
