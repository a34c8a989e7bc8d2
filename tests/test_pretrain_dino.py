import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import finetune_seg
import pretrain_dino
from models import DINOHead

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dino_args(scene, out, cache_dir, steps=4, batch=4, *extra):
    return ["--data", scene, "--out", str(out), "--cache-dir", cache_dir, "--steps", str(steps),
            "--img-size", "16", "--local-size", "8", "--local-crops", "2", "--batch-size", str(batch),
            "--prototypes", "64", "--head-hidden", "64", "--head-bottleneck", "16", "--warmup-steps", "1",
            "--teacher-temp-warmup-steps", "2", "--freeze-prototypes-steps", "1", "--log-every", "1",
            "--ckpt-every", "2", "--workers", "0", *extra]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


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


def test_centering_tracks_the_mean():
    c = pretrain_dino.Centering(4, momentum=0.0)
    logits = torch.randn(10, 4)
    probs = c(logits, 0.1)
    torch.testing.assert_close(probs.sum(1), torch.ones(10))
    torch.testing.assert_close(c.center, logits.mean(0, keepdim=True))


def test_koleo_prefers_spread_features():
    clustered = torch.randn(16, 8) * 0.01 + torch.ones(8)
    spread = torch.eye(16, 8) + torch.eye(16, 8).roll(8, 0) * -1
    assert pretrain_dino.koleo(spread) < pretrain_dino.koleo(clustered)


def reference_block_mask(h, w, num_masked, rng, min_block=4, aspect=(0.3, 1 / 0.3)):
    """The plain one-mask-at-a-time BEiT block mask the batched data.block_masks replaced: random
    rectangles first, then single patches to the exact count."""
    mask = np.zeros((h, w), bool)
    for _ in range(100):
        left = num_masked - int(mask.sum())
        if left < min_block:
            break
        area = rng.uniform(min_block, left)
        ar = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
        bh, bw = int(round(np.sqrt(area * ar))), int(round(np.sqrt(area / ar)))
        if 0 < bh <= h and 0 < bw <= w:
            top, lft = int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1))
            new = bh * bw - int(mask[top:top + bh, lft:lft + bw].sum())
            if 0 < new <= left:
                mask[top:top + bh, lft:lft + bw] = True
    left = num_masked - int(mask.sum())
    if left > 0:
        mask.ravel()[rng.choice(np.flatnonzero(~mask.ravel()), left, replace=False)] = True
    return mask


def neighbour_share(masks):
    """Share of masked patches with a masked 4-neighbour: ~1 for blocks, ~ratio for scattered patches."""
    m = np.pad(np.asarray(masks, bool), ((0, 0), (1, 1), (1, 1)))
    core = m[:, 1:-1, 1:-1]
    near = m[:, :-2, 1:-1] | m[:, 2:, 1:-1] | m[:, 1:-1, :-2] | m[:, 1:-1, 2:]
    return (core & near).sum() / core.sum()


def test_ibot_masks_ratio_share_and_blocks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = data.ibot_mask_counts(8, 64, rng, (0.1, 0.5), 0.5)
        assert (counts == 0).sum() == 4
        assert ((counts[counts > 0] >= 0.1 * 64 - 1) & (counts[counts > 0] <= 0.5 * 64 + 1)).all()
    # The batched device version masks exactly the counts, in blocks like the reference.
    counts = torch.from_numpy(rng.integers(6, 33, 400))
    masks = data.block_masks(counts, 8, 8, torch.rand(400, 10, 4), torch.rand(400, 64))
    assert torch.equal(masks.sum(1), counts)
    reference = np.stack([reference_block_mask(8, 8, int(c), rng) for c in counts])
    assert neighbour_share(masks.view(-1, 8, 8).numpy()) == pytest.approx(neighbour_share(reference), abs=0.03)
    scattered = data.random_subsets(counts, torch.rand(400, 64)).view(-1, 8, 8).numpy()
    assert neighbour_share(scattered) < neighbour_share(reference) - 0.1


