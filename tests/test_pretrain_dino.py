"""pretrain_dino.py: DINOv2's losses (Sinkhorn-Knopp, KoLeo, fp32 head), masks, multi-crop flags, momentum and
lr defaults; runs: the EMA teacher, exact resume with either pipeline, one process = two, a rank without masked
tokens, the spatial-spectral ViT, three sensors, and the teacher initialising fine-tuning."""
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import finetune_seg
import pretrain_dino
from conftest import ROOT, dino_args, interrupt_at_call, rows, three_sensors, torchrun
from models import DINOHead

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- losses

def test_sinkhorn_knopp_is_doubly_normalised():
    torch.manual_seed(0)
    q = pretrain_dino.sinkhorn_knopp(torch.randn(32, 8) * 3, temp=0.5, iterations=50)
    torch.testing.assert_close(q.sum(1), torch.ones(32))
    torch.testing.assert_close(q.sum(0), torch.full((8,), 32 / 8), rtol=1e-3, atol=1e-3)
    logits = torch.randn(32, 8) * 3
    q3 = pretrain_dino.sinkhorn_knopp(logits, temp=0.5)  # DINOv2's 3 iterations
    torch.testing.assert_close(q3.sum(1), torch.ones(32))  # each sample's target is a distribution
    usage = lambda q: (q.sum(0) - 4).abs().max()  # noqa: E731
    assert usage(q3) < usage(torch.softmax(logits / 0.5, dim=1))  # prototypes used more evenly


def test_koleo_prefers_spread_features():
    clustered = torch.randn(16, 8) * 0.01 + torch.ones(8)
    spread = torch.eye(16, 8) + torch.eye(16, 8).roll(8, 0) * -1
    assert pretrain_dino.koleo(spread) < pretrain_dino.koleo(clustered)


def test_dino_head_and_koleo_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    head, x = DINOHead(16, 4096, 32, 8), torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = head.mlp(x)
        logits = head(x)
    assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32
    ref = F.linear(F.normalize(hidden.float(), dim=-1), F.normalize(head.prototypes, dim=-1))
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(head(x), F.linear(F.normalize(head.mlp(x), dim=-1), F.normalize(head.prototypes, dim=-1)))
    feats = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = pretrain_dino.koleo(feats)
    assert under.dtype == torch.float32 and torch.equal(under, pretrain_dino.koleo(feats))



# ----------------------------------------------------------------------------- flags and schedules

def test_multicrop_flags_reach_the_crops_and_defaults_fit_hsi():
    args = pretrain_dino.parse_args([])
    crops = pretrain_dino.multi_crop(args, [])
    assert (crops.global_size, crops.local_size, crops.n_local) == (64, 32, 4)  # local crops half the global size
    assert crops.global_solarize_p == (0.0, 0.0) and crops.spread == 0.25
    assert crops.blur_sigma == pytest.approx((0.1 * 8 / 14, 2.0 * 8 / 14), abs=1e-3)  # DINOv2's, at patch 8
    patch4 = pretrain_dino.multi_crop(pretrain_dino.parse_args(["--patch-size", "4"]), [])
    assert patch4.blur_sigma == pytest.approx((0.0286, 0.5714), abs=1e-3)
    args = pretrain_dino.parse_args(["--img-size", "32", "--local-crops", "2", "--global-scale", "0.5", "1",
                                     "--local-scale", "0.1", "0.4", "--brightness", "0.1", "--contrast", "0",
                                     "--band-gain", "0.02", "--solarize-p", "0.2"])
    crops = pretrain_dino.multi_crop(args, [])
    assert (crops.global_size, crops.local_size, crops.n_local) == (32, 16, 2)
    assert (crops.global_scale, crops.local_scale, crops.brightness, crops.contrast, crops.band_gain) == (
        (0.5, 1.0), (0.1, 0.4), 0.1, 0.0, 0.02)
    assert crops.global_solarize_p == (0.0, 0.2)


def test_momentum_schedule_and_initial_teacher_share():
    args = pretrain_dino.parse_args([])  # 300 steps: the short-run default leaves ~1% of the random teacher
    default = common.cosine_schedule(*args.momentum, 300)
    assert default[0] == pytest.approx(1 - 2 * math.log(100) / 300, abs=1e-4) and default[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(default, default[1:]))
    assert 0.005 < pretrain_dino.initial_teacher_share(default) < 0.02
    assert pretrain_dino.parse_args(["--steps", "125000"]).momentum == (0.992, 1.0)  # DINOv2's, for its length
    assert pretrain_dino.parse_args(["--steps", "4"]).momentum == (0.9, 1.0)  # never below 0.9
    dinov2 = pretrain_dino.parse_args(["--momentum", "0.992", "1"])
    assert pretrain_dino.initial_teacher_share(common.cosine_schedule(*dinov2.momentum, 300)) == pytest.approx(
        0.30, abs=0.01)  # issue #13's ~30%
    # The EMA really leaves that share: a teacher of ones, a student of zeros.
    teacher, student = nn.Linear(2, 2), nn.Linear(2, 2)
    nn.init.ones_(teacher.weight), nn.init.zeros_(student.weight)
    for m in default:
        common.ema_update(teacher, student, float(m))
    assert teacher.weight.mean().item() == pytest.approx(pretrain_dino.initial_teacher_share(default), rel=1e-4)


