"""DistributedDataParallel training on 2 CPU processes (gloo) matches single-process training.

How the noise is made to match. The models draw Monte-Carlo noise (mask and embedding draws,
one per particle; z_b reparameterisation noise, one per cell and particle) from the default
torch generator. Two ranks holding half a batch each cannot draw the same numbers as one
process drawing for the whole batch, so ``fit`` makes the noise a function of the data layout
that does not depend on the number of processes: in sharded mode each mini-batch is cut into
``shards`` contiguous pieces and the generator is re-seeded from (seed, step, shard) before each
piece. Then

1. 2 ranks × 1 shard each == 1 process with ``TrainConfig(shards=2)`` (gradient accumulation over
   the same two pieces): same batches, same noise, same weights per cell, so the parameters must
   agree to float rounding (gloo's all-reduce of two ranks adds the same two numbers);
2. the loss scaling (each shard's mean loss × its share of the batch × the number of ranks,
   divided back by DDP's averaging) makes the gradient that of the mean over the *whole* batch.
   That is checked against plain full-batch training with the noise replaced by a deterministic
   pattern that depends only on the particle index and the latent unit (not on the cell's
   position), which is the same whether a process sees the whole batch or half of it.

The same comparison as 1. is made for training from a backed .h5ad read in chunks, and the
command line is run in both processes the way torchrun runs it.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from sams_core.training import distributed
from sams_core.data.splits import make_split
from sams_core.data.screen import read_h5ad
from sams_core.training.trainer import TrainConfig, train

HP = dict(n_latent=4, n_hidden=32, guide="correlated", embed_hidden=16, embed_layers=2)
CFG = dict(epochs=3, batch_size=90, lr=3e-3, seed=5, device="cpu")


def _pattern(shape: tuple[int, ...], device=None, dtype=None) -> torch.Tensor:
    """sin(1 + 7·(index along dim 0) + (index along the last dim)), broadcast to ``shape``."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return torch.full((), math.sin(1.0), device=device, dtype=dtype or torch.float32)
    i0 = torch.arange(shape[0], dtype=torch.float64).reshape(-1, *([1] * (len(shape) - 1)))
    il = torch.arange(shape[-1], dtype=torch.float64)
    v = torch.sin(1.0 + 7.0 * i0 + il).expand(shape).contiguous()
    return v.to(device=device, dtype=dtype or torch.float32)


def _size(args) -> tuple[int, ...]:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)


class deterministic_noise:
    """Replace torch's Gaussian and uniform draws by :func:`_pattern` while active."""

    def __enter__(self):
        self.saved = (torch.randn, torch.randn_like, torch.rand, torch.rand_like)
        torch.randn = lambda *a, device=None, dtype=None, **kw: _pattern(_size(a), device, dtype)
        torch.randn_like = lambda t, **kw: _pattern(t.shape, t.device, t.dtype)
        torch.rand = lambda *a, device=None, dtype=None, **kw: 0.5 + 0.45 * _pattern(_size(a), device, dtype)
        torch.rand_like = lambda t, **kw: 0.5 + 0.45 * _pattern(t.shape, t.device, t.dtype)
        return self

    def __exit__(self, *exc):
        torch.randn, torch.randn_like, torch.rand, torch.rand_like = self.saved


def _run(path: str, patched: bool, backed: bool = False, **cfg_extra):
    if backed:  # rows read from the file in chunks of 64 (sams_core.data.backed)
        from sams_core.data.backed import read_h5ad_backed

        data = read_h5ad_backed(path, chunk_size=64, covariate_keys=[])
        cfg_extra.setdefault("chunks_per_buffer", 2)
    else:
        # without the screen's batch covariate: the float32 comparisons below are tuned to this
        # model (that covariates keep the gradient a sum over cells is tested in test_covariates)
        data = read_h5ad(path, covariate_keys=[])
    split = make_split(data, "random", val_fraction=0.15, test_fraction=0.1, seed=0)
    cfg = TrainConfig(**CFG, **cfg_extra)
    if patched:
        with deterministic_noise():
            model, res = train(data, "sams_vae", split, cfg, **HP)
    else:
        model, res = train(data, "sams_vae", split, cfg, **HP)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hist = [(h.train_loss, h.val_loss) for h in res.history]
    return state, hist, res.best_epoch


