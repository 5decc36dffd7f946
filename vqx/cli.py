"""The `vqx` command (also `python -m vqx`): subcommands around runs. Runs themselves are `python run.py`.

Each subcommand lives in its own module with ``HELP``, ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import report_and_exit

SUBCOMMANDS = {
    "list": "vqx.commands.list_options",
    "score": "vqx.eval.score",
    "compare": "vqx.track.compare",
    "verify-export": "vqx.export.verify_cmd",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vqx", description="vqx: quantization experiments for Wan2.1 video diffusion models")
    parser.add_argument("--version", action="version", version=f"vqx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].main(args) or 0)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001  (one line, exit 2 for user errors, 1 for faults)
        report_and_exit(e)


if __name__ == "__main__":
    sys.exit(main())
