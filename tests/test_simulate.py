"""Simulators: deterministic, consistent truth, programs that match the decoder; truth metrics."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from sams_core.data import from_anndata, make_split
from sams_core.errors import SamsError
from sams_core.simulate import (
    combination_shift,
    simulate_main,
    simulate_sams_screen,
    simulate_svae_screen,
    truth_from_adata,
    truth_masks_for,
)
from sams_core.truth import latent_mcc, mask_scores, match_units, target_recovery

SMALL = dict(n_perturbations=8, n_latent=4, n_genes=60, n_combinations=6, cells_per_perturbation=40)


@pytest.fixture(scope="module")
def sim():
    return simulate_sams_screen(**SMALL, seed=1)


def test_deterministic_for_a_seed(sim):
    again = simulate_sams_screen(**SMALL, seed=1)
    other = simulate_sams_screen(**SMALL, seed=2)
    assert (sim.X != again.X).nnz == 0
    np.testing.assert_array_equal(sim.uns["sams_truth"]["masks"], again.uns["sams_truth"]["masks"])
    assert (sim.X != other.X).nnz > 0


def test_truth_is_consistent(sim):
    tr = truth_from_adata(sim)
    shift = sim.obsm["X_true_latent"] - sim.obsm["X_true_basal"]
    labels = sim.obs["perturbation"].astype(str).to_numpy()
    for label in tr.combinations + tr.perturbations[:3] + ["control"]:
        rows = shift[labels == label]
        assert rows.shape[0] > 0
        np.testing.assert_allclose(rows, np.tile(combination_shift(tr, label), (rows.shape[0], 1)), atol=1e-5)
    a, b = tr.combinations[0].split("+")
    np.testing.assert_allclose(combination_shift(tr, tr.combinations[0]), combination_shift(tr, a) + combination_shift(tr, b))
    n_targets = tr.masks.sum(1)
    assert n_targets.min() >= 1 and n_targets.max() <= 3
    on = np.abs(tr.embeddings[tr.masks == 1])
    assert np.all(np.abs(on - 5) < 2.5) and np.all(tr.embeddings[tr.masks == 0] == 0)
    assert set(tr.heldout_combinations) <= set(tr.combinations)


def test_programs_follow_their_units():
    sim = simulate_sams_screen(**SMALL, n_control=1500, seed=1)
    tr = truth_from_adata(sim)
    ctrl = (sim.obs["perturbation"] == "control").to_numpy()  # units independent in controls
    x = np.log1p(sim.X.toarray()[ctrl] / sim.obs["library_size"].to_numpy()[ctrl, None] * 1e4)
    z = sim.obsm["X_true_latent"][ctrl]
    for name, genes in tr.program_sets.items():
        k = tr.unit_of_program[name]
        cols = [sim.var_names.get_loc(g) for g in genes]
        score = x[:, cols] * np.sign(np.corrcoef(x[:, cols].T, z[:, k])[-1, :-1])
        r = [abs(np.corrcoef(score.mean(1), z[:, j])[0, 1]) for j in range(tr.n_latent)]
        assert int(np.argmax(r)) == k, (name, r)
        assert (sim.var["program"].to_numpy()[cols] == k).all()


def test_counts_look_like_scrna():
    X = simulate_sams_screen(seed=0).X.toarray()  # default size
    assert np.all(X == np.round(X)) and X.min() >= 0
    assert (X == 0).mean() > 0.2


def test_round_trip_and_data_contract(sim, tmp_path):
    p = tmp_path / "sim.h5ad"
    sim.write_h5ad(p)
    back = ad.read_h5ad(p)
    t1, t2 = truth_from_adata(sim), truth_from_adata(back)
    np.testing.assert_array_equal(t1.masks, t2.masks)
    assert t1.program_sets == t2.program_sets and t1.heldout_combinations == t2.heldout_combinations
    data = from_anndata(back)
    assert data.is_counts and len(data.combinations()) == SMALL["n_combinations"]
    split = make_split(data, "heldout-combos", heldout=t2.heldout_combinations)
    assert set(data.labels[split == "test"]) == set(t2.heldout_combinations)


def test_svae_screen():
    a = simulate_svae_screen(n_perturbations=6, n_latent=4, n_genes=40, cells_per_perturbation=30, seed=0)
    tr = truth_from_adata(a)
    assert tr.kind == "svae" and tr.combinations == []
    assert set(a.obs["perturbation"].astype(str)) == set(tr.perturbations) | {"control"}
    assert 1 <= tr.masks.sum(1).min() and tr.masks.sum(1).max() <= 3
    with pytest.raises(SamsError, match="injective"):
        simulate_svae_screen(n_latent=10, n_genes=15)


def test_simulate_cli(tmp_path):
    out = tmp_path / "s.h5ad"
    assert simulate_main(["--perturbations", "5", "--latent", "3", "--genes", "30", "--combinations", "3", "--cells", "20", "--out", str(out)]) == 0
    assert ad.read_h5ad(out).n_obs == 20 * (5 + 3) + 40


def test_metrics_on_truth_and_shuffles(sim):
    tr = truth_from_adata(sim)
    m = tr.masks.astype(float)
    assert mask_scores(m, m)["f1"] == 1.0
    perm = np.random.default_rng(0).permutation(m.shape[1])
    assert mask_scores(m, m[:, perm])["f1"] == 1.0, "invariant to permuting inferred units"
    np.testing.assert_array_equal(match_units(m, m[:, perm]), np.argsort(perm))
    shuffled = np.random.default_rng(1).permuted(m.ravel()).reshape(m.shape)
    assert mask_scores(m, shuffled)["f1"] < 0.8
    assert target_recovery(m, m)["exact"] == 1.0 and target_recovery(m, shuffled)["exact"] < 0.5
    z = sim.obsm["X_true_latent"]
    assert latent_mcc(z, z[:, perm] * -2.0)["mcc"] == pytest.approx(1.0)
    assert latent_mcc(z, np.random.default_rng(0).normal(size=z.shape))["mcc"] < 0.2
    assert truth_masks_for(tr, list(reversed(tr.perturbations)))[0].tolist() == tr.masks[-1].tolist()
    with pytest.raises(SamsError):
        mask_scores(m, m[:3])
