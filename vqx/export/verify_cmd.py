"""`vqx verify-export DIR`: check an export folder on its own (hashes, the lightx2v contract, lightx2v's math on
its tensors against the block outputs the evaluated model recorded into it). Exit 0 when it passes, 1 when it
does not; one line per failure."""

from __future__ import annotations

from ..errors import UserError
from ..runtime import resolve_device
from .verify import DEFAULT_TOLERANCE, verify_export

HELP = ("check an export folder: hashes, lightx2v's keys/dtypes/shapes, and lightx2v's fp32 math on its tensors "
        "against the evaluated model's recorded block outputs")


def add_arguments(parser) -> None:
    parser.add_argument("dir", help="the export folder (a run's <run_dir>/export or export.dir)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"max relative error of a block's update (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--blocks", type=int, default=None, metavar="N",
                        help="compare N evenly spread recorded blocks (default: all; every tensor is checked regardless)")
    parser.add_argument("--device", default="auto", help="where lightx2v's math runs: auto (cuda if available), cpu, cuda")
    parser.add_argument("--no-compute", action="store_true", help="skip the block comparison (files and tensors only)")


def main(args) -> int:
    if not args.tolerance > 0:
        raise UserError(f"--tolerance={args.tolerance} must be > 0")
    if args.blocks is not None and args.blocks < 1:
        raise UserError(f"--blocks={args.blocks} must be >= 1")
    resolve_device(args.device, "--device=")  # a bad value fails here, in one line
    report = verify_export(args.dir, tolerance=args.tolerance, compute=not args.no_compute,
                           device=args.device, max_blocks=args.blocks)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1
