"""Every script turns a mistake in the input into one line, `error: <file>: <problem>`, and exit status 2;
--debug or HSI_SSL_DEBUG=1 brings the traceback back."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPTS = [
    ("pretrain_mae.py", ["--data", "/nonexistent", "--out", "{tmp}/r"], "/nonexistent: no such folder"),
    ("pretrain_dino.py", ["--data", "/nonexistent", "--out", "{tmp}/r"], "/nonexistent: no such folder"),
    ("pretrain_contrast.py", ["--data", "/nonexistent", "--out", "{tmp}/r"], "/nonexistent: no such folder"),
    ("finetune_seg.py", ["--data", "/nonexistent", "--out", "{tmp}/r"], "/nonexistent: no such folder"),
    ("eval.py", ["--ckpt", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt: no checkpoint there"),
    ("bench.py", ["--loader", "--data", "/nonexistent"], "/nonexistent: no such folder"),
    ("formats.py", ["/nonexistent.hdr", "--out", "{tmp}/r"], "/nonexistent.hdr: no such file"),
    ("compare.py", ["--study", "s", "--config", "nameless", "--runs-dir", "{tmp}/r"], "--config 'nameless': expected"),
]


def script_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "HSI_SSL_DEBUG"}
    return {**env, "OMP_NUM_THREADS": "1", "HSI_SSL_CACHE": str(tmp_path / "cache"), **extra}


def test_every_script_prints_one_line_errors_without_traceback(tmp_path):
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, s), *(a.format(tmp=tmp_path / s) for a in args)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(tmp_path))
             for s, args, _ in SCRIPTS]  # started together: each spends its seconds importing torch
    for (script, _, message), proc in zip(SCRIPTS, procs):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (script, err[-2000:])
        assert "Traceback" not in err, (script, err[-2000:])
        assert err.strip().splitlines()[-1].startswith(f"error: {message}"), (script, err[-2000:])


def test_debug_flag_or_environment_brings_the_traceback_back(tmp_path):
    args = ["--data", "/nonexistent", "--out", str(tmp_path / "r")]
    for extra, env in ((["--debug"], {}), ([], {"HSI_SSL_DEBUG": "1"})):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "finetune_seg.py"), *args, *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env=script_env(tmp_path, **env))
        assert proc.returncode != 0 and "Traceback" in proc.stderr
        assert "DataError: /nonexistent: no such folder" in proc.stderr
