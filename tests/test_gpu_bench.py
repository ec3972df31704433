"""bench/gpu_train.py and bench/gpu_check.sh dry-run on the CPU at tiny sizes, so that the one
prepared GPU run cannot fail for a typo: every mode, both precisions, the bf16 check, the table
and its Markdown copy. Compilation is traced by Dynamo only (``--compile-backend eager``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--small", "--device", "cpu", "--cells", "500", "--genes", "30", "--latent", "4", "--hidden", "16",
        "--embed-hidden", "8", "--embed-layers", "2", "--perturbations", "6", "--combinations", "4",
        "--batch-size", "64", "--epochs", "1", "--matmul-size", "128", "--heldout", "0.2"]


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_train", ROOT / "bench" / "gpu_train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_train"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"), reason="needs torch.compile with backward tracing")
def test_every_mode_and_precision_runs_and_writes_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", torch.compile)  # the bench swaps the backend: undone after the test
    bench = _bench()
    assert bench.main([*TINY, "--models", "conditional_vae", "--compile-backend", "eager", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "gpu_train.md").read_text()
    for mode in ("eager", "compiled", "graphs"):
        for precision in ("float32", "bf16-mixed"):
            assert f"| Conditional VAE | {mode} | {precision} |" in md
        assert f"bf16 check, Conditional VAE, {mode}:" in out
    assert "ran eagerly" not in md and "skipped" not in md  # every compiled mode compiled as one graph
    assert "× floor" in md and "peak RSS" not in md and "training cells on the device" in md


def test_other_models_and_time_budget(tmp_path, capsys):
    bench = _bench()
    argv = [*TINY, "--models", "sams_vae", "cpa_vae", "--modes", "eager", "--precisions", "float32",
            "--data-dtype", "float16", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    md = (tmp_path / "gpu_train.md").read_text()
    assert "| SAMS-VAE (correlated) | eager | float32 |" in md and "| CPA-VAE (correlated) | eager | float32 |" in md
    assert bench.main([*argv, "--budget-s", "0"]) == 0
    assert (tmp_path / "gpu_train.md").read_text().count("skipped (time budget)") == 2


def test_gpu_check_script_runs_the_bench(tmp_path):
    env = {**os.environ, "GPU_CHECK_TESTS": "0", "OUT": str(tmp_path), "PYTHON": sys.executable}
    args = TINY[1:] + ["--models", "conditional_vae", "--modes", "eager", "--precisions", "float32"]
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--small", *args], check=False, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| Conditional VAE | eager | float32 |" in (tmp_path / "gpu_train.md").read_text()
    assert (tmp_path / "gpu_train.log").exists() and "bench exit 0" in proc.stdout
