"""What vqx writes gets a plain file's permissions under the umask, not the 0600/0700 of its temporary files."""

import os
import stat
from pathlib import Path

import pytest

from vqx.io import atomic_path, staged_dir, write_json_atomic, write_text_atomic


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and everything under it, by path relative to ``root``."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_text_atomic(tmp_path / "b.txt", "b")
    with atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"c")
    with staged_dir(tmp_path / "folder", owned=True) as tmp:
        write_text_atomic(tmp / "inner.txt", "i")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "plain.txt").write_text("p")
        os.close(os.open(tmp / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors' own temp files
    got = modes(tmp_path)
    got.pop(".")
    want = {"a.json": file_mode, "b.txt": file_mode, "c.bin": file_mode, "folder": dir_mode,
            "folder/inner.txt": file_mode, "folder/sub": dir_mode, "folder/sub/plain.txt": file_mode,
            "folder/private.bin": file_mode}
    assert got == want


def test_explicit_modes_still_win(tmp_path, umask):
    with atomic_path(tmp_path / "c.bin", mode=0o600) as tmp:
        tmp.write_bytes(b"c")
    with staged_dir(tmp_path / "folder", mode=(0o600, 0o700)) as tmp:
        (tmp / "f").write_text("f")
    assert modes(tmp_path)["c.bin"] == 0o600
    assert modes(tmp_path)["folder"] == 0o700 and modes(tmp_path)["folder/f"] == 0o600


def test_run_outputs_and_export_are_readable(vqx_run, tmp_path, umask):
    """A wan_tiny run with a lightx2v export and videos under umask 0022: every file 0644, every folder 0755."""
    run_dir = tmp_path / "run"
    r = vqx_run(["algorithm=rtn", "export=lightx2v", "eval=video", "eval.num_samples=1", "eval.noise_floor=none",
                 "logger=none", f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"])
    assert r.returncode == 0, r.stderr
    got = modes(run_dir)
    for name in ("config.yaml", "metrics.json", "run.log", "per_frame.png", "videos", "export",
                 "export/manifest.json", "export/config.json", "export/diffusion_pytorch_model.safetensors"):
        assert name in got, sorted(got)
    wrong = {name: oct(m) for name, m in got.items()
             if m != (0o755 if (run_dir / name).is_dir() else 0o644)}
    assert not wrong
