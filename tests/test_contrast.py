import json
import math
import os
import subprocess
import sys

import pytest
import torch

import common
import data
import eval as evaluation
import finetune_seg
import pretrain_contrast
from conftest import write_scene
from models import CrossDomainCNN, build_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sources(tmp_path):
    """Two unlabelled scenes from 'different sensors' (6 and 9 bands) and a labelled target (16 bands)."""
    a = write_scene(tmp_path / "src" / "sensor_a", bands=6, size=24, seed=1, with_gt=False)
    b = write_scene(tmp_path / "src" / "sensor_b", bands=9, size=20, seed=2, with_gt=False)
    target = write_scene(tmp_path / "target", bands=16, size=32)
    return f"{a},{b}", target


def contrast_args(data_path, out, cache_dir, steps=6, *extra):
    return ["--data", data_path, "--out", str(out), "--cache-dir", cache_dir, "--steps", str(steps), "--width", "16",
            "--depth", "2", "--region-size", "3", "--log-every", "1", "--ckpt-every", "3", "--workers", "0", *extra]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


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
    spec, target = sources(tmp_path)
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


def test_step_schedule():
    s = common.step_schedule(0.03, 10)
    assert s.tolist() == pytest.approx([0.03] * 6 + [0.003] * 2 + [0.0003] * 2)


# ----------------------------------------------------------------------------- the network

def test_cross_domain_cnn_is_per_domain_then_shared_at_full_resolution():
    torch.manual_seed(0)
    m = CrossDomainCNN({"a": 6, "b": 9}, width=8, depth=2).eval()
    xa, xb = torch.randn(2, 6, 11, 11), torch.randn(1, 9, 11, 11)
    both = m([xa, xb], ["a", "b"])
    assert both.shape == (3, 8, 11, 11)
    torch.testing.assert_close(both[:2], m(xa, "a"))
    x2 = xa.clone()
    x2[0, :, 5, 5] += 3  # a pixel reaches exactly its 5x5 neighbourhood
    changed = (m(x2, "a") - m(xa, "a")).abs().sum(1)[0] > 0
    assert changed[3:8, 3:8].all() and changed.sum() == 25
    with pytest.raises(ValueError, match="domains a, b: say which one"):
        m(xa)
    with pytest.raises(ValueError, match="no domain 'c'"):
        m(xa, "c")
    with pytest.raises(ValueError, match="domain 'b' has 9 bands, got an input with 6"):
        m(xa, "b")
    with pytest.raises(ValueError, match="in_chans = {domain name: band count}"):
        build_backbone("cdcnn", in_chans=6)


# ----------------------------------------------------------------------------- scripts end to end

class Interrupt(Exception):
    pass


def test_pretrain_resumes_exactly(tmp_path, cache_dir, monkeypatch):
    spec, _ = sources(tmp_path)
    pretrain_contrast.main(contrast_args(spec, tmp_path / "a", cache_dir))
    real, calls = pretrain_contrast.multi_positive_infonce, [0]

    def dies_at_call_5(*a):
        calls[0] += 1
        if calls[0] == 5:
            raise Interrupt()
        return real(*a)
    with monkeypatch.context() as m:
        m.setattr(pretrain_contrast, "multi_positive_infonce", dies_at_call_5)
        with pytest.raises(Interrupt):
            pretrain_contrast.main(contrast_args(spec, tmp_path / "b", cache_dir))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    pretrain_contrast.main(contrast_args(spec, tmp_path / "b", cache_dir, 6, "--resume"))
    full, resumed = (torch.load(tmp_path / r / "ckpt.pt", weights_only=False) for r in "ab")
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert full["backbone"] == {"name": "cdcnn", "in_chans": {"sensor_a": 6, "sensor_b": 9}, "width": 16, "depth": 2}
    # Resuming on other scenes is refused, naming the checkpoint and both band sets.
    other = write_scene(tmp_path / "src" / "sensor_c", bands=5, size=16, with_gt=False)
    with pytest.raises(ValueError, match=r"b/ckpt.pt: checkpoint was trained on \{'sensor_a': 6, 'sensor_b': 9\} "
                                         r"bands but the data has \{'sensor_a': 6, 'sensor_c': 5\}"):
        pretrain_contrast.main(contrast_args(f"{spec.split(',')[0]},{other}", tmp_path / "b", cache_dir, 8, "--resume"))


