"""``logger=wandb``'s settings, registered without importing torch or wandb so a bad value is refused before the
heavy imports; the logger is `wandb_logger.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config.schema import choice, register_schema

MODES = ("auto", "online", "offline", "disabled")


@dataclass
class WandbLoggerSchema:
    name: str = "wandb"
    project: str = "vqx"
    entity: Optional[str] = None  # W&B user or team; None: the account's default
    mode: str = choice(*MODES)  # auto: online with credentials, else offline
    group: Optional[str] = None  # None: the multirun's sweep dir (single runs: no group)
    tags: list[str] = field(default_factory=list)
    log_videos: bool = True  # upload eval's side-by-side videos


register_schema("logger", "wandb", WandbLoggerSchema)
