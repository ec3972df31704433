"""Covariates (cell type, batch ...): read, coded with a bundle's levels, modelled, and used for
per-level effects, metrics and the heldout-covariate split."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sams_core.data.backed import read_h5ad_backed
from sams_core.data.batches import ChunkedSource, DeviceData, covariate_matrix
from sams_core.data.screen import from_anndata
from sams_core.data.splits import TEST, TRAIN, VAL, heldout_pairs, make_split
from sams_core.errors import SamsError
from sams_core.evaluation.baselines import additive_baseline, observed_effects_by_level
from sams_core.evaluation.metrics import data_ate, data_ate_by_level, evaluate_model, model_ate
from sams_core.interpret.effects import predict_effect
from sams_core.io.bundle import load_bundle
from sams_core.pipeline import SplitSpec, data_for_bundle, split_for_bundle, train_bundle
from sams_core.training.build import build_for_data
from sams_core.training.trainer import TrainConfig, train

SMALL = dict(n_latent=3, n_hidden=32)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread each is faster than two that wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def confounded_screen(
    seed: int = 0, n_ctrl: int = 300, n_pert: int = 240, n_genes: int = 30, counts: bool = True,
) -> ad.AnnData:
    """Two cell types whose controls differ (type B expresses genes 10-19 4× higher).

    P raises genes 0-4 four-fold and Q lowers genes 5-9 four-fold in both types; 90 % of P's
    cells are of type B and 90 % of Q's of type A, so comparing them with all controls mixes the
    cell-type difference into their effects. ``counts``: Poisson counts; else log2 expression
    with a little Gaussian noise (log-normalised data, on which P's planted effect is exactly
    +2 on genes 0-4 and Q's exactly -2 on genes 5-9).
    """
    rng = np.random.default_rng(seed)
    base = rng.uniform(1.0, 3.0, n_genes)
    rows, labels, types = [], [], []

    def cells(label: str, n_a: int, n_b: int) -> None:
        for ct, n in (("A", n_a), ("B", n_b)):
            rate = base.copy()
            if ct == "B":
                rate[10:20] *= 4.0
            if "P" in label.split("+"):
                rate[0:5] *= 4.0
            if "Q" in label.split("+"):
                rate[5:10] /= 4.0
            if counts:
                lib = rng.lognormal(np.log(2000), 0.1, n)
                rows.append(rng.poisson(rate / rate.sum() * lib[:, None]))
            else:
                rows.append(np.log2(rate)[None, :] + rng.normal(0.0, 0.1, (n, n_genes)))
            labels.extend([label] * n)
            types.extend([ct] * n)

    cells("control", n_ctrl, n_ctrl)
    cells("P", n_pert // 10, n_pert - n_pert // 10)
    cells("Q", n_pert - n_pert // 10, n_pert // 10)
    cells("P+Q", n_pert // 2, n_pert // 2)
    a = ad.AnnData(sp.csr_matrix(np.vstack(rows).astype(np.float32)))
    a.obs["perturbation"] = labels
    a.obs["cell_type"] = pd.Categorical(types)
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.var_names = [f"G{i}" for i in range(n_genes)]
    return a


def planted(data, level: str) -> pd.DataFrame:
    """The effect at ``level``: cells against the controls of that level (the per-level data ATE,
    which recovers planted effects: see the test on log-normalised data)."""
    return data_ate(data, level=level)


@pytest.fixture(scope="module")
def adata():
    return confounded_screen()


@pytest.fixture(scope="module")
def data(adata):
    return from_anndata(adata)


# ---- the data contract --------------------------------------------------------------------
def test_covariates_detected_named_or_none(adata, data):
    assert data.covariates == {"cell_type": ["A", "B"]}
    assert data.settings["covariate_levels"] == {"cell_type": ["A", "B"]}
    assert set(data.level_of_cells()) == {"A", "B"}
    assert data.covariate_onehot().shape == (data.n_cells, 2)
    assert (data.covariate_onehot().sum(1) == 1).all()
    assert from_anndata(adata, covariate_keys=[]).covariates == {}
    b = adata.copy()
    b.obs["donor"] = np.where(np.arange(b.n_obs) % 2, "d1", "d2")
    both = from_anndata(b, covariate_keys=["cell_type", "donor"])
    assert both.covariates == {"cell_type": ["A", "B"], "donor": ["d1", "d2"]}
    assert both.covariate_onehot().shape == (b.n_obs, 4)
    with pytest.raises(SamsError, match="not in obs"):
        from_anndata(adata, covariate_keys=["tissue"])
    # subsets keep each cell's level
    sub = data.subset(cells=np.arange(data.n_cells)[::-7])
    assert list(sub.level_of_cells()) == list(data.level_of_cells()[::-7])
    assert data.without_covariates().covariates == {}


def test_covariate_with_missing_values_is_refused(adata):
    b = adata.copy()
    b.obs["cell_type"] = b.obs["cell_type"].astype(object)
    b.obs.iloc[3, b.obs.columns.get_loc("cell_type")] = None
    with pytest.raises(SamsError, match="no value in covariate obs\\['cell_type'\\]"):
        from_anndata(b)


def test_backed_reader_reads_the_same_covariates(adata, data, tmp_path):
    p = tmp_path / "s.h5ad"
    adata.write_h5ad(p)
    backed = read_h5ad_backed(p, chunk_size=200)
    assert backed.covariates == data.covariates
    assert np.array_equal(backed.covariate_codes, data.covariate_codes)
    with pytest.raises(SamsError, match="never saw"):
        read_h5ad_backed(p, covariate_levels={"cell_type": ["A"]})


def test_batches_carry_the_onehot_covariates(data):
    idx = np.arange(0, data.n_cells, 3)
    dd = DeviceData(data, idx, torch.device("cpu"), np.full(data.n_cells, -1))
    b = dd.batch(torch.arange(5))
    assert torch.equal(b.c, torch.as_tensor(data.covariate_onehot(idx[:5])))
    src = ChunkedSource(data.X, idx, data.dosages, data.library, np.full(data.n_cells, -1), torch.device("cpu"),
                        chunk_size=50, covariates=covariate_matrix(data))
    assert torch.equal(src.batch(torch.arange(5)).c, b.c)


# ---- data ATE per level --------------------------------------------------------------------
def test_per_level_data_ate_recovers_the_planted_effect_and_pooled_controls_do_not():
    data = from_anndata(confounded_screen(counts=False))
    assert not data.is_counts
    truth = np.zeros(data.n_genes)
    truth[0:5] = 2.0  # P: four-fold up, exactly +2 in log2 expression, in both cell types
    for level in ("A", "B"):
        eff = data_ate(data, level=level).loc["P"].to_numpy()
        assert np.abs(eff - truth).max() < 0.1, eff
    pooled_controls = data_ate(data, match_covariates=False).loc["P"].to_numpy()
    assert np.abs(pooled_controls[10:20] - 0.8).max() < 0.1  # 2 × (90 % − 50 % of type B): the cell-type gap
    matched = data_ate(data).loc["P"].to_numpy()
    assert np.abs(matched - truth).max() < 0.1
    # on counts too: within a cell type the cell-type genes move like the untouched genes 20-29
    # (both only by the renormalisation of P's four-fold genes), against all controls they do not
    counts = from_anndata(confounded_screen())
    m = data_ate(counts).loc["P"].to_numpy()
    p = data_ate(counts, match_covariates=False).loc["P"].to_numpy()
    assert abs(m[10:20].mean() - m[20:].mean()) < 0.1
    assert p[10:20].mean() - p[20:].mean() > 0.6


def test_level_without_controls_falls_back_to_all_controls_with_a_note(data):
    only_b_controls = np.flatnonzero(data.control_mask & (data.level_of_cells() == "B"))
    per = data_ate_by_level(data, control_cells=only_b_controls)
    assert per["B"].attrs["notes"] == []
    assert "A has no control cells" in per["A"].attrs["notes"][0]
    assert data_ate(data, control_cells=only_b_controls).attrs["notes"]
    baseline = additive_baseline(observed_effects_by_level(data)["A"], ["P+Q"])
    assert np.isfinite(baseline.to_numpy()).all()


# ---- models --------------------------------------------------------------------------------
def test_model_without_covariates_has_no_covariate_parameter(data):
    split = make_split(data, "random", seed=0)
    plain = build_for_data("sams_vae", data.without_covariates(), split, **SMALL)
    assert "covariate_sizes" not in plain.hparams
    assert not any("cov" in k for k in plain.state_dict())
    with_cov = build_for_data("sams_vae", data, split, **SMALL)
    assert with_cov.hparams["covariate_sizes"] == [2]
    assert {"encoder_cov.weight", "decoder_cov.weight", "covariate_freq"} <= set(with_cov.state_dict())


@pytest.mark.parametrize("family", ["sams_vae", "cpa_vae", "conditional_vae", "vae", "svae_plus"])
def test_every_family_trains_and_predicts_per_level(data, family):
    split = make_split(data, "random", seed=0)
    model, res = train(data, family, split, TrainConfig(epochs=1, batch_size=256, device="cpu"), **SMALL)
    assert np.isfinite(res.history[-1].train_loss)
    a = model_ate(model, ["P"], data.perturbations, True, n_samples=200, covariate_level=0)
    b = model_ate(model, ["P"], data.perturbations, True, n_samples=200, covariate_level=1)
    assert np.isfinite(a.to_numpy()).all() and not np.allclose(a.to_numpy(), b.to_numpy())


def test_covariate_model_predicts_the_planted_per_level_effect_better(data):
    split = make_split(data, "random", test_fraction=0.0, val_fraction=0.0, seed=0)
    cfg = TrainConfig(epochs=15, batch_size=256, lr=1e-2, device="cpu", seed=0)
    with_cov, _ = train(data, "cpa_vae", split, cfg, **SMALL)
    plain, _ = train(data.without_covariates(), "cpa_vae", split, cfg, **SMALL)
    errors = {"covariates": [], "plain": []}
    for k, level in enumerate(data.levels):
        truth = planted(data, level).loc[["P", "Q"]].to_numpy()
        pc = model_ate(with_cov, ["P", "Q"], data.perturbations, True, n_samples=300, covariate_level=k).to_numpy()
        pp = model_ate(plain, ["P", "Q"], data.perturbations, True, n_samples=300).to_numpy()
        errors["covariates"].append(np.abs(pc - truth).mean())
        errors["plain"].append(np.abs(pp - truth).mean())
    # measured: 0.09 against 0.42 (mean absolute error over genes of P and Q, per level)
    assert np.mean(errors["covariates"]) < 0.5 * np.mean(errors["plain"]), errors


def test_covariate_shift_option_is_named_and_needs_covariates(data):
    split = make_split(data, "random", seed=0)
    model = build_for_data("sams_vae", data, split, covariate_shift=True, **SMALL)
    assert model.shift_offset.shape == (data.n_perturbations, 2, 3)
    from sams_core.models.registry import label

    assert "covariate-specific shifts" in label("sams_vae", model.hparams)
    with pytest.raises(SamsError, match="no covariates"):
        build_for_data("sams_vae", data.without_covariates(), split, covariate_shift=True, **SMALL)


# ---- splits, bundles, evaluation ----------------------------------------------------------
def test_heldout_covariate_never_trains_on_the_heldout_pairs(data):
    split = make_split(data, "heldout-covariate", fraction=0.5, seed=1)
    pairs = heldout_pairs(data, split)
    assert pairs
    lv = data.level_of_cells()
    tagged = list(zip(data.labels.astype(str), lv))
    for lab, level in pairs:
        cells = np.array([t == (lab, level) for t in tagged])
        assert (split[cells] == TEST).all()  # every cell of a held-out pair is a test cell, none trains
        others = np.array([t[0] == lab and t[1] != level for t in tagged])
        assert (split[others] != TEST).any()  # the condition is trained at another level
    trained = {t for t, s in zip(tagged, split) if s in (TRAIN, VAL)}
    assert not trained & set(pairs)
    one_level = make_split(data, "heldout-covariate", fraction=1.0, level="A", seed=0)
    assert {lv for _, lv in heldout_pairs(data, one_level)} == {"A"}
    assert {lab for lab, _ in heldout_pairs(data, one_level)} == {"P", "Q", "P+Q"}
    named = make_split(data, "heldout-covariate", heldout=["P@B"])
    assert heldout_pairs(data, named) == [("P", "B")]
    with pytest.raises(SamsError, match="every level"):
        make_split(data, "heldout-covariate", heldout=["P@A", "P@B"])
    with pytest.raises(SamsError, match="no covariates"):
        make_split(data.without_covariates(), "heldout-covariate")


def test_covariates_round_trip_through_the_bundle_and_unknown_levels_are_refused(adata, data, tmp_path):
    spec = SplitSpec("heldout-covariate", fraction=1.0, level="B", seed=0)
    bundle, _, ev = train_bundle(
        data, "sams_vae", spec, TrainConfig(epochs=2, batch_size=256, device="cpu"), out=tmp_path / "m.sams",
        n_ate_samples=200, **SMALL,
    )
    # every perturbed cell of type B is held out: type B trains on its controls only
    assert set(ev.per_level.index) == {(TRAIN, "A"), (TEST, "B")}
    loaded = load_bundle(tmp_path / "m.sams")
    assert loaded.covariates == {"cell_type": ["A", "B"]}
    assert loaded.manifest["split"]["test_pairs"] == [["P", "B"], ["P+Q", "B"], ["Q", "B"]]
    assert set(loaded.manifest["metrics_per_level"][TEST]) == {"B"}
    again = data_for_bundle(loaded, adata)
    assert again.covariates == data.covariates
    assert np.array_equal(split_for_bundle(loaded, again), spec.make(data))
    before = predict_effect(bundle, "P", covariate_level="B", n_globals=20, n_per_global=2)
    after = predict_effect(loaded, "P", covariate_level="B", n_globals=20, n_per_global=2)
    assert np.allclose(before.mean, after.mean, atol=1e-5)
    with pytest.raises(SamsError, match="never saw cell_type = 'C'"):
        predict_effect(loaded, "P", covariate_level="C")
    # a cell type the model never saw
    b = adata.copy()
    b.obs["cell_type"] = b.obs["cell_type"].astype(str)
    b.obs.iloc[0, b.obs.columns.get_loc("cell_type")] = "C"
    with pytest.raises(SamsError, match="'cell_type' has level\\(s\\) 'C' that the model never saw"):
        data_for_bundle(loaded, b)


def test_evaluate_reports_pooled_and_per_level_metrics(data):
    split = make_split(data, "heldout-covariate", fraction=0.5, seed=1)
    model, _ = train(data, "sams_vae", split, TrainConfig(epochs=1, batch_size=256, device="cpu"), **SMALL)
    ev = evaluate_model(model, data, split, n_iwelbo_samples=5, n_ate_samples=200)
    assert list(ev.metrics.index) == [TRAIN, TEST]
    assert ev.per_level.index.names == ["split", "level"]
    assert {"iwelbo", "ate_r", "cosine_rank"} <= set(ev.per_level.columns)
    test_levels = {lv for s, lv in ev.per_level.index if s == TEST}
    assert test_levels == {lv for _, lv in heldout_pairs(data, split)}
    n = ev.per_level.loc[TEST, "n_cells"].sum()
    assert n == ev.metrics.loc[TEST, "n_cells"]


DYNAMO_OK = torch._dynamo.is_dynamo_supported() and hasattr(torch._dynamo.config, "trace_autograd_ops")


@pytest.mark.skipif(not DYNAMO_OK, reason="torch.compile with backward tracing (torch >= 2.11) is unavailable")
def test_covariate_step_is_one_graph(data):
    """With covariates (and covariate-specific shifts) SAMS-VAE's whole training step still traces
    into one graph: no break, no recompile (the GPU's compiled, graph-captured step)."""
    import warnings

    from sams_core.data.batches import condition_ids
    from sams_core.training.trainer import Placement, TrainStep

    split = make_split(data, "random", seed=0)
    model = build_for_data("sams_vae", data, split, covariate_shift=True, align_at=None, **SMALL)
    pl = Placement(torch.device("cpu"))
    source = DeviceData(data, np.flatnonzero(split == TRAIN), pl.device, condition_ids(model, data))
    step = TrainStep(model, source, TrainConfig(device="cpu", batch_size=32, lr=3e-3), pl)
    step.compile(backend="eager")
    counters = torch._dynamo.utils.counters
    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        for i in range(4):
            step.begin_epoch()
            step(torch.arange(32 * i, 32 * i + 32))
    assert step.compiled == "default" and step.notes == []
    assert counters["stats"]["unique_graphs"] - graphs == 1


def test_covariate_gradient_is_a_sum_over_cells(data):
    """Two half batches give the whole batch's gradient (what multi-process training relies on),
    with the noise fixed as a pattern that does not depend on the cell (see test_distributed)."""
    from test_distributed import deterministic_noise

    split = make_split(data, "random", seed=0)
    torch.manual_seed(0)
    model = build_for_data("sams_vae", data, split, covariate_shift=True, **SMALL).double()
    dd = DeviceData(data, np.arange(90), torch.device("cpu"), np.full(data.n_cells, -1))

    def grads(lo: int, hi: int, weight: float) -> list[torch.Tensor]:
        b = dd.batch(torch.arange(lo, hi))
        b.x, b.d, b.library, b.c = b.x.double(), b.d.double(), b.library.double(), b.c.double()
        g = torch.autograd.grad(model.loss(b).loss * weight, list(model.parameters()), allow_unused=True)
        return [torch.zeros_like(p) if x is None else x for p, x in zip(model.parameters(), g)]

    with deterministic_noise():
        whole = grads(0, 90, 1.0)
        halves = [a + b for a, b in zip(grads(0, 45, 0.5), grads(45, 90, 0.5))]
    for (name, _), w, h in zip(model.named_parameters(), whole, halves):
        torch.testing.assert_close(h, w, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
