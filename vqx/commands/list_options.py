"""`vqx list`: the config groups, their options and what each option is (its yaml's first comment), and the ready
sweeps (`vqx run -m +sweep=NAME`)."""

from __future__ import annotations

from pathlib import Path

from ..config.schema import GROUPS
from ..runtime import package_path

HELP = "list config groups and their options"
CONF_DIR = package_path("conf")
SWEEP_DIR = package_path("sweeps/sweep")
SWEEPS = "sweep"  # listed after the groups: +sweep=NAME, not GROUP=OPTION


def describe(option_file: Path) -> str:
    """The file's first comment line (Hydra's ``# @package`` directive skipped)."""
    for line in option_file.read_text().splitlines():
        if not line.startswith("#"):
            return ""
        if not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


def add_arguments(parser) -> None:
    parser.add_argument("group", nargs="?", choices=[*GROUPS, SWEEPS], help="only this group (sweep: the ready sweeps)")


def listing(groups: list[str]) -> str:
    """Each group's options with what each is (the ready sweeps under ``sweep``), one per line."""
    lines = []
    for group in groups:
        folder = SWEEP_DIR if group == SWEEPS else CONF_DIR / group
        lines.append(f"{group}:" if group != SWEEPS else "sweep (vqx run -m +sweep=NAME):")
        lines += [f"  {f.stem:<22} {describe(f)}".rstrip() for f in sorted(folder.glob("*.yaml"))]
    return "\n".join(lines)


def main(args) -> int:
    print(listing([args.group] if args.group else [*GROUPS, SWEEPS]))
    return 0