def test_base_lr_follows_the_scaling_rule():
    assert pretrain_dino.parse_args([]).blr == 2e-3
    assert pretrain_dino.parse_args(["--lr-scaling", "sqrt"]).blr == 0.004
    assert pretrain_dino.parse_args(["--lr-scaling", "sqrt", "--blr", "1e-3"]).blr == 1e-3




def test_one_process_and_two_draw_the_same_masks():
    """A crop's iBOT masks depend on (seed, step, place in the global batch), not on the process count: rank r
    of 2 with batch 4 gets global samples 4r..4r+3 of the 1-process batch of 8, in both streams."""
    args = pretrain_dino.parse_args(["--backbone", "ssvit", "--img-size", "16", "--spectral-patch", "2"])
    backbone = pretrain_dino.build(args, 6)[0].backbone
    one = pretrain_dino.token_masks(args, 3, 0, 1, 8, backbone, CPU)
    two = [pretrain_dino.token_masks(args, 3, r, 2, 4, backbone, CPU) for r in range(2)]
    for s, mask in enumerate(one):
        joined = torch.cat([t[s].bool.view(2, 4, -1) for t in two], 1).flatten(0, 1)
        assert torch.equal(mask.bool, joined)
        assert torch.equal(mask.bool.flatten()[mask.index], torch.ones(len(mask.index), dtype=torch.bool))
        assert len(mask.index) == int(mask.bool.sum())
        torch.testing.assert_close(mask.weight, (1 / mask.bool.sum(1).float())[mask.index // mask.bool.shape[1]])



# ----------------------------------------------------------------------------- runs

def test_teacher_gets_no_gradients_and_follows_ema(scene, tmp_path):
    out = tmp_path / "d"
    pretrain_dino.main(dino_args(scene, out, 2))
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    args = pretrain_dino.parse_args(dino_args(scene, out, 2))
    student, teacher = pretrain_dino.build(args, 16)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    # The teacher moved towards the student, and differs from it (momentum < 1).
    t, s = ckpt["teacher"], ckpt["student"]
    assert any(not torch.equal(t[k], s[k]) for k in t)
    logged = rows(out)
    for key in ("dino_global", "dino_local", "ibot", "koleo", "teacher_entropy", "cls_std", "teacher_temp", "momentum"):
        assert key in logged[2], key


@pytest.mark.parametrize("pipeline", ["--no-device-augment", "--device-augment"])
def test_resume_after_interruption_matches(scene, tmp_path, monkeypatch, pipeline):
    """Bit for bit, with the multi-crop in the loader or batched on the device (here the CPU)."""
    pretrain_dino.main(dino_args(scene, tmp_path / "full", 4, 4, pipeline))
    with monkeypatch.context() as m:
        interrupt_at_call(m, 3)
        with pytest.raises(KeyboardInterrupt):
            pretrain_dino.main(dino_args(scene, tmp_path / "cut", 4, 4, pipeline))
    pretrain_dino.main(dino_args(scene, tmp_path / "cut", 4, 4, pipeline, "--resume"))
    full, cut = rows(tmp_path / "full"), rows(tmp_path / "cut")
    assert [full[s]["loss"] for s in range(1, 5)] == [cut[s]["loss"] for s in range(1, 5)]
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])


@pytest.mark.parametrize("pipeline", ["--no-device-augment", "--device-augment"])
def test_one_and_two_processes_give_the_same_first_loss(scene, tmp_path, pipeline):
    """The global batch of 8 tiles in one process, or split 4 + 4 over two: the same first-step loss
    terms. With --device-augment each tile's views and masks are drawn from (seed, step, its place in the
    global batch), so both runs see the same views (the multi-crop runs batched on the CPU device)."""
    flags = ["--drop-path", "0", "--steps", "1", "--ckpt-every", "1", pipeline]
    pretrain_dino.main(dino_args(scene, tmp_path / "one", 1, 8, *flags))
    torchrun(os.path.join(ROOT, "pretrain_dino.py"), dino_args(scene, tmp_path / "two", 1, 4, *flags))
    one, two = rows(tmp_path / "one")[1], rows(tmp_path / "two")[1]
    for key in ("loss", "dino_global", "dino_local", "ibot", "koleo"):
        assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-5), key


