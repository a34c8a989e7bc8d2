"""Speed: FLOPs counted from the architecture agree with torch.utils.flop_counter; the fast path (bf16 autocast,
fused attention kernels) gives the plain path's loss; bench.py runs and states MFU."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import bench
import common
import pretrain_dino
from models import MAE, SimMIM, build_backbone


def step_flops(model, x):
    return common.counted_flops(lambda: model(x)[0].backward()) / x.shape[0]


@pytest.mark.parametrize("name", ["vit", "ssvit", "sst"])
def test_masked_modelling_flops_match_the_counter(name):
    torch.manual_seed(0)
    enc = build_backbone(name, "tiny", 32, spectral_patch={"vit": None, "ssvit": 4, "sst": 8}[name])
    model = SimMIM(enc) if name == "sst" else MAE(enc, 128, 4, 4)
    assert model.flops_per_image() == pytest.approx(step_flops(model, torch.randn(2, 32, 64, 64)), rel=0.05)


@pytest.mark.parametrize("backbone", ["vit", "ssvit"])
def test_dino_flops_match_the_counter(backbone):
    args = pretrain_dino.parse_args(["--backbone", backbone, "--prototypes", "256", "--local-crops", "2"])
    torch.manual_seed(0)
    student, teacher = pretrain_dino.build(args, 8)
    criterion = pretrain_dino.DINOLoss(student.backbone.streams)
    B = 4
    g, loc = torch.randn(2 * B, 8, 64, 64), torch.randn(2 * B, 8, 32, 32)
    masks = pretrain_dino.token_masks(args, 0, 0, 1, B, student.backbone, torch.device("cpu"))

    def step():
        teacher_out = pretrain_dino.teacher_forward(teacher, g, masks)
        criterion(student(g, loc, masks), teacher_out, masks, 0.07)[0].backward()
    counted = common.counted_flops(step) / B
    # The architecture count uses the expected number of masked tokens; this batch has its own.
    assert pretrain_dino.flops_per_tile(args, student) == pytest.approx(counted, rel=0.05)


def test_fast_path_gives_the_plain_loss():
    torch.manual_seed(0)
    model = MAE(build_backbone("vit", "tiny", 8, img_size=32), 64, 2, 4)
    x = torch.randn(4, 8, 32, 32)

    def loss(**autocast):
        torch.manual_seed(1)  # the same masks
        with torch.autocast("cpu", **autocast):
            return model(x)[0].item()
    with sdpa_kernel(SDPBackend.MATH):
        plain = loss(enabled=False)
    fast = loss(dtype=torch.bfloat16)
    assert fast == pytest.approx(plain, rel=2e-2)


def test_bench_prints_a_row_per_case(capsys):
    bench.bench_models(bench.parse_args(["--trainers", "mae,dino", "--backbones", "vit", "--bands", "8",
                                         "--batch-size", "2", "--steps", "1", "--warmup", "0"]))
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| mae") or r.startswith("| dino")]
    assert len(rows) == 2 and all("%" in r for r in rows)


def test_mfu_text():
    assert bench.mfu_text(1.5, None) == "n/a"  # a GPU missing from common.GPU_PEAK_TFLOPS
    assert bench.mfu_text(1.5, 10.0) == "15.0%" and bench.mfu_text(1.5, 10.0, 3.0) == "15.0% / 50%"
