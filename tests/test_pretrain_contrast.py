"""pretrain_contrast.py: the multi-positive InfoNCE against a pair-by-pair reference, one region per scene and
step, the default source scenes, exact resume, torchrun."""
import math
import os

import pytest
import torch

import data
import pretrain_contrast
from conftest import ROOT, Interrupt, contrast_args, contrast_sources, losses, torchrun, write_scene
from models import build_backbone


# ----------------------------------------------------------------------------- the loss

def slow_infonce(z, region, t):
    """The loss written out pair by pair in plain Python."""
    z = torch.nn.functional.normalize(z.double(), dim=1).tolist()
    cos = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    total = 0.0
    for i in range(len(z)):
        negatives = sum(math.exp(cos(z[i], z[k]) / t) for k in range(len(z)) if region[k] != region[i])
        for j in range(len(z)):
            if j != i and region[j] == region[i]:
                pos = math.exp(cos(z[i], z[j]) / t)
                total += -math.log(pos / (pos + negatives))
    return total / len(z)


@pytest.mark.parametrize("sizes,t", [((4, 4), 0.1), ((3, 5, 2), 0.5)])
def test_infonce_equals_slow_reference(sizes, t):
    torch.manual_seed(0)
    region = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    z = torch.randn(len(region), 8)
    fast = pretrain_contrast.multi_positive_infonce(z, region, t)
    assert fast.item() == pytest.approx(slow_infonce(z, region.tolist(), t), rel=1e-5)


def test_infonce_is_lowest_when_regions_are_well_separated():
    torch.manual_seed(0)
    region = torch.arange(3).repeat_interleave(5)
    centres = torch.eye(8)[:3]
    loss = lambda z: pretrain_contrast.multi_positive_infonce(z, region, 0.1).item()  # noqa: E731
    separated = loss(centres[region] + 0.01 * torch.randn(15, 8))     # each region its own direction
    loose = loss(centres[region] + 0.5 * torch.randn(15, 8))          # regions overlap
    random = loss(torch.randn(15, 8))
    swapped = loss(centres[torch.arange(15) % 3] + 0.01 * torch.randn(15, 8))  # clusters ignore regions
    assert separated < 0.01 < loose < random < swapped



# ----------------------------------------------------------------------------- sampling

def test_one_region_from_every_scene_per_step_and_rank(tmp_path, cache_dir):
    spec, target = contrast_sources(tmp_path)
    datasets = data.load_datasets(f"{spec},{target}", cache_dir=cache_dir)
    regions = pretrain_contrast.SceneRegions(datasets, 7, seed=0)
    loader = lambda rank: iter(data.step_loader(regions, 1, 0, rank, 2, 0, torch.device("cpu")))  # noqa: E731
    rank0, rank1 = loader(0), loader(1)
    model = build_backbone("cdcnn", in_chans={d.name: d.bands for d in datasets}, width=8, depth=1)
    for step in range(10):
        batch, other = next(rank0), next(rank1)
        # Exactly one region per scene, in scene order (band counts 6, 9, 16 tell the scenes apart).
        assert [x.shape for x in batch] == [(1, d.bands, 7, 7) for d in datasets]
        assert not any(torch.equal(a, b) for a, b in zip(batch, other))  # ranks draw their own regions
        z, region = pretrain_contrast.region_features(model, batch, [d.name for d in datasets], 3)
        assert z.shape == (27, 8) and region.tolist() == [0] * 9 + [1] * 9 + [2] * 9
    # Item i is a pure function of (seed, i): a resumed run draws the same regions.
    again = next(iter(data.step_loader(regions, 1, 9, 1, 2, 0, torch.device("cpu"))))
    assert all(torch.equal(a, b) for a, b in zip(again, other))


def test_default_sources_leave_out_the_downstream_scene(tmp_path):
    for name, gt in (("indian_pines", True), ("jasper_ridge", False), ("samson", False)):
        write_scene(tmp_path / name, bands=5, size=8, with_gt=gt)
    os.makedirs(tmp_path / "notes")
    spec = pretrain_contrast.source_scenes(str(tmp_path), "indian_pines")
    assert spec == f"{tmp_path}/jasper_ridge,{tmp_path}/samson"
    assert pretrain_contrast.source_scenes("x,y", "indian_pines") == "x,y"
    with pytest.raises(data.DataError, match="no scene folders"):
        pretrain_contrast.source_scenes(str(tmp_path), "indian_pines,jasper_ridge,samson")



# ----------------------------------------------------------------------------- runs

def test_pretrain_resumes_exactly(tmp_path, monkeypatch):
    spec, _ = contrast_sources(tmp_path)
    pretrain_contrast.main(contrast_args(spec, tmp_path / "a"))
    real, calls = pretrain_contrast.multi_positive_infonce, [0]

    def dies_at_call_5(*a):
        calls[0] += 1
        if calls[0] == 5:
            raise Interrupt()
        return real(*a)
    with monkeypatch.context() as m:
        m.setattr(pretrain_contrast, "multi_positive_infonce", dies_at_call_5)
        with pytest.raises(Interrupt):
            pretrain_contrast.main(contrast_args(spec, tmp_path / "b"))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    pretrain_contrast.main(contrast_args(spec, tmp_path / "b", 6, "--resume"))
    full, resumed = (torch.load(tmp_path / r / "ckpt.pt", weights_only=False) for r in "ab")
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert full["backbone"] == {"name": "cdcnn", "in_chans": {"sensor_a": 6, "sensor_b": 9}, "width": 16, "depth": 2}
    # Resuming on other scenes is refused, naming the checkpoint and both band sets.
    other = write_scene(tmp_path / "src" / "sensor_c", bands=5, size=16, with_gt=False)
    with pytest.raises(ValueError, match=r"b/ckpt.pt: checkpoint was trained on \{'sensor_a': 6, 'sensor_b': 9\} "
                                         r"bands but the data has \{'sensor_a': 6, 'sensor_c': 5\}"):
        pretrain_contrast.main(contrast_args(f"{spec.split(',')[0]},{other}", tmp_path / "b", 8, "--resume"))


def test_pretrain_under_torchrun(tmp_path):
    spec, _ = contrast_sources(tmp_path)
    out = tmp_path / "ddp"
    torchrun(os.path.join(ROOT, "pretrain_contrast.py"), contrast_args(spec, out, 4))
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2 and len(losses(out)) == 4
