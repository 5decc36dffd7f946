"""`vqx list`: the config groups, their options and what each option is (its yaml's first comment)."""

from __future__ import annotations

from pathlib import Path

from ..config.schema import GROUPS
from ..runtime import package_path

HELP = "list config groups and their options"
CONF_DIR = package_path("conf")


def describe(option_file: Path) -> str:
    first = option_file.read_text().splitlines()[:1]
    return first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""


def add_arguments(parser) -> None:
    parser.add_argument("group", nargs="?", choices=GROUPS, help="only this group")


def main(args) -> int:
    for group in [args.group] if args.group else GROUPS:
        print(f"{group}:")
        for f in sorted((CONF_DIR / group).glob("*.yaml")):
            print(f"  {f.stem:<22} {describe(f)}")
    return 0
