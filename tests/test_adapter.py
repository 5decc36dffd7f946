"""The model adapter: the registry finds Wan's adapter, and the layering it exists for holds."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqx.models.adapter import adapter_for, adapter_named
from vqx.models.wan.adapter import WanAdapter

ROOT = Path(__file__).resolve().parents[1]


def test_wan_adapter_is_found_for_the_transformer_and_the_pipeline(tiny_t2v):
    tr = tiny_t2v.transformer
    adapter = adapter_for(tr)
    assert isinstance(adapter, WanAdapter) and adapter_for(tiny_t2v) is adapter is adapter_named("wan")
    assert adapter.transformers(tiny_t2v) == [tr]
    assert len(adapter.blocks(tr)) == tr.config.num_layers
    assert adapter.block_dtype(tr) == tr.blocks[0].ffn.net[2].weight.dtype
    assert adapter.hidden_size(tr) == tr.blocks[0].norm2.normalized_shape[0]
    assert set(adapter.attention_sites(tr.blocks[0])) == {"self", "cross"}
    grouped = [n for g in adapter.input_groups(tr) for n in g.linears]
    assert sorted(grouped) == sorted(adapter.block_linears(tr))
    with pytest.raises(TypeError, match="no model adapter for Linear"):
        adapter_for(torch.nn.Linear(2, 2))


def test_wan_shape_rules(tiny_t2v):
    adapter = adapter_for(tiny_t2v)
    assert adapter.check_frames(9) is None and adapter.check_frames(81) is None
    assert "4k+1" in adapter.check_frames(8)
    tr = tiny_t2v.transformer
    latents = torch.zeros(1, 16, 3, 4, 6)  # 9 frames of 32 x 48 pixels
    assert adapter.video_tokens(tr, 32, 48, 9) == adapter.tokens_per_call(tr, {"hidden_states": latents}) == 3 * 2 * 3


def test_quant_imports_nothing_above_it():
    code = ("import sys, vqx.quant.linear, vqx.quant.fastpath, vqx.quant.shared, vqx.quant.backends; "
            "print(sorted(m for m in sys.modules if m.startswith(('vqx.', 'diffusers')) and not m.startswith('vqx.quant')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imports(path: Path) -> list[str]:
    """Absolute names of the vqx modules a file imports (anywhere in it)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return [n for n in names if n.startswith("vqx")]


def test_layering():
    """quant/ is the ground floor (it imports vqx.errors and vqx.io at most); nothing outside the testbed imports it."""
    for path in (ROOT / "vqx").rglob("*.py"):
        imports = _imports(path)
        where = path.relative_to(ROOT).as_posix()
        if where.startswith("vqx/quant/"):
            assert all(n.startswith(("vqx.quant", "vqx.errors", "vqx.io")) for n in imports), (where, imports)
        if not where.startswith("vqx/testbed/"):
            assert not any(n.startswith("vqx.testbed") for n in imports), (where, imports)