def test_dino_rank_without_masked_tokens_runs_the_same_collectives(scene, tmp_path):
    """2 tiles per rank, half of each global crop's images masked: a seed where at step 1 every masked crop is
    on rank 0. Rank 1 still runs the iBOT path (zero masked tokens: the same Sinkhorn all-reduces, a zero
    gradient for the mask token, the same meter keys)."""
    extra = ["--patch-size", "4", "--steps", "2"]
    args = pretrain_dino.parse_args(dino_args(scene, tmp_path / "x", 2, 2, *extra))
    backbone = pretrain_dino.build(args, 16)[0].backbone
    for seed in range(1000):
        args.seed = seed
        counts = pretrain_dino.mask_counts(args, 0, 2, 2, backbone)[0]  # (2 crops, 4 global tiles)
        if counts[:, 2:].sum() == 0:
            break
    assert counts[:, :2].sum() > 0 and counts[:, 2:].sum() == 0, "no seed leaves rank 1 without masks"
    out = tmp_path / "ddp"
    torchrun(os.path.join(ROOT, "pretrain_dino.py"), dino_args(scene, out, 2, 2, *extra, "--seed", str(seed)))
    logged = rows(out)
    assert set(logged) == {1, 2} and all(math.isfinite(logged[s]["ibot"]) and logged[s]["ibot"] > 0 for s in logged)


def test_ssvit_dino_loss_goes_down(scene, tmp_path):
    pretrain_dino.main(dino_args(scene, tmp_path / "d", 30, 8, "--backbone", "ssvit", "--blr", "0.02",
                                 "--ckpt-every", "30"))
    logged = rows(tmp_path / "d")
    curve = [logged[s]["loss"] for s in sorted(logged)]
    assert {"spatial/ibot", "spectral/ibot", "spectral/dino_local", "spectral/koleo"} <= set(logged[30])
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5, curve


@pytest.mark.parametrize("backbone", [["vit"], ["ssvit", "--spectral-patch", "24"]])
def test_dino_on_three_sensors(tmp_path, monkeypatch, backbone):
    """DINOv2 with mixed-sensor batches: multi-crop per sensor, every view on the grid; resumes exactly."""
    scenes, flags = three_sensors(tmp_path), ["--any-sensor", "--backbone", *backbone]
    pretrain_dino.main(dino_args(scenes, tmp_path / "full", 4, 4, *flags))
    with monkeypatch.context() as m:
        interrupt_at_call(m, 3)  # dies in step 3, after the step-2 checkpoint
        with pytest.raises(KeyboardInterrupt):
            pretrain_dino.main(dino_args(scenes, tmp_path / "cut", 4, 4, *flags))
    pretrain_dino.main(dino_args(scenes, tmp_path / "cut", 4, 4, *flags, "--resume"))
    full, cut = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("full", "cut"))
    assert all(torch.equal(v, cut["teacher"][k]) for k, v in full["teacher"].items())
    assert list(full["backbone"]["bands"]["sensors"]) == ["a", "b", "c"] and full["backbone"]["in_chans"] == 216


def test_the_teacher_initialises_fine_tuning(scene, tmp_path, capsys):
    pre = tmp_path / "d"
    pretrain_dino.main(dino_args(scene, pre, 2, 4, "--lr-scaling", "sqrt"))
    printed = capsys.readouterr().out
    assert "final teacher keeps" in printed and "sqrt scaling of blr 0.004" in printed
    dino = torch.load(pre / "ckpt.pt", weights_only=False)
    seg = ["--data", scene, "--img-size", "16", "--batch-size", "2", "--steps", "1", "--eval-every", "1", "--workers",
           "0", "--init", str(pre / "ckpt.pt")]
    finetune_seg.main(seg + ["--out", str(tmp_path / "probe")])
    probe = torch.load(tmp_path / "probe" / "ckpt.pt", weights_only=False)["model"]
    names = list(common.backbone_weights(dino))
    assert any(not torch.equal(dino["student"][f"backbone.{k}"], dino["teacher"][f"backbone.{k}"]) for k in names)
    for k in names:  # a frozen probe keeps the backbone it reads, the EMA teacher's, bit for bit
        assert torch.equal(probe[f"backbone.{k}"], dino["teacher"][f"backbone.{k}"]), k
    finetune_seg.main(seg + ["--out", str(tmp_path / "ft"), "--finetune"])
    ft = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)
    assert ft["backbone"] == dino["backbone"] and ft["backbone"]["num_registers"] == 4 and ft["backbone"]["mask_token"]
