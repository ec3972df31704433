"""Aligning SAMS-VAE's latent basis: exact re-expression of the model, recovery of a sparse basis,
and the training schedule around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sams_core.models.base import Batch
from sams_core.models.registry import build_model


@pytest.fixture(scope="module")
def data_split(screen):
    from sams_core.data.screen import from_anndata
    from sams_core.data.splits import make_split

    data = from_anndata(screen[0])
    return data, make_split(data, "heldout-combos", fraction=0.34, seed=0)


def _model(guide: str, **kw):
    torch.manual_seed(0)
    return build_model("sams_vae", n_genes=20, n_perturbations=12, n_latent=4, n_hidden=16, guide=guide, embed_hidden=8, **kw)


def _batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.rand(9, 20, generator=g) * 5)
    d = torch.eye(12)[torch.arange(9)]
    return Batch(x, d, x.sum(1) + 1, torch.full((9,), -1))


@pytest.mark.parametrize("guide", ["mean-field", "correlated"])
def test_rotation_describes_the_same_cells(guide):
    """With every mask on, a rotated model maps each cell to the rotated latent and decodes it identically."""
    m = _model(guide)
    m.mask_logits.data.fill_(30.0)
    b = _batch()
    with torch.no_grad():
        before = m.latent(b)["full"]
        out = m.decoder(before)
        shift = m.latent_shift(torch.eye(12))
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2)))
    m.rotate_units(Q, mask_logit=30.0)
    with torch.no_grad():
        after = m.latent(b)["full"]
        torch.testing.assert_close(after, before @ Q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.decoder(after), out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.latent_shift(torch.eye(12)), shift @ Q, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_logit", [0.0, 3.0])
def test_masks_restarting_below_one_keep_the_expected_shifts(mask_logit):
    """Masks restarting at probability p < 1 would scale every expected shift by p; the embeddings
    make up for it, so each perturbation's expected shift is the rotated one."""
    m = _model("mean-field")
    m.mask_logits.data.fill_(30.0)
    with torch.no_grad():
        shift = m.latent_shift(torch.eye(12))
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2)))
    m.rotate_units(Q, mask_logit=mask_logit)
    with torch.no_grad():
        assert torch.sigmoid(m.mask_logits).allclose(torch.sigmoid(torch.tensor(mask_logit)))
        torch.testing.assert_close(m.latent_shift(torch.eye(12)), shift @ Q, atol=1e-5, rtol=1e-5)


def test_rotation_must_be_orthogonal():
    with pytest.raises(ValueError, match="orthogonal"):
        _model("mean-field").rotate_units(torch.full((4, 4), 0.5))


def test_sparsest_rotation_recovers_a_rotated_sparse_basis():
    """Shifts that are sparse in a hidden basis become sparse again (up to order and sign)."""
    from scipy.optimize import linear_sum_assignment

    from sams_core.models.rotation import sparsest_rotation

    rng = np.random.default_rng(0)
    T, K = 24, 6
    truth = np.zeros((T, K))
    for t in range(T):
        on = rng.choice(K, size=1 + t % 2, replace=False)
        truth[t, on] = rng.choice([-1, 1], on.size) * rng.normal(5, 0.5, on.size)
    Q, _ = np.linalg.qr(rng.normal(size=(K, K)))
    hidden = truth @ Q.T
    R = sparsest_rotation(hidden).numpy()
    np.testing.assert_allclose(R.T @ R, np.eye(K), atol=1e-5)
    got = hidden @ R
    support = np.abs(got) > 0.5
    r, c = linear_sum_assignment(-(truth != 0).T.astype(float) @ support)
    assert (support[:, c] == (truth != 0)[:, r]).all()
    assert (np.abs(hidden) > 0.5).sum() > support.sum()  # it was dense before
    np.testing.assert_allclose(np.abs(got[:, c]), np.abs(truth[:, r]), atol=0.05)
    with pytest.raises(ValueError, match="T, K"):
        sparsest_rotation(np.zeros(3))


