"""DINOv2's augmentations in physical terms (issue #13): spectral jitter on reflectance only, bounded by
the tile's own spread, never negative; no solarize; blur scaled to the patch; every knob a flag."""
import numpy as np
import pytest
import torch

import data
import pretrain_dino
from conftest import write_scene

CPU = torch.device("cpu")


def reflectance_tile(seed=0, C=12, S=16):
    rng = np.random.default_rng(seed)
    spectrum = rng.uniform(0.05, 0.6, (C, 1, 1))
    return (spectrum * rng.uniform(0.7, 1.3, (1, S, S)) + rng.normal(0, 0.01, (C, S, S))).astype(np.float32)


def test_a_gain_of_g_multiplies_reflectance_by_g():
    img = reflectance_tile()
    out = data.spectral_jitter(img, np.random.default_rng(1), brightness=0.3)
    g = out / img
    np.testing.assert_allclose(g, g.flat[0], rtol=1e-5)  # one gain for every band and pixel
    assert 0.7 <= g.flat[0] <= 1.3 and abs(g.flat[0] - 1) > 1e-3
    u = torch.rand(3, 2 + img.shape[0])
    x = torch.from_numpy(img)[None].repeat(3, 1, 1, 1)
    batch = data.batch_jitter(x, u, 0.3, 0.0, 0.0, torch.tensor([True, False, True]))
    expected = 0.7 + 0.6 * u[:, 0]
    torch.testing.assert_close(batch / x, expected.view(3, 1, 1, 1).expand_as(x).where(
        torch.tensor([True, False, True]).view(3, 1, 1, 1), 1.0))


@pytest.mark.parametrize("spread", [0.1, 0.25])
def test_jitter_stays_within_the_tiles_own_spread_and_never_goes_negative(spread):
    """Strong jitter, bounded: no band's tile mean moves by more than `spread` of its within-tile std, and
    reflectance stays >= 0 - on both the per-tile and the batched path."""
    tiles = np.stack([reflectance_tile(s) for s in range(8)])
    tiles[:, :, :2] = 0.001  # dark pixels: strong contrast would push them below zero
    per_tile = np.stack([data.spectral_jitter(t, np.random.default_rng(i), 0.5, 0.8, 0.3, spread)
                         for i, t in enumerate(tiles)])
    x = torch.from_numpy(tiles)
    batch = data.batch_jitter(x, torch.rand(8, 2 + x.shape[1]), 0.5, 0.8, 0.3, torch.ones(8, dtype=torch.bool),
                              spread).numpy()
    std = tiles.std(axis=(2, 3))
    for out in (per_tile, batch):
        shift = np.abs(out.mean(axis=(2, 3)) - tiles.mean(axis=(2, 3)))
        assert (shift <= spread * std * (1 + 1e-4) + 1e-7).all()
        assert (out >= -1e-6).all()
    unbounded = data.spectral_jitter(tiles[0], np.random.default_rng(0), 0.5, 0.0, 0.3)
    assert (np.abs(unbounded.mean(axis=(1, 2)) - tiles[0].mean(axis=(1, 2))) > std[0]).any()  # the bound acts


def test_no_spectral_jitter_where_the_scene_has_no_value_scale(tmp_path, cache_dir, capsys):
    """Sensor counts (value_scale null) get no jitter on either path: the views equal those of a multi-crop
    without jitter, draw for draw; a reflectance scene does get it. The trainer says so."""
    counts = data.load_dataset(write_scene(tmp_path / "counts", bands=6, size=40), cache_dir=cache_dir)
    refl = data.load_dataset(write_scene(tmp_path / "refl", bands=6, size=40, value_scale=1e-4), cache_dir=cache_dir)
    on, off = data.MultiCrop(16, 8, 2, contrast=0.5, brightness=0.3), data.MultiCrop(16, 8, 2, jitter_p=0.0)
    for ds, same in ((counts, True), (refl, False)):
        a, b = (data.RandomTiles([ds], 16, 0, m, labels=False)[3][0] for m in (on, off))
        assert all(torch.equal(u, v) for u, v in zip(a, b)) == same
        raw, info = (torch.stack(t) for t in zip(*(data.RandomTiles([ds], 16, 0, labels=False, raw=True)[i]
                                                    for i in range(4))))
        normalize = data.DeviceNormalize([ds], CPU)
        rnd = lambda: data.StepRandom(0, 0, 0, 1, 4, CPU)  # noqa: E731 - the same draws for both
        a, b = (data.augment_on_device(m, normalize.physical(raw, info), info[:, 0], rnd(), normalize) for m in (on, off))
        assert all(torch.equal(u, v) for u, v in zip(a, b)) == same
    pretrain_dino.multi_crop(pretrain_dino.parse_args([]), [counts, refl])
    assert "notice: no spectral jitter on counts:" in capsys.readouterr().out


def test_multicrop_flags_reach_the_crops_and_defaults_fit_hsi():
    args = pretrain_dino.parse_args([])
    crops = pretrain_dino.multi_crop(args, [])
    assert crops.global_solarize_p == (0.0, 0.0) and crops.spread == 0.25
    assert crops.blur_sigma == pytest.approx((0.1 * 8 / 14, 2.0 * 8 / 14), abs=1e-3)  # DINOv2's, at patch 8
    assert pretrain_dino.parse_args(["--patch-size", "4"]).blur_sigma == pytest.approx((0.0286, 0.5714), abs=1e-3)
    args = pretrain_dino.parse_args(["--global-scale", "0.5", "1", "--local-scale", "0.1", "0.4", "--brightness",
                                     "0.1", "--contrast", "0", "--band-gain", "0.02", "--jitter-spread", "0",
                                     "--jitter-p", "0.5", "--blur-sigma", "0.2", "1", "--blur-p", "0.9", "0.2",
                                     "0.3", "--solarize-p", "0.2"])
    crops = pretrain_dino.multi_crop(args, [])
    assert (crops.global_scale, crops.local_scale, crops.brightness, crops.contrast, crops.band_gain) == (
        (0.5, 1.0), (0.1, 0.4), 0.1, 0.0, 0.02)
    assert crops.spread is None and crops.jitter_p == 0.5 and crops.blur_sigma == (0.2, 1.0)
    assert crops.global_blur_p == (0.9, 0.2) and crops.local_blur_p == 0.3 and crops.global_solarize_p == (0.0, 0.2)
