"""Ground-truth metrics: perfect on the truth, invariant to permuting inferred units, low for
shuffled masks and random latents, careful with extra units, clear errors for bad shapes."""

from __future__ import annotations

import numpy as np
import pytest

from sams_core.errors import SamsError
from sams_core.simulate import simulate_sams_screen, truth_from_adata
from sams_core.evaluation.truth import latent_mcc, mask_scores, match_units, target_recovery


@pytest.fixture(scope="module")
def sim():
    return simulate_sams_screen(n_perturbations=20, n_latent=6, n_genes=60, n_combinations=6, cells_per_perturbation=20, seed=3)


@pytest.fixture(scope="module")
def masks(sim):
    return truth_from_adata(sim).masks.astype(float)


def test_perfect_on_the_truth(sim, masks):
    assert mask_scores(masks, masks)["f1"] == 1.0
    r = target_recovery(masks, masks)
    assert r["f1"] == 1.0 and r["exact"] == 1.0 and r["exact_per_perturbation"].all()
    z = sim.obsm["X_true_latent"]
    m = latent_mcc(z, z)
    assert m["mcc"] == pytest.approx(1.0) and np.allclose(m["per_unit"], 1.0)
    np.testing.assert_array_equal(m["matching"], np.arange(z.shape[1]))


def test_invariant_to_permuting_inferred_units(sim, masks):
    perm = np.random.default_rng(0).permutation(masks.shape[1])
    probs = np.clip(masks * 0.9 + 0.05, 0, 1)[:, perm]  # probabilities, units shuffled
    s = mask_scores(masks, probs)
    assert s["f1"] == 1.0
    np.testing.assert_array_equal(s["matching"], np.argsort(perm))
    np.testing.assert_array_equal(probs[:, s["matching"]] >= 0.5, masks > 0)
    assert target_recovery(masks, probs)["exact"] == 1.0
    np.testing.assert_array_equal(match_units(masks, masks[:, perm]), np.argsort(perm))
    z = sim.obsm["X_true_latent"]
    inferred = z[:, perm] * np.array([-2.0, 1.0, 0.5, -1.0, 3.0, 1.0]) + 7.0  # permuted, rescaled, flipped
    m = latent_mcc(z, inferred)
    assert m["mcc"] == pytest.approx(1.0)
    np.testing.assert_array_equal(m["matching"], np.argsort(perm))
    np.testing.assert_array_equal(match_units(z, inferred, method="correlation"), np.argsort(perm))


def test_drops_for_shuffled_masks_and_random_latents(sim, masks):
    rng = np.random.default_rng(1)
    shuffled = rng.permuted(masks.ravel()).reshape(masks.shape)
    assert mask_scores(masks, shuffled)["f1"] < 0.7
    assert target_recovery(masks, shuffled)["exact"] < 0.5
    dense = np.ones_like(masks)
    s = mask_scores(masks, dense)
    assert s["recall"] == 1.0 and s["precision"] == pytest.approx(masks.mean()) and s["f1"] < 0.65
    z = sim.obsm["X_true_latent"]
    assert latent_mcc(z, rng.normal(size=z.shape))["mcc"] < 0.15
    # a smooth monotone distortion of each unit is still well identified
    assert latent_mcc(z, np.tanh(z / 4))["mcc"] > 0.9


def test_hand_computed_example():
    true = np.array([[1, 0], [0, 1], [1, 1]])
    inferred = np.array([[0.0, 0.9, 0.2], [0.8, 0.1, 0.7], [0.3, 0.6, 0.1]])  # unit 1 ↔ true 0, unit 0 ↔ true 1
    s = mask_scores(true, inferred)
    np.testing.assert_array_equal(s["matching"], [1, 0])
    # matched: true 0 ← [1,0,1] (tp 2), true 1 ← [0,1,0] (tp 1, fn 1); leftover unit 2 has 1 positive (fp)
    assert (s["tp"], s["fp"], s["fn"]) == (3, 1, 1)
    assert s["precision"] == pytest.approx(0.75) and s["recall"] == pytest.approx(0.75) and s["f1"] == pytest.approx(0.75)
    r = target_recovery(true, inferred)
    np.testing.assert_array_equal(r["exact_per_perturbation"], [True, False, False])
    assert r["exact"] == pytest.approx(1 / 3)
    assert mask_scores(true, inferred, threshold=0.95)["f1"] == 0.0


def test_more_or_fewer_inferred_units(sim, masks):
    T, K = masks.shape
    extra_empty = np.hstack([np.zeros((T, 3)), masks])
    s = mask_scores(masks, extra_empty)
    assert s["f1"] == 1.0 and (s["matching"] >= 3).all()
    extra_noisy = np.hstack([masks, np.ones((T, 1))])
    s = mask_scores(masks, extra_noisy)
    assert s["recall"] == 1.0 and s["fp"] == T and s["precision"] < 1.0
    assert target_recovery(masks, extra_noisy)["exact"] == 0.0
    fewer = masks[:, : K - 1]
    s = mask_scores(masks, fewer)
    assert s["matching"][-1] == -1 and s["precision"] == 1.0 and s["recall"] < 1.0
    z = sim.obsm["X_true_latent"]
    m = latent_mcc(z, z[:, : K - 2])
    assert m["per_unit"][-2:].tolist() == [0.0, 0.0] and m["mcc"] == pytest.approx((K - 2) / K)
    m = latent_mcc(z, np.hstack([np.random.default_rng(0).normal(size=(z.shape[0], 4)), z]))
    assert m["mcc"] == pytest.approx(1.0) and (m["matching"] >= 4).all()


def test_constant_columns_do_not_break_correlations(sim):
    z = sim.obsm["X_true_latent"]
    inferred = np.hstack([np.zeros((z.shape[0], 1)), z[:, 1:]])
    m = latent_mcc(z, inferred)
    assert np.isfinite(m["mcc"]) and m["per_unit"][0] < 0.2


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: mask_scores(m, m[:3]), "same perturbations"),
        (lambda m: mask_scores(m, m.ravel()), "2-D"),
        (lambda m: mask_scores(m * 2, m), "only 0 and 1"),
        (lambda m: mask_scores(m, m * 5 - 2), r"\[0, 1\]"),
        (lambda m: mask_scores(m, m, threshold=0), "threshold"),
        (lambda m: target_recovery(m, m[:, :0]), "empty"),
        (lambda m: latent_mcc(m, m[:-1]), "same cells"),
        (lambda m: latent_mcc(m[:1], m[:1]), "at least 2 cells"),
        (lambda m: latent_mcc(m, np.where(m > 0, np.nan, 0.0)), "NaN"),
        (lambda m: match_units(m, m, method="cosine"), "unknown method"),
    ],
)
def test_bad_input_raises_sams_error(masks, call, match):
    with pytest.raises(SamsError, match=match):
        call(masks)