def test_align_units_makes_the_model_sparse():
    rng = np.random.default_rng(1)
    truth = np.zeros((12, 4))
    truth[np.arange(12), np.arange(12) % 4] = rng.choice([-5.0, 5.0], 12)
    Q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    m = _model("mean-field")
    with torch.no_grad():
        m.mask_logits.fill_(30.0)
        m.e_mean.copy_(torch.as_tensor(truth @ Q.T, dtype=torch.float32))
    m.align_units(mask_logit=30.0)
    got = m.latent_shift(torch.eye(12)).detach().numpy()
    assert ((np.abs(got) > 0.5).sum(1) == 1).all()


def test_schedule_aligns_once_then_trains_the_final_objective():
    m = _model("mean-field", align_at=0.25, global_weight=10.0, warmup_global_weight=1.0, sparsify_for=0.0)
    assert m.current_global_weight == 1.0 and m.schedule_phase == "warmup"
    assert not m.end_epoch(1, 8)
    assert m.end_epoch(2, 8)
    assert m.aligned and m.schedule_phase == "final" and m.current_global_weight == 10.0
    assert torch.allclose(torch.sigmoid(m.mask_logits), torch.full((12, 4), torch.sigmoid(torch.tensor(1.5)).item()))
    assert not m.end_epoch(3, 8)
    default = _model("mean-field")  # align after 2 of 8 epochs, prune at weight 30 for 4, end on the ELBO
    assert [(default.end_epoch(e, 8), default.schedule_phase, default.current_global_weight) for e in range(1, 9)] == [
        (False, "warmup", 1.0), (True, "sparsify", 30.0), (False, "sparsify", 30.0), (False, "sparsify", 30.0),
        (False, "sparsify", 30.0), (False, "final", 1.0), (False, "final", 1.0), (False, "final", 1.0)]
    never = _model("mean-field", align_at=None)  # the paper's ELBO from the first epoch
    assert not never.aligned and never.schedule_phase == "final"
    assert not never.end_epoch(5, 8) and never.current_global_weight == 1.0
    cpa = build_model("cpa_vae", n_genes=20, n_perturbations=12, n_latent=4, n_hidden=16)
    assert cpa.current_global_weight == 1.0 and not cpa.end_epoch(7, 8)
    with pytest.raises(ValueError, match="align_at"):
        _model("mean-field", align_at=1.5)


def test_training_aligns_on_schedule(data_split, monkeypatch):
    """fit() runs the schedule: the basis is aligned after a quarter of the budget and each new
    phase (the pruning after the alignment, the final ELBO) starts with a fresh optimiser; the kept
    state is from the final phase."""
    from sams_core.training import trainer
    from sams_core.training.trainer import TrainConfig, train

    restarts = []
    original = trainer.TrainStep.restart_optimizer

    def record(step):
        restarts.append((step.model.schedule_phase, step.steps))
        original(step)

    monkeypatch.setattr(trainer.TrainStep, "restart_optimizer", record)
    data, split = data_split
    model, res = train(data, "sams_vae", split, TrainConfig(epochs=8, batch_size=256), n_latent=4, n_hidden=32)
    assert model.aligned and res.best_epoch > 6 and res.best_phase == "final"
    per_epoch = res.history[0].step
    assert restarts == [("warmup", 0), ("sparsify", 2 * per_epoch), ("final", 6 * per_epoch)]  # the first: a new run
    short, _ = train(data, "sams_vae", split, TrainConfig(epochs=1, batch_size=256), n_latent=4, n_hidden=32)
    assert not short.aligned  # nothing left to train after an alignment: not done


def test_svae_plus_alignment_is_exact_and_scheduled():
    m = build_model("svae_plus", n_genes=20, n_perturbations=6, n_latent=4, n_hidden=16, n_conditions=6)
    b = _batch()
    with torch.no_grad():
        m.pi_logits.fill_(30.0)
        before = m._encode(b.x)[0]
        out = m.decoder(before)
        table = m.shift.clone()
    R = m.align_units(mask_logit=30.0)
    with torch.no_grad():
        after = m._encode(b.x)[0]
        torch.testing.assert_close(after, before @ R, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.decoder(after), out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.shift, table @ R, atol=1e-5, rtol=1e-5)
    s = build_model("svae_plus", n_genes=20, n_perturbations=6, n_latent=4, n_hidden=16, align_at=0.5)
    assert not s.end_epoch(1, 4) and s.end_epoch(2, 4) and s.aligned and not s.end_epoch(3, 4)