def test_transfer_lr_groups_init_and_eval(tmp_path, cache_dir):
    spec, target = sources(tmp_path)
    pre = tmp_path / "pre"
    pretrain_contrast.main(contrast_args(spec, pre, cache_dir, 2))
    args = finetune_seg.parse_args(["--init", str(pre / "ckpt.pt"), "--data", target, "--optimizer", "sgd"])
    ds = data.load_dataset(target, cache_dir=cache_dir)
    model = finetune_seg.build_model(args, ds)
    backbone = model.backbone
    # A new first layer for the target scene and a new classifier, N(0, 0.001); the trunk transferred.
    assert list(backbone.first) == ["target"] and backbone.first["target"].in_channels == 16
    for new in (backbone.first["target"], model.decoder.classifier):
        assert new.weight.std().item() == pytest.approx(0.001, rel=0.2) and not new.bias.any()
    trunk = common.backbone_weights(torch.load(pre / "ckpt.pt", weights_only=False))
    for k, v in backbone.trunk.state_dict().items():
        assert torch.equal(v, trunk[f"trunk.{k}"]), k
    # What the optimizer holds: new layers at lr, the trunk at lr / 10, every parameter exactly once.
    optimizer = common.sgd(finetune_seg.param_groups(args, model), 0.01)
    common.set_lr(optimizer, 0.01)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(lr_of) == sum(len(g["params"]) for g in optimizer.param_groups)
    for name, p in model.named_parameters():
        expected = 0.001 if name.startswith("backbone.trunk.") else 0.01
        assert lr_of[id(p)] == pytest.approx(expected), name
    # End to end: fine-tune, resume, evaluate the checkpoint.
    out = tmp_path / "ft"
    seg = ["--data", target, "--out", str(out), "--cache-dir", cache_dir, "--img-size", "16", "--batch-size", "4",
           "--log-every", "1", "--eval-every", "2", "--ckpt-every", "1", "--eval-batch-size", "8", "--workers", "0",
           "--init", str(pre / "ckpt.pt"), "--optimizer", "sgd", "--lr", "0.01", "--labels-per-class", "5"]
    finetune_seg.main([*seg, "--steps", "1"])
    finetune_seg.main([*seg, "--steps", "2", "--resume"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["backbone"]["in_chans"] == {"target": 16}
    assert sorted(g["lr"] for g in ckpt["optimizer"]["param_groups"])[-1] == pytest.approx(
        10 * sorted(g["lr"] for g in ckpt["optimizer"]["param_groups"])[0])
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--pictures", "1"])
    assert m["pixels"] == int(data.load_split(out / "split.npz", (32, 32))[1].sum())
    other = write_scene(tmp_path / "twelve", bands=12, size=32)
    with pytest.raises(ValueError, match="ckpt.pt: checkpoint was trained on 16 bands but twelve has 12"):
        evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", other, "--cache-dir", cache_dir])


def test_scratch_and_refused_checkpoint(tmp_path, cache_dir):
    target = write_scene(tmp_path / "target", bands=16, size=32)
    common_args = ["--data", target, "--cache-dir", cache_dir, "--img-size", "16", "--batch-size", "2", "--steps", "1",
                   "--eval-every", "5", "--workers", "0"]
    finetune_seg.main([*common_args, "--backbone", "cdcnn", "--out", str(tmp_path / "scratch")])
    scratch = torch.load(tmp_path / "scratch" / "ckpt.pt", weights_only=False)
    assert scratch["backbone"] == {"name": "cdcnn", "in_chans": {"target": 16}, "width": 128, "depth": 5}
    assert scratch["segmentation"]["frozen_backbone"] is False
    finetune_seg.main([*common_args, "--backbone", "pixel", "--out", str(tmp_path / "pixel")])
    with pytest.raises(ValueError, match=r"pixel/ckpt.pt: --backbone cdcnn needs a pretrain_contrast.py checkpoint, "
                                         r"this one holds a 'pixel' backbone"):
        finetune_seg.main([*common_args, "--backbone", "cdcnn", "--init", str(tmp_path / "pixel" / "ckpt.pt"),
                           "--out", str(tmp_path / "x")])


def test_pretrain_under_torchrun(tmp_path, cache_dir):
    spec, _ = sources(tmp_path)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "pretrain_contrast.py"), *contrast_args(spec, out, cache_dir, 4)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2 and len(losses(out)) == 4
