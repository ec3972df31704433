"""A training step ready for the GPU (issue 17): one graph, no host synchronisation, static shapes.

- Every family's whole step (gather, forward, backward, clipping, Adam) traces with
  ``torch.compile(fullgraph=True)``: no graph break, hence no ``.item()``, ``.cpu()``, ``nonzero``
  or Python branching on tensor values inside it, and no recompilation from step to step.
- Compiled with Inductor, training gives the same losses as eager to 1e-5 (with Inductor drawing
  its random numbers as eager does, ``fallback_random``).
- When compiling is not possible the run trains eagerly and says why; the last partial batch is
  left out or run eagerly; float16 storage of the counts halves their memory and changes nothing.

Compiling is slow on a CPU, so by default two families are traced by Dynamo alone (it is Dynamo
that finds graph breaks) and one is compiled by Inductor; ``SAMS_COMPILE_ALL=1`` takes every
family through both. Where CUDA is present (``bash bench/gpu_check.sh``) the device tests run
there too: ``reduce-overhead`` must capture CUDA graphs and an eager step must not synchronise.
The data is made here (no anndata), so ``pytest --noconftest`` runs these on the GPU image.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from sams_core.data.batches import DeviceData, condition_ids
from sams_core.data.screen import PerturbationData
from sams_core.errors import SamsError
from sams_core.training.build import build_for_data
from sams_core.training.trainer import Placement, TrainConfig, TrainStep, fit

ALL = os.environ.get("SAMS_COMPILE_ALL") == "1"
EVERY_FAMILY = ["sams_vae", "sams_vae:correlated", "cpa_vae", "conditional_vae", "vae", "svae_plus"]
TRACED = EVERY_FAMILY if ALL else ["sams_vae:correlated", "svae_plus"]
INDUCTOR = EVERY_FAMILY if ALL else ["conditional_vae"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

DYNAMO_OK = torch._dynamo.is_dynamo_supported() and hasattr(torch._dynamo.config, "trace_autograd_ops")
needs_dynamo = pytest.mark.skipif(not DYNAMO_OK, reason="torch.compile with backward tracing (torch >= 2.11) is unavailable")


def _inductor_ok(device: str) -> bool:
    if not DYNAMO_OK:
        return False
    return device == "cuda" or bool(shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++"))


def tiny_screen(n_cells: int = 360, n_genes: int = 24, seed: int = 0) -> PerturbationData:
    """Counts for 4 single perturbations, 2 pairs and controls; small integers (exact in float16)."""
    rng = np.random.default_rng(seed)
    perts = ["A", "B", "C", "D"]
    conds = ["control", "A", "B", "C", "D", "A+B", "C+D"]
    labels = np.array([conds[i] for i in rng.integers(0, len(conds), n_cells)], dtype=object)
    d = np.array([[float(p in lab.split("+")) for p in perts] for lab in labels], dtype=np.float32)
    effect = rng.normal(0, 1.0, (len(perts), n_genes))
    rate = np.exp(1.0 + 0.3 * rng.normal(size=(n_cells, n_genes)) + d @ effect)
    X = rng.poisson(rate).astype(np.float32)
    return PerturbationData(
        X=X, is_counts=True, library=np.maximum(X.sum(1), 1.0).astype(np.float32), dosages=d, labels=labels,
        perturbations=perts, genes=[f"g{i}" for i in range(n_genes)], obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
    )


@pytest.fixture(scope="module")
def screen() -> tuple[PerturbationData, np.ndarray]:
    data = tiny_screen()
    split = np.full(data.n_cells, "train", dtype=object)
    split[-40:] = "val"
    return data, split


def _model(family_spec: str, data: PerturbationData, split: np.ndarray, seed: int = 0, **extra):
    family, _, guide = family_spec.partition(":")
    hp = {"n_latent": 3, "n_hidden": 16, **extra}
    if guide:
        hp.update(guide=guide, embed_hidden=8)
    torch.manual_seed(seed)
    return build_for_data(family, data, split, **hp)


def _steps(family_spec: str, screen, compile_backend: str | None, n_steps: int = 4, precision: str = "float32") -> tuple[list[float], TrainStep]:
    """Loss of each of ``n_steps`` steps of 32 cells, eager or compiled with ``compile_backend``."""
    data, split = screen
    model = _model(family_spec, data, split)
    cfg = TrainConfig(device="cpu", batch_size=32, lr=3e-3, grad_clip=5.0, precision=precision)
    pl = Placement(torch.device("cpu"))
    step = TrainStep(model, DeviceData(data, np.flatnonzero(split == "train"), pl.device, condition_ids(model, data)), cfg, pl)
    if compile_backend:
        step.compile(backend=compile_backend)
    torch.manual_seed(1)
    losses = []
    for i in range(n_steps):
        step.begin_epoch()
        step(torch.arange(32 * i, 32 * i + 32))
        losses.append(step.epoch_means(1)[0])
    return losses, step


# ---- one graph ---------------------------------------------------------------------------------
@needs_dynamo
@pytest.mark.parametrize("family", TRACED)
def test_whole_step_is_one_graph_without_recompiles(family, screen):
    counters = torch._dynamo.utils.counters
    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        compiled, step = _steps(family, screen, compile_backend="eager")
    assert step.compiled == "default" and step.notes == []
    # one graph for the three compiled steps (the first step runs eagerly): no break, no recompile
    assert counters["stats"]["unique_graphs"] - graphs == 1
    eager, _ = _steps(family, screen, compile_backend=None)
    np.testing.assert_allclose(compiled, eager, rtol=1e-5)


@needs_dynamo
def test_bf16_autocast_step_is_one_graph(screen):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, step = _steps("cpa_vae", screen, compile_backend="eager", n_steps=2, precision="bf16-mixed")
    assert step.compiled == "default"


# ---- compiled == eager ---------------------------------------------------------------------------
def _fit_pair(data, split, family: str, device: str, mode: str):
    """Two epochs compiled and eager, the optimiser restarted after the first (as after SAMS-VAE's
    alignment of the latent basis, which is left out: the sparsest rotation is not a smooth function
    of the weights, so rounding-level differences could pick another one)."""
    cfg = {"epochs": 2, "batch_size": 64, "lr": 3e-3, "seed": 2, "device": device, "drop_last": True}
    extra = {"align_at": None} if family.startswith("sams_vae") else {}
    runs = []
    for compile_mode in (mode, None):
        model = _model(family, data, split, **extra)
        model.end_epoch = lambda epoch, total: epoch == 1  # a fresh Adam for epoch 2
        with torch._inductor.config.patch(fallback_random=True):  # Inductor draws eager's random numbers
            res = fit(model, data, split, TrainConfig(compile=compile_mode, **cfg))
        runs.append((res, {k: v.detach().cpu() for k, v in model.state_dict().items()}))
    return runs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", INDUCTOR)
def test_compiled_training_matches_eager(family, device, screen):
    if not _inductor_ok(device):
        pytest.skip("Inductor cannot compile here (no torch.compile with backward tracing, or no C++ compiler)")
    data, split = screen
    (res_c, state_c), (res_e, state_e) = _fit_pair(data, split, family, device, "default")
    assert res_c.compiled == "default" and res_c.notes == [], res_c.notes
    tol = 1e-5 if device == "cpu" else 1e-4
    np.testing.assert_allclose([h.train_loss for h in res_c.history], [h.train_loss for h in res_e.history], rtol=tol)
    np.testing.assert_allclose([h.val_loss for h in res_c.history], [h.val_loss for h in res_e.history], rtol=tol)
    for k in state_e:
        torch.testing.assert_close(state_c[k], state_e[k], rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_reduce_overhead_captures_cuda_graphs(screen):
    data, split = screen
    (res_g, _), (res_e, _) = _fit_pair(data, split, "sams_vae:correlated", "cuda", "reduce-overhead")
    assert res_g.compiled == "reduce-overhead" and res_g.cuda_graphs, res_g.notes
    np.testing.assert_allclose([h.train_loss for h in res_g.history], [h.train_loss for h in res_e.history], rtol=1e-4)
    assert res_g.data_bytes > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a GPU matter")
@pytest.mark.parametrize("family", ["sams_vae:correlated", "svae_plus"])
def test_eager_step_never_synchronises_with_the_host(family, screen):
    data, split = screen
    model = _model(family, data, split).cuda()
    pl = Placement(torch.device("cuda"))
    cfg = TrainConfig(device="cuda", batch_size=32, grad_clip=5.0)
    step = TrainStep(model, DeviceData(data, np.flatnonzero(split == "train"), pl.device, condition_ids(model, data)), cfg, pl)
    idx = torch.arange(64, device="cuda")
    step(idx[:32])  # creates Adam's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(idx[32:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(step.epoch_means(4)[0])


# ---- falling back, static shapes ----------------------------------------------------------------
def _history(res) -> list[tuple[float, float | None, int]]:
    return [(h.train_loss, h.val_loss, h.step) for h in res.history]


def test_compile_falls_back_to_eager_and_says_why(screen, monkeypatch):
    data, split = screen
    cfg = {"epochs": 1, "batch_size": 64, "lr": 3e-3, "device": "cpu"}
    with pytest.warns(RuntimeWarning, match="fell back to eager: compile runs single-process training without shards"):
        res = fit(_model("cpa_vae", data, split), data, split, TrainConfig(compile="default", shards=2, **cfg))
    assert res.compiled is None and "without shards" in res.notes[0]
    assert _history(res) == _history(fit(_model("cpa_vae", data, split), data, split, TrainConfig(shards=2, drop_last=True, **cfg)))

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler found\nmore")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler found\)"):
        res = fit(_model("cpa_vae", data, split), data, split, TrainConfig(compile="reduce-overhead", **cfg))
    assert res.compiled is None and not res.cuda_graphs
    assert any("torch.compile failed" in n for n in res.notes)
    # the step that failed to compile ran eagerly: the run is the eager run (last partial batch left out)
    eager = fit(_model("cpa_vae", data, split), data, split, TrainConfig(drop_last=True, **cfg))
    assert _history(res) == _history(eager)


def test_last_partial_batch_is_left_out_or_run_eagerly(screen, monkeypatch):
    data, split = screen
    n_train = int((split == "train").sum())
    calls = {"compiled": 0}

    def counting(fn, **kw):  # a "compiler" that runs the step as it is and counts its calls
        def run(*a, **k):
            calls["compiled"] += 1
            return fn(*a, **k)
        return run

    monkeypatch.setattr(torch, "compile", counting)
    cfg = {"epochs": 2, "batch_size": 48, "lr": 3e-3, "device": "cpu"}
    full, partial = divmod(n_train, 48)
    assert partial
    dropped = fit(_model("conditional_vae", data, split), data, split, TrainConfig(compile="default", **cfg))
    assert [h.step for h in dropped.history] == [full, 2 * full]
    assert calls["compiled"] == 2 * full - 1  # the first step runs eagerly: it creates Adam's state
    calls["compiled"] = 0
    kept = fit(_model("conditional_vae", data, split), data, split, TrainConfig(compile="default", drop_last=False, **cfg))
    assert [h.step for h in kept.history] == [full + 1, 2 * full + 2]
    assert calls["compiled"] == 2 * full - 1  # partial batches ran eagerly
    monkeypatch.undo()
    assert _history(kept) == _history(fit(_model("conditional_vae", data, split), data, split, TrainConfig(**cfg)))
    with pytest.raises(SamsError, match="fewer than one batch"):
        fit(_model("vae", data, split), data, split, TrainConfig(batch_size=1000, drop_last=True, device="cpu"))


def test_config_refuses_unknown_modes(screen):
    data, split = screen
    with pytest.raises(SamsError, match="compile mode 'max-autotune'.*default, reduce-overhead"):
        fit(_model("vae", data, split), data, split, TrainConfig(compile="max-autotune", device="cpu"))
    with pytest.raises(SamsError, match="data_dtype 'int8'"):
        fit(_model("vae", data, split), data, split, TrainConfig(data_dtype="int8", device="cpu"))


# ---- data resident on the device ------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_float16_storage_halves_the_counts_and_changes_nothing(device, screen):
    data, split = screen
    dev = torch.device(device)
    idx = np.flatnonzero(split == "train")
    cond = np.full(data.n_cells, -1)
    full, half = DeviceData(data, idx, dev, cond), DeviceData(data, idx, dev, cond, storage="float16")
    assert half.x.dtype == torch.float16 and half.notes == []
    assert full.nbytes - half.nbytes == full.x.numel() * 2
    rows = torch.arange(0, 64, 3, device=dev)
    assert half.batch(rows).x.dtype == torch.float32 and torch.equal(half.batch(rows).x, full.batch(rows).x)
    cfg = {"epochs": 1, "batch_size": 64, "device": device}
    r32 = fit(_model("conditional_vae", data, split), data, split, TrainConfig(**cfg))
    r16 = fit(_model("conditional_vae", data, split), data, split, TrainConfig(data_dtype="float16", **cfg))
    assert r16.data_bytes < r32.data_bytes and _history(r16) == _history(r32)
    # values float16 cannot hold exactly stay in float32, with a warning that says so
    odd = data.replace(X=data.X + np.float32(0.1))
    with pytest.warns(RuntimeWarning, match="float16 storage would round"):
        kept = DeviceData(odd, idx, dev, cond, storage="float16")
    assert kept.x.dtype == torch.float32 and kept.notes


def test_each_step_owns_its_compile_cache(screen):
    """Models trained one after another in one process each get their own graphs: torch.compile
    caps recompilations per code object (8 by default; 2 here), and a step object past the cap
    would otherwise run eagerly."""
    if not DYNAMO_OK:
        pytest.skip("torch.compile with backward tracing is unavailable")
    data, split = screen
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{name: 2}):
        for _ in range(4):
            model = _model("vae", data, split)
            pl = Placement(torch.device("cpu"))
            step = TrainStep(model, DeviceData(data, np.arange(64), pl.device, condition_ids(model, data)), TrainConfig(batch_size=32), pl)
            step.compile(backend="eager")
            step(torch.arange(32))
            step(torch.arange(32, 64))
            assert step.compiled == "default" and step.notes == []
