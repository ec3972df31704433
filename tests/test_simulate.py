"""Simulators: deterministic per seed, a consistent answer key, programs that match the decoder,
scRNA-like counts, the AnnData contract and its .h5ad round trip, and the command line."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from sams_core.data.screen import from_anndata
from sams_core.data.splits import make_split
from sams_core.errors import SamsError
from sams_core.simulate import (
    PERTURBATION_SYMBOLS,
    combination_shift,
    perturbation_names,
    sample_condition,
    sample_expression,
    simulate_main,
    simulate_reference_screen,
    simulate_sams_screen,
    simulate_svae_screen,
    true_mean,
    true_proportions,
    truth_from_adata,
    truth_masks_for,
)

SMALL = dict(n_perturbations=8, n_latent=4, n_genes=60, n_combinations=6, cells_per_perturbation=40)
SVAE_SMALL = dict(n_perturbations=6, n_latent=4, n_genes=40, cells_per_perturbation=30)
REF_SMALL = dict(n_perturbations=12, n_latent=6, n_genes=30, n_combinations=8, cells_per_perturbation=40)


@pytest.fixture(scope="module")
def sim():
    return simulate_sams_screen(**SMALL, seed=1)


@pytest.fixture(scope="module")
def default_sim():
    return simulate_sams_screen(seed=0)


def _same_screen(a, b) -> bool:
    ta, tb = truth_from_adata(a), truth_from_adata(b)
    return (
        (a.X != b.X).nnz == 0
        and np.array_equal(a.obsm["X_true_latent"], b.obsm["X_true_latent"])
        and list(a.obs["perturbation"]) == list(b.obs["perturbation"])
        and list(a.obs["batch"]) == list(b.obs["batch"])
        and np.array_equal(ta.masks, tb.masks)
        and np.array_equal(ta.embeddings, tb.embeddings)
        and np.array_equal(ta.combinations, tb.combinations)
        and np.array_equal(ta.heldout_combinations, tb.heldout_combinations)
    )


def test_deterministic_for_a_seed(sim):
    assert _same_screen(sim, simulate_sams_screen(**SMALL, seed=1))
    other = simulate_sams_screen(**SMALL, seed=2)
    assert (sim.X != other.X).nnz > 0
    assert not np.array_equal(truth_from_adata(sim).embeddings, truth_from_adata(other).embeddings)
    sv = simulate_svae_screen(**SVAE_SMALL, seed=3)
    assert _same_screen(sv, simulate_svae_screen(**SVAE_SMALL, seed=3))
    assert (sv.X != simulate_svae_screen(**SVAE_SMALL, seed=4).X).nnz > 0


def test_anndata_contract(sim):
    X = sim.X
    assert isinstance(X, sp.csr_matrix) and X.dtype == np.float32
    assert isinstance(sim.layers["counts"], sp.csr_matrix) and (sim.layers["counts"] != X).nnz == 0
    assert np.all(X.data == np.round(X.data)) and X.data.min() >= 0
    assert sim.obs_names.is_unique and re.fullmatch(r"cell\d{6}", sim.obs_names[0])
    assert sim.var_names.is_unique
    np.testing.assert_allclose(sim.obs["library_size"].to_numpy(), np.asarray(X.sum(1)).ravel())
    assert set(sim.obs["batch"].astype(str)) == {"batch1", "batch2"}
    for name, k in zip(sim.var_names, sim.var["program"]):
        assert re.fullmatch(rf"P{k:02d}_G\d{{3}}" if k >= 0 else r"BG_G\d{3}", name), (name, k)
    for key in ("X_true_basal", "X_true_latent"):
        assert sim.obsm[key].shape == (sim.n_obs, SMALL["n_latent"]) and sim.obsm[key].dtype == np.float32
    tr = truth_from_adata(sim)
    T, K = SMALL["n_perturbations"], SMALL["n_latent"]
    assert tr.kind == "sams" and tr.masks.shape == (T, K) and tr.masks.dtype == np.int8
    assert tr.embeddings.shape == (T, K) and tr.embeddings.dtype == np.float32
    # real gene symbols, the singles list sorted (= the data loader's perturbation order)
    assert set(tr.perturbations) == set(PERTURBATION_SYMBOLS[:T]) and list(tr.perturbations) == sorted(tr.perturbations)
    labels = set(sim.obs["perturbation"].astype(str))
    assert labels == {"control", *tr.perturbations, *tr.combinations}
    order = {p: i for i, p in enumerate(tr.perturbations)}
    for c in tr.combinations:
        a, b = c.split("+")
        assert order[a] < order[b], "members in the order of the singles list"
    assert len(set(tr.combinations)) == SMALL["n_combinations"]
    assert set(tr.heldout_combinations) <= set(tr.combinations)
    assert len(tr.heldout_combinations) == round(0.25 * SMALL["n_combinations"])
    assert tr.seed == 1 and tr.params["n_latent"] == K
    assert perturbation_names(152)[-2:] == ["PERT150", "PERT151"]


def test_truth_is_consistent(sim):
    tr = truth_from_adata(sim)
    shift = sim.obsm["X_true_latent"] - sim.obsm["X_true_basal"]
    labels = sim.obs["perturbation"].astype(str).to_numpy()
    for label in [*tr.combinations, *tr.perturbations, "control"]:
        rows = shift[labels == label]
        assert rows.shape[0] > 0
        np.testing.assert_allclose(rows, np.broadcast_to(combination_shift(tr, label), rows.shape), atol=1e-5)
    for c in tr.combinations:
        a, b = c.split("+")
        np.testing.assert_allclose(combination_shift(tr, c), combination_shift(tr, a) + combination_shift(tr, b))
        np.testing.assert_allclose(combination_shift(tr, f"{b}+{a}"), combination_shift(tr, c))
    a = tr.perturbations[0]
    np.testing.assert_allclose(combination_shift(tr, f"{a}:0.5"), 0.5 * combination_shift(tr, a))
    with pytest.raises(SamsError, match="not a simulated perturbation"):
        combination_shift(tr, "NOTAGENE")
    # basal states look standard normal
    zb = sim.obsm["X_true_basal"]
    assert abs(zb.mean()) < 0.1 and abs(zb.std() - 1) < 0.1


def test_masks_and_effects():
    tr = truth_from_adata(simulate_sams_screen(n_perturbations=40, n_latent=12, n_genes=60, n_combinations=0,
                                               cells_per_perturbation=2, seed=5))
    n_targets = tr.masks.sum(1)
    assert n_targets.min() >= 1 and n_targets.max() <= 3 and 1.5 < n_targets.mean() < 2.5
    assert (tr.masks.sum(0) >= 1).all(), "every unit is targeted"
    on = tr.embeddings[tr.masks == 1]
    assert np.all(np.abs(np.abs(on) - 5) < 2.0) and abs(np.abs(on).mean() - 5) < 0.3
    assert (on > 0).any() and (on < 0).any()
    assert np.all(tr.embeddings[tr.masks == 0] == 0)
    # few perturbations: still each unit targeted when the targets suffice
    few = truth_from_adata(simulate_sams_screen(n_perturbations=4, n_latent=6, n_genes=30, n_combinations=2,
                                                cells_per_perturbation=2, targets_per_perturbation=(2, 3), seed=0))
    assert (few.masks.sum(0) >= 1).all()


def test_programs_follow_their_units():
    a = simulate_sams_screen(**SMALL, n_control=1500, seed=1)
    tr = truth_from_adata(a)
    ctrl = (a.obs["perturbation"] == "control").to_numpy()  # units independent in controls
    x = np.log1p(a.X[ctrl].toarray() / a.obs["library_size"].to_numpy()[ctrl, None] * 1e4)
    z = a.obsm["X_true_latent"][ctrl]
    K = tr.n_latent
    assert sorted(tr.unit_of_program.values()) == list(range(K))
    for name, genes in tr.program_sets.items():
        k = tr.unit_of_program[name]
        cols = [a.var_names.get_loc(g) for g in genes]
        assert (a.var["program"].to_numpy()[cols] == k).all()
        r = np.abs(np.corrcoef(np.hstack([x[:, cols], z]).T)[: len(cols), len(cols):])  # genes × units
        assert np.median(r[:, k]) > 2.5 * np.median(np.delete(r, k, axis=1)), (name, r)
        # program score: genes of the program, signed by the direction of their response
        score = (x[:, cols] * np.sign(tr.decoder["slope"][cols])).mean(1)
        rs = np.abs([np.corrcoef(score, z[:, j])[0, 1] for j in range(K)])
        assert rs[k] > 0.5 and rs[k] > 2.5 * np.delete(rs, k).max(), (name, rs)
    # background genes respond to no unit
    bg = np.flatnonzero(a.var["program"].to_numpy() == -1)
    r_bg = np.abs(np.corrcoef(np.hstack([x[:, bg], z]).T)[: len(bg), len(bg):])
    assert np.median(r_bg) < 0.1


def test_counts_follow_the_decoder(default_sim):
    tr = truth_from_adata(default_sim)
    p = true_proportions(tr, default_sim.obsm["X_true_latent"])
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    expected = (p * default_sim.obs["library_size"].to_numpy()[:, None]).sum(0)
    observed = np.asarray(default_sim.X.sum(0)).ravel()
    assert np.corrcoef(np.log1p(expected), np.log1p(observed))[0, 1] > 0.99
    with pytest.raises(SamsError):
        true_proportions(tr, np.zeros((3, tr.n_latent + 1)))


def test_counts_look_like_scrna(default_sim):
    a = default_sim  # default size: 30 perturbations, 40 combinations, K = 10, 200 genes
    assert a.n_obs == 200 + 30 * 100 + 40 * 100 and a.n_vars == 200
    zeros = 1 - a.X.nnz / (a.n_obs * a.n_vars)
    assert 0.2 < zeros < 0.8
    lib = a.obs["library_size"].to_numpy()
    assert 1500 < np.median(lib) < 5000 and lib.std() / lib.mean() > 0.2
    gene_means = np.asarray(a.X.mean(0)).ravel()
    assert gene_means.max() / np.median(gene_means) > 10, "some genes high, many low"
    # overdispersed: variance above the mean (Poisson) for most genes, among control cells
    c = a.X[(a.obs["perturbation"] == "control").to_numpy()].toarray()
    assert np.mean(c.var(0) > 1.5 * c.mean(0)) > 0.5


def test_round_trip_preserves_truth(sim, tmp_path):
    for a in (sim, simulate_svae_screen(**SVAE_SMALL, seed=0), simulate_reference_screen(**REF_SMALL, seed=0)):
        p = tmp_path / "sim.h5ad"
        a.write_h5ad(p)
        back = ad.read_h5ad(p)
        t1, t2 = truth_from_adata(a), truth_from_adata(back)
        for f in ("perturbations", "masks", "embeddings", "combinations", "heldout_combinations", "inverse_dispersion", "noise_sd"):
            np.testing.assert_array_equal(getattr(t1, f), getattr(t2, f), err_msg=f)
        assert (t1.kind, t1.seed, t1.params, t1.program_sets, t1.unit_of_program) == (
            t2.kind, t2.seed, t2.params, t2.program_sets, t2.unit_of_program)
        np.testing.assert_allclose(true_mean(t1, a.obsm["X_true_latent"][:50]),
                                   true_mean(t2, back.obsm["X_true_latent"][:50]))
        assert (sp.csr_matrix(back.X) != sp.csr_matrix(a.X)).nnz == 0 and list(back.obs["perturbation"]) == list(a.obs["perturbation"])
        np.testing.assert_array_equal(back.var["program"].to_numpy(), a.var["program"].to_numpy())


def test_loads_through_the_data_contract(sim, tmp_path):
    p = tmp_path / "sim.h5ad"
    sim.write_h5ad(p)
    data = from_anndata(ad.read_h5ad(p))
    tr = truth_from_adata(sim)
    assert data.is_counts and list(data.perturbations) == list(tr.perturbations)
    assert sorted(data.combinations()) == sorted(tr.combinations)
    split = make_split(data, "heldout-combos", heldout=list(tr.heldout_combinations))
    assert set(data.labels[split == "test"]) == set(tr.heldout_combinations)
    np.testing.assert_array_equal(truth_masks_for(tr, data.perturbations), tr.masks)


def test_svae_screen():
    a = simulate_svae_screen(**SVAE_SMALL, seed=0)
    tr = truth_from_adata(a)
    assert tr.kind == "svae" and tr.combinations.size == 0 and tr.program_sets == {}
    assert a.n_obs == 30 * 7 and set(a.obs["perturbation"].astype(str)) == {*tr.perturbations, "control"}
    assert tr.masks.sum(1).min() >= 1 and tr.masks.sum(1).max() <= 3
    assert (a.var["program"] == -1).all() and a.var_names[0] == "SV_G0000"
    shift = a.obsm["X_true_latent"] - a.obsm["X_true_basal"]
    labels = a.obs["perturbation"].astype(str).to_numpy()
    for lab in tr.perturbations:
        np.testing.assert_allclose(shift[labels == lab][0], combination_shift(tr, lab), atol=1e-6)
    K, H = tr.n_latent, 2 * tr.n_latent
    W1, W2 = tr.decoder["W1"], tr.decoder["W2"]
    assert W1.shape == (H, K) and np.linalg.matrix_rank(W1) == K
    assert W2.shape == (40, H) and np.linalg.matrix_rank(W2) == H
    np.testing.assert_allclose(W2.sum(0), 0, atol=1e-4)
    assert np.all(a.X.data == np.round(a.X.data)) and isinstance(a.X, sp.csr_matrix)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_perturbations=4, n_combinations=7), "only 6 distinct pairs"),
        (dict(n_latent=2, targets_per_perturbation=(1, 3)), "targets_per_perturbation"),
        (dict(cells_per_perturbation=0), "cells_per_perturbation"),
        (dict(n_genes=5, n_latent=10, n_combinations=2), "gene programs"),
        (dict(dispersion=0.0), "dispersion"),
        (dict(heldout_fraction=1.5), "heldout_fraction"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    base = dict(n_perturbations=6, n_latent=4, n_genes=30, n_combinations=3, cells_per_perturbation=5)
    with pytest.raises(SamsError, match=match):
        simulate_sams_screen(**{**base, **kwargs})


def test_svae_needs_enough_genes():
    with pytest.raises(SamsError, match="injective"):
        simulate_svae_screen(n_latent=10, n_genes=20)


def test_simulate_cli(tmp_path, capsys):
    out = tmp_path / "s.h5ad"
    argv = ["--perturbations", "5", "--latent", "3", "--genes", "30", "--combinations", "3", "--cells", "20", "--seed", "4", "--out", str(out)]
    assert simulate_main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "20" in line and str(out) in line
    back = ad.read_h5ad(out)
    assert back.n_obs == 20 * (5 + 3) + 40 and truth_from_adata(back).seed == 4
    out2 = tmp_path / "v.h5ad"
    assert simulate_main(["--kind", "svae", "--perturbations", "4", "--latent", "3", "--genes", "20", "--cells", "10", "--out", str(out2)]) == 0
    assert truth_from_adata(ad.read_h5ad(out2)).kind == "svae"
    assert simulate_main(["--perturbations", "3", "--combinations", "9", "--out", str(out)]) == 2
    assert "distinct pairs" in capsys.readouterr().err
    out3 = tmp_path / "r.h5ad"
    assert simulate_main(["--kind", "reference", "--perturbations", "6", "--latent", "4", "--genes", "12", "--combinations", "2",
                          "--cells", "10", "--mask-probability", "0.5", "--seed", "2", "--out", str(out3)]) == 0
    assert "Gaussian values" in capsys.readouterr().out
    back = ad.read_h5ad(out3)
    tr = truth_from_adata(back)
    assert tr.kind == "reference" and back.n_obs == 10 * (6 + 2 + 1) and tr.params["mask_probability"] == 0.5
    assert simulate_main(["--kind", "reference", "--dispersion", "3", "--out", str(out3)]) == 2
    assert "--dispersion do not apply to --kind reference" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        simulate_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--kind", "--perturbations", "--latent", "--genes", "--combinations", "--cells", "--controls",
                "--min-targets", "--max-targets", "--effect-mean", "--effect-sd", "--library", "--dispersion",
                "--heldout-fraction", "--seed", "--out", "--mask-probability", "--noise-fraction", "reference"):
        assert opt in text


# --------------------------------------------------------------------------- the reference kind


@pytest.fixture(scope="module")
def ref_sim():
    return simulate_reference_screen(**REF_SMALL, seed=1)


def test_reference_layout_and_data_contract(ref_sim):
    a = ref_sim
    T, K, G, C, n = (REF_SMALL[k] for k in ("n_perturbations", "n_latent", "n_genes", "n_combinations", "cells_per_perturbation"))
    assert a.shape == (n * (1 + T + C), G)
    assert isinstance(a.X, np.ndarray) and a.X.dtype == np.float32 and not np.all(a.X == np.round(a.X))
    assert "counts" not in a.layers and "library_size" not in a.obs
    assert (a.var["program"] == -1).all() and a.var_names[0] == "RF_G000"
    for key in ("X_true_basal", "X_true_latent"):
        assert a.obsm[key].shape == (a.n_obs, K) and a.obsm[key].dtype == np.float32
    tr = truth_from_adata(a)
    assert tr.kind == "reference" and not tr.is_counts and tr.inverse_dispersion is None
    assert tr.masks.shape == (T, K) and tr.masks.dtype == np.int8 and tr.noise_sd.shape == (G,)
    assert list(tr.perturbations) == sorted(tr.perturbations) and len(tr.combinations) == C
    assert set(a.obs["perturbation"].astype(str)) == {"control", *tr.perturbations, *tr.combinations}
    assert len(tr.heldout_combinations) == 2 and set(tr.heldout_combinations) <= set(tr.combinations)
    data = from_anndata(a)  # real values: the data contract picks the Gaussian likelihood
    assert not data.is_counts and data.likelihood == "gaussian"
    assert list(data.perturbations) == list(tr.perturbations) and sorted(data.combinations()) == sorted(tr.combinations)
    split = make_split(data, "heldout-combos", heldout=list(tr.heldout_combinations))
    assert set(data.labels[split == "test"]) == set(tr.heldout_combinations)


def test_reference_is_reproducible_per_seed(ref_sim):
    again = simulate_reference_screen(**REF_SMALL, seed=1)
    np.testing.assert_array_equal(again.X, ref_sim.X)
    np.testing.assert_array_equal(again.obsm["X_true_latent"], ref_sim.obsm["X_true_latent"])
    assert list(again.obs["batch"]) == list(ref_sim.obs["batch"])
    t1, t2 = truth_from_adata(again), truth_from_adata(ref_sim)
    for f in ("masks", "embeddings", "combinations", "heldout_combinations", "noise_sd"):
        np.testing.assert_array_equal(getattr(t1, f), getattr(t2, f))
    other = simulate_reference_screen(**REF_SMALL, seed=2)
    assert not np.array_equal(other.X, ref_sim.X)
    assert not np.array_equal(truth_from_adata(other).embeddings, t1.embeddings)


def test_reference_masks_and_effects_as_published():
    tr = truth_from_adata(simulate_reference_screen(n_combinations=0, cells_per_perturbation=2, seed=5))
    assert tr.masks.shape == (100, 15) and tr.params["mask_probability"] == pytest.approx(2 / 15)
    # Bernoulli(2/15) over 1,500 entries: mean within 4 sd (0.0088) of 2/15, two targets per perturbation on average
    assert abs(tr.masks.mean() - 2 / 15) < 0.035
    assert 1.5 < tr.masks.sum(1).mean() < 2.5 and (tr.masks.sum(1) == 0).any(), "a perturbation may have no target"
    on = tr.embeddings[tr.masks == 1]
    assert abs(np.abs(on).mean() - 5) < 0.15 and abs(np.abs(on).std() - 0.5) < 0.15
    assert (on > 0).any() and (on < 0).any() and np.all(tr.embeddings[tr.masks == 0] == 0)
    # a sparser or denser prior is an argument
    dense = truth_from_adata(simulate_reference_screen(n_combinations=0, cells_per_perturbation=2, mask_probability=0.5, seed=5))
    assert abs(dense.masks.mean() - 0.5) < 0.06


def test_reference_pairs_shift_is_the_sum_of_members(ref_sim):
    tr = truth_from_adata(ref_sim)
    shift = ref_sim.obsm["X_true_latent"] - ref_sim.obsm["X_true_basal"]
    labels = ref_sim.obs["perturbation"].astype(str).to_numpy()
    for c in tr.combinations:
        a, b = c.split("+")
        want = tr.embeddings[list(tr.perturbations).index(a)] + tr.embeddings[list(tr.perturbations).index(b)]
        np.testing.assert_allclose(combination_shift(tr, c), want)
        np.testing.assert_allclose(shift[labels == c], np.broadcast_to(want, shift[labels == c].shape), atol=1e-5)
    np.testing.assert_allclose(shift[labels == "control"], 0.0, atol=1e-6)


def test_reference_decoder_and_noise():
    a = simulate_reference_screen(n_perturbations=20, n_latent=6, n_genes=30, n_combinations=5, cells_per_perturbation=150, seed=3)
    tr = truth_from_adata(a)
    dec = tr.decoder
    assert dec["kind"] == "dense" and dec["n_layers"] == 5 and dec["leak"] == pytest.approx(0.2)
    assert not any(k.startswith("b") for k in dec), "bias-free"
    shapes = [dec[f"W{i}"].shape for i in range(1, 6)]
    assert shapes == [(50, 6), (50, 50), (50, 50), (50, 50), (30, 50)]
    for W in (dec[f"W{i}"].astype(np.float64) for i in range(1, 6)):
        small = min(W.shape)
        gram = W.T @ W if W.shape[0] >= W.shape[1] else W @ W.T
        np.testing.assert_allclose(gram, np.eye(small), atol=1e-5)  # orthogonal rows or columns
    mean = true_mean(tr, a.obsm["X_true_latent"])
    np.testing.assert_allclose(mean.std(0), 1.0, rtol=1e-4)  # each gene's mean scaled to unit sd
    resid = a.X - mean
    np.testing.assert_allclose(resid.std(0), tr.noise_sd, rtol=0.1)
    share = resid.var(0) / a.X.var(0)
    assert abs(np.median(share) - 0.2) < 0.03, "noise is 20 % of each gene's variance"
    with pytest.raises(SamsError, match="true_mean"):
        true_proportions(tr, a.obsm["X_true_latent"][:3])
    x, z = sample_condition(tr, tr.combinations[0], 500, seed=0)
    assert x.shape == (500, 30) and z.shape == (500, 6)
    np.testing.assert_allclose(z.mean(0), combination_shift(tr, tr.combinations[0]), atol=0.2)


def test_oracle_sampler_follows_the_count_model(default_sim):
    tr = truth_from_adata(default_sim)
    z = default_sim.obsm["X_true_latent"][:2000]
    lib = default_sim.obs["library_size"].to_numpy()[:2000]
    x = sample_expression(tr, z, lib, seed=0)
    assert np.all(x == np.round(x)) and x.shape == (2000, 200)
    np.testing.assert_allclose(np.log1p(x.sum(0)), np.log1p(np.asarray(default_sim.X[:2000].sum(0)).ravel()), atol=0.35)
    with pytest.raises(SamsError, match="library"):
        sample_expression(tr, z[:3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_perturbations=4, n_combinations=7), "only 6 distinct pairs"),
        (dict(mask_probability=1.5), "mask_probability"),
        (dict(noise_fraction=1.0), "noise_fraction"),
        (dict(hidden_width=0), "hidden_width"),
    ],
)
def test_reference_bad_parameters_raise(kwargs, match):
    base = dict(n_perturbations=6, n_latent=4, n_genes=10, n_combinations=3, cells_per_perturbation=5)
    with pytest.raises(SamsError, match=match):
        simulate_reference_screen(**{**base, **kwargs})
