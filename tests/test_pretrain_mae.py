import json
import os
import subprocess
import sys

import pytest
import torch

import pretrain_mae
from conftest import write_scene
from models import MAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args_for(scene, out, cache_dir, steps=6, *extra):
    return ["--data", scene, "--out", str(out), "--cache-dir", cache_dir, "--steps", str(steps),
            "--img-size", "32", "--batch-size", "4", "--warmup-steps", "2", "--blr", "1e-2",
            "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
            "--log-every", "1", "--ckpt-every", "3", "--image-every", "2", "--workers", "0", *extra]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows}  # a resumed run re-logs steps after its checkpoint


class Interrupt(Exception):
    pass


def fail_at_call(monkeypatch, n, make_result, model=MAE):
    """Make the n-th forward call of `model` (MAE, or SimMIM for sst) return make_result(real result)."""
    real, calls = model.forward, [0]

    def forward(self, *a, **kw):
        calls[0] += 1
        result = real(self, *a, **kw)
        return make_result(result) if calls[0] == n else result
    monkeypatch.setattr(model, "forward", forward)


@pytest.mark.parametrize("pipeline", ["--no-device-augment", "--device-augment"])
def test_resume_continues_exactly(scene, cache_dir, tmp_path, monkeypatch, pipeline):
    """Bit for bit, with the augmentations in the loader or batched on the device (here the CPU)."""
    pretrain_mae.main(args_for(scene, tmp_path / "a", cache_dir, 6, pipeline, "--brightness", "0.1",
                               "--band-gain", "0.02"))
    full = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)

    def interrupt(result):
        raise Interrupt()
    with monkeypatch.context() as m:
        fail_at_call(m, 5, interrupt)  # dies during step 5, after the step-3 checkpoint
        with pytest.raises(Interrupt):
            pretrain_mae.main(args_for(scene, tmp_path / "b", cache_dir, 6, pipeline, "--brightness", "0.1",
                                       "--band-gain", "0.02"))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    pretrain_mae.main(args_for(scene, tmp_path / "b", cache_dir, 6, pipeline, "--brightness", "0.1", "--band-gain",
                               "0.02", "--resume"))
    resumed = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert os.listdir(tmp_path / "a" / "tb")


def test_loss_goes_down(scene, cache_dir, tmp_path):
    pretrain_mae.main(args_for(scene, tmp_path / "r", cache_dir, 60, "--ckpt-every", "60", "--blr", "0.05",
                               "--batch-size", "8", "--warmup-steps", "5", "--crop-scale", "1", "1"))
    curve = list(losses(tmp_path / "r").values())
    assert sum(curve[-10:]) / 10 < 0.93 * sum(curve[:10]) / 10, curve


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(scene, cache_dir, tmp_path, monkeypatch):
    fail_at_call(monkeypatch, 5, lambda r: (r[0] * float("nan"), *r[1:]))
    with pytest.raises(FloatingPointError, match="non-finite loss.*ckpt.pt"):
        pretrain_mae.main(args_for(scene, tmp_path / "n", cache_dir, 6, "--log-every", "3"))
    ckpt = torch.load(tmp_path / "n" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_refuses_mismatched_checkpoint_and_overwrite(scene, cache_dir, tmp_path):
    out = tmp_path / "m"
    pretrain_mae.main(args_for(scene, out, cache_dir, 3))
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain_mae.main(args_for(scene, out, cache_dir, 3))
    other = write_scene(tmp_path / "other", bands=12)
    with pytest.raises(ValueError, match=r"ckpt.pt: checkpoint was trained on 16 bands but the data has 12"):
        pretrain_mae.main(args_for(other, out, cache_dir, 6, "--resume"))
    with open(out / "ckpt.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="ckpt.pt: cannot read checkpoint"):
        pretrain_mae.main(args_for(scene, out, cache_dir, 6, "--resume"))


def test_torchrun_two_processes_gloo(scene, cache_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "pretrain_mae.py"), *args_for(scene, out, cache_dir, 4)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    assert len(losses(out)) == 4


def test_cosine_schedule():
    import common
    s = common.cosine_schedule(1.0, 0.1, 10, 3)
    assert len(s) == 10 and s[0] == 0 and abs(s[3] - 1.0) < 1e-9 and 0.1 <= s[-1] < 0.2
    assert all(a >= b for a, b in zip(s[3:], s[4:]))
    assert len(common.cosine_schedule(1.0, 0.0, 4, 40)) == 4
