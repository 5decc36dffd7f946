"""The exporters' settings (``export=lightx2v``, ``export=dequantized``), registered without importing torch so a bad
value is refused before the heavy imports; the exporters themselves are `lightx2v.py` and `dequantized.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config.schema import RENAMED_OPTIONS, bounded, choice, register_schema
from .folder import ExportFolderSchema

# The verifier's bound on a block's relative error (`block_compare`). Measured on correct exports (bench/verify_floor.py;
# bench/results/verify_floor*.json): 1.9e-7 to 5.9e-7 (fp32 summation order; wan_tiny to Wan2.1 14B, int8 and fp8, CPU
# and H200). The weakest value error measured, a 1% error in the scales of one q/k projection (whose RMSNorm all but
# removes it), moves a 14B block's output by 8.7e-6; every other kind moves codes or scales. 3e-6 is 5x the worst
# correct export. Low-bit exports of wan_mini: 0 on the device that recorded them where the lockstep supplies the
# recorded activation (every block op of lightx2v_math then rounds as the diffusers block does), up to 4.5e-7 with
# Marlin's weight-only layers; H200-made exports checked on a CPU up to 5.3e-7
# (bench/results/verify_floor_lowbit_gpu.json).
DEFAULT_TOLERANCE = 3e-6
DEQUANTIZED = "dequantized"  # the option's name and the manifest's kind
TORCHAO = "torchao"  # likewise


@dataclass
class LightX2VExportSchema(ExportFolderSchema):
    name: str = "lightx2v"
    layout: str = choice("single", "blocks")  # blocks: block_{i}.safetensors + non_block.safetensors + index
    dtype: str = choice("bfloat16", "float32")  # float tensors the evaluated model holds in 16 bits (fp32 ones stay fp32)
    verify: bool = True  # check the folder (and lightx2v's math against the evaluated blocks) before it lands
    verify_tolerance: float = bounded(DEFAULT_TOLERANCE, 0.0, None, exclusive_low=True)  # max relative error per block
    verify_blocks: Optional[int] = bounded(None, 1, None)  # record (and compare) this many evenly spread blocks; null: all


@dataclass
class DequantizedExportSchema(ExportFolderSchema):
    name: str = DEQUANTIZED


@dataclass
class TorchaoExportSchema(ExportFolderSchema):
    name: str = TORCHAO
    verify: bool = True  # load the folder with diffusers and compare it with the evaluated model before it lands


register_schema("export", "lightx2v", LightX2VExportSchema)
register_schema("export", TORCHAO, TorchaoExportSchema)
register_schema("export", DEQUANTIZED, DequantizedExportSchema)
RENAMED_OPTIONS[("export", "fake")] = DEQUANTIZED  # its old name: conf/export/fake.yaml still selects it
