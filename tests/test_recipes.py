"""DINO's schedules for short runs (issue #13): teacher momentum, lr scaling; fp32 head and KoLeo."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import pretrain_dino
from models import DINOHead


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
