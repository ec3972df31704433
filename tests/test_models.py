"""Model families: likelihoods against scipy, composition, training improves held-out IWELBO,
SAMS-VAE masks move toward the generator's targets."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch

from sams_core.data.screen import from_anndata
from sams_core.data.splits import make_split
from sams_core.models.distributions import Likelihood, nb_log_prob, poisson_log_prob, relaxed_bernoulli_st
from sams_core.evaluation.metrics import iwelbo
from sams_core.models.registry import FAMILIES, build_model
from sams_core.training.build import build_for_data
from sams_core.training.trainer import TrainConfig, fit, train


def test_negative_binomial_and_poisson_match_scipy():
    x = torch.tensor([0.0, 1.0, 5.0, 30.0])
    mu = torch.tensor([0.5, 2.0, 4.0, 25.0])
    theta = torch.tensor([2.0, 0.7, 10.0, 3.0])
    p = theta / (theta + mu)
    ref = st.nbinom.logpmf(x.numpy(), theta.numpy(), p.numpy())
    np.testing.assert_allclose(nb_log_prob(x, mu, theta).numpy(), ref, rtol=1e-4)
    np.testing.assert_allclose(poisson_log_prob(x, mu).numpy(), st.poisson.logpmf(x.numpy(), mu.numpy()), rtol=1e-4)
    lik = Likelihood("nb", 4)
    with torch.no_grad():
        lik.gene_param.copy_(torch.log(theta))
    lib = torch.tensor([100.0])
    out = torch.log(mu / 100.0).unsqueeze(0)  # softmax(out) * 100 = mu when mu sums to 100-ish
    out = out - torch.logsumexp(out, -1, keepdim=True) + torch.log(mu.sum() / 100.0)
    mean = lik.mean(out, lib)
    np.testing.assert_allclose(
        lik.log_prob(x.unsqueeze(0), out, torch.log(lib)).item(), nb_log_prob(x, mean[0], theta).sum().item(), rtol=1e-4
    )


def test_gaussian_likelihood_matches_scipy():
    lik = Likelihood("gaussian", 3)
    with torch.no_grad():
        lik.gene_param.copy_(torch.log(torch.tensor([0.5, 1.0, 2.0])))
    x = torch.tensor([[0.1, -1.0, 3.0]])
    m = torch.tensor([[0.0, 0.5, 1.0]])
    ref = st.norm.logpdf(x.numpy(), m.numpy(), [0.5, 1.0, 2.0]).sum()
    assert lik.log_prob(x, m, torch.zeros(1)).item() == pytest.approx(ref, rel=1e-5)


def test_straight_through_masks_are_hard_with_bernoulli_log_prob():
    logits = torch.tensor([[-2.0, 0.0, 3.0]], requires_grad=True)
    m, log_q = relaxed_bernoulli_st(logits, 1.0, (2000,))
    assert set(torch.unique(m.detach()).tolist()) <= {0.0, 1.0}
    freq = m.detach().mean(0)
    np.testing.assert_allclose(freq.numpy(), torch.sigmoid(logits).detach().numpy(), atol=0.04)
    expected = torch.where(m.detach() > 0, torch.nn.functional.logsigmoid(logits), torch.nn.functional.logsigmoid(-logits))
    np.testing.assert_allclose(log_q.detach().numpy(), expected.detach().numpy(), atol=1e-6)
    m.sum().backward()
    assert logits.grad is not None and torch.all(logits.grad > 0)


@pytest.mark.parametrize("guide", ["mean-field", "correlated"])
def test_combination_shift_is_sum_of_members(guide):
    torch.manual_seed(0)
    model = build_model("sams_vae", n_genes=10, n_perturbations=3, n_latent=4, guide=guide, n_hidden=16)
    g = model.sample_globals(6)
    d = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0], [0.5, 0, 2.0], [0, 0, 1.0]])
    shift = torch.matmul(d, g["shift_table"])
    torch.testing.assert_close(shift[:, 2], shift[:, 0] + shift[:, 1])
    torch.testing.assert_close(shift[:, 3], 0.5 * shift[:, 0] + 2.0 * shift[:, 4])
    es = model.latent_shift(d)
    torch.testing.assert_close(es[2], es[0] + es[1])


@pytest.fixture(scope="module")
def data_split(screen):
    data = from_anndata(screen[0])
    return data, make_split(data, "heldout-combos", fraction=0.34, seed=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_trains_and_beats_untrained(family, data_split):
    data, split = data_split
    hp = {"n_latent": 4, "n_hidden": 64}
    torch.manual_seed(0)
    model = build_for_data(family, data, split, **hp)
    test = np.flatnonzero(split == "test")
    before = iwelbo(model, data, test, n_samples=20).mean()
    res = fit(model, data, split, TrainConfig(epochs=12, lr=3e-3, batch_size=256))
    after = iwelbo(model, data, test, n_samples=20).mean()
    assert np.isfinite(after) and after > before + 5, (before, after)
    assert res.history[-1].train_loss < res.history[0].train_loss
    assert res.best_epoch >= 1 and res.history[-1].val_loss is not None
    assert set(res.history[0].terms) == {"log_px", "kl_z", "kl_global", "neg_elbo"}
    # every family's loss is its untempered −ELBO at the end of the schedule
    assert res.history[-1].terms["neg_elbo"] == pytest.approx(res.history[-1].train_loss, rel=1e-5)
    lat = model.latent(__import__("sams_core.data.batches", fromlist=["DeviceData"]).DeviceData(data, test[:5], torch.device("cpu"), np.full(data.n_cells, -1)).batch(torch.arange(5)))
    assert lat["full"].shape == (5, 4)


def test_sams_vae_masks_move_toward_true_targets(screen, data_split):
    data, split = data_split
    _, true_masks = screen
    model, res = train(data, "sams_vae", split, TrainConfig(epochs=30, lr=3e-3, batch_size=256), n_latent=4, n_hidden=64)
    probs = model.mask_probs().detach().numpy()  # rows in data.perturbations order
    names = ["KLF1", "GATA1", "SPI1", "CEBPA", "TAL1", "RUNX1"]
    truth = true_masks[[names.index(p) for p in data.perturbations]]
    from scipy.optimize import linear_sum_assignment

    # match inferred units to true units, then compare targeted vs untargeted probabilities
    cost = -(truth.T @ probs)
    r, c = linear_sum_assignment(cost)
    matched = probs[:, c]
    on, off = matched[truth[:, r] == 1].mean(), matched[truth[:, r] == 0].mean()
    assert on > off + 0.2, (on, off)
    assert res.history[-1].mask_frac_high is not None


def test_training_is_seeded(data_split):
    data, split = data_split
    cfg = TrainConfig(epochs=2, batch_size=256, seed=3)
    a, _ = train(data, "cpa_vae", split, cfg, n_latent=3, n_hidden=16)
    b, _ = train(data, "cpa_vae", split, cfg, n_latent=3, n_hidden=16)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, msg=k)


def test_sparse_rows_gathered_on_device_match_dense(data_split):
    from sams_core.data.batches import DeviceData

    data, _ = data_split
    idx = np.arange(data.n_cells)
    cond = np.full(data.n_cells, -1)
    sparse = DeviceData(data, idx, torch.device("cpu"), cond, dense=False)
    dense = DeviceData(data, idx, torch.device("cpu"), cond, dense=True)
    pick = torch.tensor([5, 0, 17, 17, 1000, 3])
    torch.testing.assert_close(sparse.batch(pick).x, dense.batch(pick).x)


def test_svae_fits_heldout_perturbations_with_frozen_networks(screen):
    from sams_core.training.new_conditions import fit_new_conditions

    data = from_anndata(screen[0])
    split = make_split(data, "heldout-perturbations", heldout=["TAL1"], seed=0)
    model, _ = train(data, "svae_plus", split, TrainConfig(epochs=10, lr=3e-3, batch_size=256), n_latent=4, n_hidden=32)
    test = np.flatnonzero(split == "test")
    before = iwelbo(model, data, test, n_samples=20).mean()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    ext, res = fit_new_conditions(model, data, test, TrainConfig(epochs=15, lr=3e-2, batch_size=256, global_lr_scale=1.0))
    assert ext.n_conditions == model.n_conditions + 1
    after = iwelbo(ext, data, test, n_samples=20).mean()
    assert after > before, (before, after)
    new_state = ext.state_dict()
    for k, v in frozen.items():
        if k.startswith(("encoder", "decoder", "likelihood")):
            torch.testing.assert_close(new_state[k], v, msg=k)
    A = model.n_conditions
    torch.testing.assert_close(new_state["shift"][:A], frozen["shift"])
    with pytest.raises(Exception, match="already know"):
        fit_new_conditions(ext, data, test)