def test_dino_head_prototypes_are_unit_norm():
    head = DINOHead(12, 10, 32, 8)
    with torch.no_grad():
        head.prototypes.mul_(7)
    out = head(torch.randn(3, 12))
    assert out.shape == (3, 10) and out.abs().max() <= 1 + 1e-5  # cosine similarities


def test_teacher_gets_no_gradients_and_follows_ema(scene, cache_dir, tmp_path):
    out = tmp_path / "d"
    pretrain_dino.main(dino_args(scene, out, cache_dir, 2))
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    args = pretrain_dino.parse_args(dino_args(scene, out, cache_dir, 2))
    student, teacher = pretrain_dino.build(args, 16)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    # The teacher moved towards the student, and differs from it (momentum < 1).
    t, s = ckpt["teacher"], ckpt["student"]
    assert any(not torch.equal(t[k], s[k]) for k in t)
    rows = losses(out)
    for key in ("dino_global", "dino_local", "ibot", "koleo", "teacher_entropy", "cls_std", "teacher_temp", "momentum"):
        assert key in rows[2], key


def interrupt_at_call(monkeypatch, n):
    """The n-th student forward raises KeyboardInterrupt (with --ckpt-every 2, call 3 dies after the step-2
    checkpoint)."""
    real, calls = pretrain_dino.Student.forward, [0]

    def forward(self, *a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(pretrain_dino.Student, "forward", forward)


@pytest.mark.parametrize("pipeline", ["--no-device-augment", "--device-augment"])
def test_resume_after_interruption_matches(scene, cache_dir, tmp_path, monkeypatch, pipeline):
    """Bit for bit, with the multi-crop in the loader or batched on the device (here the CPU)."""
    pretrain_dino.main(dino_args(scene, tmp_path / "full", cache_dir, 4, 4, pipeline))
    with monkeypatch.context() as m:
        interrupt_at_call(m, 3)
        with pytest.raises(KeyboardInterrupt):
            pretrain_dino.main(dino_args(scene, tmp_path / "cut", cache_dir, 4, 4, pipeline))
    pretrain_dino.main(dino_args(scene, tmp_path / "cut", cache_dir, 4, 4, pipeline, "--resume"))
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [full[s]["loss"] for s in range(1, 5)] == [cut[s]["loss"] for s in range(1, 5)]
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])


@pytest.mark.parametrize("pipeline", ["--no-device-augment", "--device-augment"])
def test_one_and_two_processes_give_the_same_first_loss(scene, cache_dir, tmp_path, pipeline):
    """The global batch of 8 tiles in one process, or split 4 + 4 over two: the same first-step loss
    terms. With --device-augment each tile's views and masks are drawn from (seed, step, its place in the
    global batch), so both runs see the same views (the multi-crop runs batched on the CPU device)."""
    common = ["--drop-path", "0", "--steps", "1", "--ckpt-every", "1", pipeline]
    pretrain_dino.main(dino_args(scene, tmp_path / "one", cache_dir, 1, 8, *common))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "pretrain_dino.py"), *dino_args(scene, tmp_path / "two", cache_dir, 1, 4, *common)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(tmp_path / "one")[1], losses(tmp_path / "two")[1]
    for key in ("loss", "dino_global", "dino_local", "ibot", "koleo"):
        assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-5), key


def test_dino_backbone_initialises_finetuning(scene, cache_dir, tmp_path):
    pretrain_dino.main(dino_args(scene, tmp_path / "d", cache_dir, 2))
    finetune_seg.main(["--data", scene, "--out", str(tmp_path / "ft"), "--cache-dir", cache_dir, "--img-size", "16",
                       "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--workers", "0", "--finetune",
                       "--init", str(tmp_path / "d" / "ckpt.pt")])
    ft = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)
    assert ft["backbone"]["num_registers"] == 4 and ft["backbone"]["mask_token"]