def _worker(rank: int, world: int, port: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init_process_group(rank, world, port, "cpu")
    try:
        results = {"sampled": _run(path, False), "patched": _run(path, True), "backed": _run(path, False, backed=True)}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        # the command line as torchrun runs it in each process (the environment says so):
        # every rank trains, rank 0 alone writes the bundle; it leaves the process group
        from sams_core.cli import main

        rc = main(["train", "--data", path, "--model", "cpa_vae", "--epochs", "1", "--latent", "3", "--hidden", "16",
                   "--batch-size", "128", "--device", "cpu", "--devices", str(world), "--no-eval",
                   "--out", os.path.join(out, "cli.sams")])
        Path(out, f"cli_rc{rank}").write_text(str(rc))
    finally:
        distributed.cleanup()


def _assert_states_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def screen_file(tmp_path_factory, screen):
    p = tmp_path_factory.mktemp("ddp") / "screen.h5ad"
    screen[0].write_h5ad(p)
    return str(p)


@pytest.fixture(scope="module")
def ddp_results(screen_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, distributed.free_port(), screen_file, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)] + [out]


def _single(screen_file: str, patched: bool, **cfg_extra):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: same summation order in the matrix products
    try:
        return _run(screen_file, patched, **cfg_extra)
    finally:
        torch.set_num_threads(threads)


def test_ranks_agree(ddp_results):
    (s0, h0, b0), (s1, h1, b1) = ddp_results[0]["sampled"], ddp_results[1]["sampled"]
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k  # parameters, mask logits and embeddings included
    assert h0 == h1 and b0 == b1


def test_two_ranks_match_single_process_on_same_shards(ddp_results, screen_file):
    state, hist, best = _single(screen_file, False, shards=2)
    s0, h0, b0 = ddp_results[0]["sampled"]
    _assert_states_close(s0, state, rtol=1e-5, atol=1e-6)
    assert b0 == best
    np.testing.assert_allclose(np.array(h0, dtype=float), np.array(hist, dtype=float), rtol=1e-5)
    # it trained: the global parameters moved from their initial values, the loss went down
    init, _, _ = _single(screen_file, False, shards=2, max_steps=0)
    assert not torch.allclose(init["mask_logits"], state["mask_logits"])
    assert hist[-1][0] < hist[0][0]


def test_two_half_batches_give_the_full_batch_gradient(ddp_results, screen_file):
    state, hist, best = _single(screen_file, True)  # one process, whole batches, no sharding
    s0, h0, b0 = ddp_results[0]["patched"]
    _assert_states_close(s0, state, rtol=1e-4, atol=1e-5)
    assert b0 == best
    np.testing.assert_allclose(np.array(h0, dtype=float), np.array(hist, dtype=float), rtol=1e-4)


def test_two_ranks_on_backed_file_match_single_process(ddp_results, screen_file):
    state, hist, best = _single(screen_file, False, backed=True, shards=2)
    s0, h0, b0 = ddp_results[0]["backed"]
    _assert_states_close(s0, state, rtol=1e-5, atol=1e-6)
    assert b0 == best
    np.testing.assert_allclose(np.array(h0, dtype=float), np.array(hist, dtype=float), rtol=1e-5)
    for k, v in ddp_results[1]["backed"][0].items():
        assert torch.equal(v, s0[k]), k


def test_shards_must_divide_over_ranks(screen):
    from sams_core.data.screen import from_anndata
    from sams_core.errors import SamsError

    data = from_anndata(screen[0])
    split = make_split(data, "random", seed=0)
    with pytest.raises(SamsError, match="distributed=True needs"):
        train(data, "cpa_vae", split, TrainConfig(epochs=1, distributed=True, device="cpu"), n_latent=2, n_hidden=8)
    with pytest.raises(SamsError, match="positive multiple"):
        train(data, "cpa_vae", split, TrainConfig(epochs=1, shards=0, device="cpu"), n_latent=2, n_hidden=8)


def test_cli_under_torchrun_trains_on_all_ranks_and_rank0_saves(ddp_results):
    out = ddp_results[2]
    assert [Path(out, f"cli_rc{r}").read_text() for r in range(2)] == ["0", "0"]
    from sams_core.io.bundle import load_bundle

    bundle = load_bundle(out / "cli.sams")
    assert bundle.manifest["training"]["config"]["device"] == "cpu"


def test_cli_devices_relaunches_itself_with_torchrun(monkeypatch, screen_file, tmp_path):
    import sams_core.cli as cli

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    argv = ["train", "--data", screen_file, "--devices", "2", "--device", "cpu", "--out", str(tmp_path / "m.sams")]
    assert cli.main(argv) == 0
    (cmd,) = calls
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:] == ["-m", "sams_core", *argv]
    help_text = cli._parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "torch.distributed.run" in help_text and "--nproc_per_node=N" in help_text
