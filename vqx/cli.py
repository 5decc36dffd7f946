"""The `vqx` command (also `python -m vqx`): `vqx run ARGS` is a run (Hydra's command line, as `python run.py ARGS`),
the other subcommands work around runs.

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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # Hydra parses the rest from sys.argv
        from .entry import run_command_line

        saved, sys.argv = sys.argv, ["vqx run", *argv[1:]]
        try:
            run_command_line()
        finally:
            sys.argv = saved
        return 0
    parser = argparse.ArgumentParser(prog="vqx", description="vqx: quantization experiments for Wan2.1 video diffusion models")
    parser.add_argument("--version", action="version", version=f"vqx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="a run or a sweep: vqx run [GROUP=OPTION ...] [KEY=VALUE ...] [-m] (Hydra's command "
                   "line; vqx run --help lists the groups)", add_help=False)
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
