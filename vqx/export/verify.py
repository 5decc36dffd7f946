"""Check an export folder: its manifest, then the checks of its kind (`VERIFIERS`, keyed by the manifest's ``kind``).

1. ``manifest.json`` (every kind): every file present with its hash and size, no unlisted file;
2. the kind's verifier: ``lightx2v`` (`lightx2v_verify`: the lightx2v contract, then lightx2v's math against
   vqx's fake quant, `block_compare`); ``dequantized`` (`dequantized`; ``fake`` before the rename: a key/shape
   check against diffusers' model for its config).
Every failure is one line in the `Report`.
"""

from __future__ import annotations

from pathlib import Path

from . import dequantized, diffusers_torchao, lightx2v_verify  # noqa: F401  (register their verifiers)
from .schemas import DEFAULT_TOLERANCE
from .checks import VERIFIERS, Report, VerifyJob
from .manifest import check_files, read_manifest


def verify_export(folder: str | Path, *, tolerance: float = DEFAULT_TOLERANCE, compute: bool = True,
                  device: str | None = None, max_blocks: int | None = None) -> Report:
    """Check an export folder on its own. ``device``: where lightx2v's math runs (default cuda if available);
    ``max_blocks``: compare that many evenly spread recorded blocks (default all; every tensor of every block is
    checked regardless)."""
    folder = Path(folder)
    report = Report(folder, tolerance)
    manifest, problems = read_manifest(folder)
    report.problems += problems
    if manifest is None:
        return report
    report.kind = manifest.get("kind")
    report.problems += check_files(folder, manifest)
    verifier = VERIFIERS.get(report.kind)
    if verifier is None:
        report.problems.append(f"manifest kind={report.kind!r} is not valid; valid: {', '.join(sorted(VERIFIERS))}")
        return report
    files = sorted(n for n in manifest["files"] if n.endswith(".safetensors") and (folder / n).is_file())
    verifier(VerifyJob(folder, manifest, files, compute, device, max_blocks), report)
    return report
