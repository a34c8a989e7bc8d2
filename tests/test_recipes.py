"""Issue #13 recipe options: DINO's momentum, lr scaling, fp32 head and KoLeo, probing the student."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import finetune_seg
import pretrain_dino
from models import DINOHead
from test_pretrain_dino import dino_args


# ----------------------------------------------------------------------------- DINO

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


def test_momentum_schedule_and_initial_teacher_share():
    args = pretrain_dino.parse_args([])
    default = common.cosine_schedule(*args.momentum, 300)
    assert default[0] == 0.992 and default[-1] == pytest.approx(1.0, abs=1e-6)
    assert all(a <= b for a, b in zip(default, default[1:]))
    assert pretrain_dino.initial_teacher_share(default) == pytest.approx(0.30, abs=0.01)  # issue #13's ~30%
    short = pretrain_dino.parse_args(["--momentum", "0.96", "0.996"])
    assert pretrain_dino.initial_teacher_share(common.cosine_schedule(*short.momentum, 300)) < 0.002
    # The EMA really leaves that share: a teacher of ones, a student of zeros.
    teacher, student = nn.Linear(2, 2), nn.Linear(2, 2)
    nn.init.ones_(teacher.weight), nn.init.zeros_(student.weight)
    for m in default:
        pretrain_dino.ema_update(teacher, student, float(m))
    assert teacher.weight.mean().item() == pytest.approx(pretrain_dino.initial_teacher_share(default), rel=1e-4)


def test_lr_scaling_rules():
    assert common.scaled_lr(2e-3, 16, 1) == 2e-3 * 16 / 256  # linear: as before
    assert common.scaled_lr(0.004, 1024, 1, rule="sqrt") == pytest.approx(0.004)
    assert common.scaled_lr(0.004, 8, 2, rule="sqrt") == pytest.approx(0.004 * math.sqrt(16 / 1024))
    assert pretrain_dino.parse_args([]).blr == 2e-3
    assert pretrain_dino.parse_args(["--lr-scaling", "sqrt"]).blr == 0.004
    assert pretrain_dino.parse_args(["--lr-scaling", "sqrt", "--blr", "1e-3"]).blr == 1e-3


def test_backbone_weights_teacher_or_student():
    ckpt = {"backbone_key": ("teacher", "backbone."),
            "teacher": {"backbone.w": torch.zeros(2), "dino_heads.0.p": torch.zeros(1)},
            "student": {"backbone.w": torch.ones(2), "dino_heads.0.p": torch.ones(1)}}
    assert torch.equal(common.backbone_weights(ckpt)["w"], torch.zeros(2))
    assert torch.equal(common.backbone_weights(ckpt, "student")["w"], torch.ones(2))
    assert set(common.backbone_weights(ckpt, "student")) == {"w"}
    mae = {"backbone_key": ("model", "encoder."), "model": {"encoder.w": torch.zeros(2)}}
    assert set(common.backbone_weights(mae)) == {"w"}
    with pytest.raises(ValueError, match="no student"):
        common.backbone_weights(mae, "student")


def test_probe_the_dino_student(scene, cache_dir, tmp_path, capsys):
    pre = tmp_path / "d"
    pretrain_dino.main(dino_args(scene, pre, cache_dir, 2, 4, "--lr-scaling", "sqrt"))
    printed = capsys.readouterr().out
    assert "final teacher keeps" in printed and "sqrt scaling of blr 0.004" in printed
    dino = torch.load(pre / "ckpt.pt", weights_only=False)
    seg = ["--data", scene, "--cache-dir", cache_dir, "--img-size", "16", "--batch-size", "2", "--steps", "1",
           "--eval-every", "1", "--workers", "0", "--init", str(pre / "ckpt.pt")]
    for which in ("student", "teacher"):
        finetune_seg.main(seg + ["--out", str(tmp_path / which), "--init-weights", which])
    student, teacher = (torch.load(tmp_path / w / "ckpt.pt", weights_only=False)["model"] for w in ("student", "teacher"))
    names = [k for k in common.backbone_weights(dino) if not k.endswith("pos_embed")]
    assert any(not torch.equal(dino["student"][f"backbone.{k}"], dino["teacher"][f"backbone.{k}"]) for k in names)
    for k in names:  # frozen probes keep the backbone they read bit for bit
        assert torch.equal(student[f"backbone.{k}"], dino["student"][f"backbone.{k}"]), k
        assert torch.equal(teacher[f"backbone.{k}"], dino["teacher"][f"backbone.{k}"]), k
