"""Where the trained wan_mini folder lives and whether it is complete.

train.py publishes the folder in one rename, with ``training.json`` in it, so a folder that has that file
and every pipeline part is a finished training run.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..runtime import repo_path

TRAIN_COMMAND = "python -m vqx.testbed.train --out assets/wan_mini --device cuda"
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
MARKER = "training.json"  # written by train.py; its presence means the run finished
PROMPT_FILES = ("calib/prompts.json", "eval/prompts.json")


def default_folder() -> Path:
    return repo_path("assets/wan_mini")


def missing_parts(folder: Path) -> list[str]:
    """What a complete wan_mini folder has and ``folder`` lacks (empty: complete)."""
    if not folder.is_dir():
        return ["the folder itself"]
    need = ["model_index.json", MARKER, *PROMPT_FILES]
    missing = [n for n in need if not (folder / n).is_file()]
    missing += [f"{p}/" for p in PARTS if not (folder / p).is_dir()]
    return missing


def check_mini_folder(folder: Path) -> None:
    """One line naming what is missing and how to train it."""
    missing = missing_parts(folder)
    if missing:
        raise UserError(f"model=wan_mini needs a trained folder at model.path={folder}, which lacks "
                        f"{', '.join(missing[:3])}; train it with `{TRAIN_COMMAND}` (about 8 minutes on one H100; "
                        "--device cpu works but takes hours) or point model.path at a trained copy")
