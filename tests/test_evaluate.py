"""Evaluation scores on known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sams_core.data.screen import from_anndata
from sams_core.data.splits import make_split
from sams_core.evaluation.compare import (
    HeldoutCells,
    add_truth_scores,
    compare_on_heldout,
    energy_distance,
)
from sams_core.evaluation.metrics import (
    ate_transform,
    calibration,
    cosine_rank,
    data_ate,
    effect_scores,
    evaluate_model,
    split_conditions,
    top_de_mask,
)
from sams_core.evaluation.truth import mask_scores
from sams_core.pipeline import SplitSpec, train_bundle
from sams_core.simulate import (
    SimulationTruth,
    sample_condition,
    simulate_reference_screen,
    simulate_sams_screen,
    truth_from_adata,
    truth_masks_for,
)
from sams_core.training.trainer import TrainConfig


def test_ate_transform_and_data_ate_by_hand(screen):
    data = from_anndata(screen[0])
    ate = data_ate(data, match_covariates=False)
    x = data.dense()
    v = np.log2(1 + 1e4 * x / data.library[:, None])
    ref = v[data.labels == "KLF1"].mean(0) - v[data.control_mask].mean(0)
    np.testing.assert_allclose(ate.loc["KLF1"].to_numpy(), ref, rtol=1e-4, atol=1e-4)
    assert "control" not in ate.index
    # the screen's obs['batch'] is a covariate: by default each cell is compared with the controls
    # of its own batch, and a condition's effect is the cell-weighted mean over batches
    assert data.covariates == {"batch": ["b1", "b2"]}
    lv = data.level_of_cells()
    klf1 = data.labels == "KLF1"
    per = [v[klf1 & (lv == b)].mean(0) - v[data.control_mask & (lv == b)].mean(0) for b in ("b1", "b2")]
    n = [(klf1 & (lv == b)).sum() for b in ("b1", "b2")]
    matched = (n[0] * per[0] + n[1] * per[1]) / (n[0] + n[1])
    np.testing.assert_allclose(data_ate(data).loc["KLF1"].to_numpy(), matched, rtol=1e-4, atol=1e-4)
    assert ate_transform(np.array([[1.0]]), np.array([1e4]), True)[0, 0] == pytest.approx(1.0)


def test_effect_scores_known_answers():
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(rng.normal(size=(8, 50)), index=[f"p{i}" for i in range(8)])
    perfect = effect_scores(obs, obs)
    assert perfect["ate_r"] == pytest.approx(1) and perfect["ate_r2"] == pytest.approx(1)
    assert perfect["ate_r_top20"] == pytest.approx(1) and perfect["cosine_rank"] == 0.0
    assert perfect["calibration_slope"] == pytest.approx(1) and perfect["calibration_intercept"] == pytest.approx(0, abs=1e-12)
    # the same prediction for every perturbation: every own prediction ties with all others
    collapsed = pd.DataFrame(np.tile(obs.mean(0).to_numpy(), (8, 1)), index=obs.index)
    s = effect_scores(obs, collapsed)
    assert s["cosine_rank"] == pytest.approx(0.5), "a collapsed predictor ranks at chance"
    np.testing.assert_allclose(cosine_rank(collapsed.to_numpy(), obs.to_numpy()), 0.5)
    shuffled = effect_scores(obs, pd.DataFrame(obs.to_numpy()[::-1], index=obs.index))
    assert shuffled["cosine_rank"] > 0.3 and abs(shuffled["ate_r"]) < 0.3
    scaled = effect_scores(obs, obs * 0.5)
    assert scaled["ate_r"] == pytest.approx(1) and scaled["ate_r2"] < 1


def test_cosine_rank_is_perturbench_orientation():
    """Each observed effect ranks its own prediction among all predictions (not the transpose)."""
    obs = np.eye(3)  # orthonormal observed effects: cosine(pred j, obs i) = pred_j[i] / |pred_j|
    pred = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.6, 0.0, 0.8]])
    # obs 0: own prediction 1.0 beats 0.8 and 0.6; obs 1: own 0.6 beats 0 and 0; obs 2: own 0.8 beats 0, 0
    np.testing.assert_allclose(cosine_rank(pred, obs), [0.0, 0.0, 0.0])
    # the transposed score would rank observed effects around prediction 1 (0.8 for obs 0 > own 0.6): 1/6
    c = pred @ obs.T
    transposed = ((c > np.diag(c)[:, None]) & ~np.eye(3, dtype=bool)).sum(1) / 2
    assert transposed.mean() == pytest.approx(1 / 6)
    # ties count half: two identical predictions tie for obs 0
    tie = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(cosine_rank(tie, obs), [0.25, 0.5, 0.0])


def test_calibration_known_answers():
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(6, 40))
    assert calibration(obs, 0.5 * obs) == pytest.approx((0.5, 0.0), abs=1e-12)
    assert calibration(obs, 2.0 * obs + 0.3) == pytest.approx((2.0, 0.3), abs=1e-12)
    obs_df = pd.DataFrame(obs, index=[f"p{i}" for i in range(6)])
    s = effect_scores(obs_df, obs_df * 0.5)
    assert s["calibration_slope"] == pytest.approx(0.5) and s["calibration_slope_top20"] == pytest.approx(0.5)
    assert s["calibration_intercept_top20"] == pytest.approx(0.0, abs=1e-12)
    # shrunk only on the strongest effects: the top-20 slope says so, the all-gene slope less
    pred = obs.copy()
    top = top_de_mask(obs, 20)
    pred[top] *= 0.5
    s = effect_scores(obs_df, pd.DataFrame(pred, index=obs_df.index))
    assert s["calibration_slope_top20"] == pytest.approx(0.5) and s["calibration_slope"] > s["calibration_slope_top20"]
    assert np.isnan(calibration(np.ones(5), np.arange(5.0))[0]), "constant observed effects have no slope"


def test_energy_distance_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 3))
    assert energy_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    near = energy_distance(a, rng.normal(size=(200, 3)))
    far = energy_distance(a, rng.normal(size=(200, 3)) + 3)
    assert far > 10 * max(near, 1e-3)


@pytest.mark.parametrize("kind", ["sams", "reference"])
def test_energy_distance_oracle_scores_within_the_sampling_floor(kind):
    """Cells drawn from the simulator's true model, at library sizes of observed controls and
    transformed like the data, are as close to the held-out cells as half of them to the other."""
    if kind == "sams":
        a = simulate_sams_screen(n_perturbations=8, n_latent=4, n_genes=60, n_combinations=12,
                                 cells_per_perturbation=200, heldout_fraction=0.5, seed=2)
    else:
        a = simulate_reference_screen(n_perturbations=10, n_latent=6, n_genes=40, n_combinations=12,
                                      cells_per_perturbation=200, heldout_fraction=0.5, seed=2)
    truth = truth_from_adata(a)
    data = from_anndata(a)
    split = make_split(data, "heldout-combos", heldout=list(truth.heldout_combinations), seed=0)
    ref = HeldoutCells.build(data, split, n_cells=200, n_pcs=10, seed=0)
    assert len(ref.conditions) == 6
    floor = ref.floor(seed=0)
    oracle = ref.energy_of_sampler(lambda c, lib, s: sample_condition(truth, c, len(lib), lib, s)[0], seed=1)
    assert 0 < oracle <= floor
    no_change = ref.energy_of_sampler(lambda c, lib, s: sample_condition(truth, "control", len(lib), lib, s)[0], seed=1)
    assert no_change > 20 * floor
    if kind == "sams":  # the old protocol: model cells at library 1e4 against cells at their own library
        fixed = ref.energy_of_sampler(lambda c, lib, s: sample_condition(truth, c, len(lib), 1e4, s)[0], seed=1)
        assert fixed > 4 * floor


@pytest.fixture(scope="module")
def trained(screen):
    data = from_anndata(screen[0])
    spec = SplitSpec("heldout-combos", 0.67, seed=0)
    bundle, _, _ = train_bundle(data, "sams_vae", spec, TrainConfig(epochs=15, lr=3e-3, batch_size=256), None,
                                evaluate=False, n_latent=4, n_hidden=64)
    return data, spec.make(data), bundle


def _toy_truth(screen) -> SimulationTruth:
    names = ["KLF1", "GATA1", "SPI1", "CEBPA", "TAL1", "RUNX1"]  # the toy screen's mask rows
    masks = screen[1].astype(np.int8)
    empty = np.array([], dtype="<U1")
    return SimulationTruth("sams", np.array(names), masks, masks.astype(np.float32), empty, empty, {}, {}, 0, {})


def test_compare_models_and_baselines_on_heldout(screen, trained):
    data, split, bundle = trained
    t = compare_on_heldout({"SAMS-VAE": bundle}, data, split, n_cells=100, n_ate_samples=200, truth=_toy_truth(screen)).set_index("name")
    assert list(t.index) == ["no change", "additive in data", "SAMS-VAE"]
    assert t.loc["additive in data", "ate_r"] > 0.5
    assert t.loc["no change", "energy_distance"] > t.loc["additive in data", "energy_distance"]
    assert np.isfinite(t.loc["SAMS-VAE", "iwelbo"]) and np.isnan(t.loc["no change"].get("iwelbo", np.nan))
    assert t.loc["SAMS-VAE", "energy_distance"] < t.loc["no change", "energy_distance"]
    assert (t["energy_floor"] > 0).all() and t["energy_floor"].nunique() == 1
    assert t.loc["no change", "calibration_slope"] == pytest.approx(0.0)
    assert np.isfinite(t.loc["SAMS-VAE", ["calibration_slope", "calibration_slope_top20"]].astype(float)).all()
    assert 0.0 <= t.loc["SAMS-VAE", "mask_f1"] <= 1.0 and t.loc[["no change", "additive in data"], "mask_f1"].isna().all()


def test_truth_scores_match_mask_scores(screen, trained):
    _, _, bundle = trained
    truth = _toy_truth(screen)

    class Perfect:  # a model whose masks are the truth, in another row order
        mask_rows = tuple(truth.perturbations[::-1])

        def mask_probabilities(self):
            return truth.masks[::-1].astype(float)

    class NoMasks:
        mask_rows = tuple(truth.perturbations)

        def mask_probabilities(self):
            return None

    table = pd.DataFrame({"name": ["no change", "perfect", "cpa", "sams"]})
    out = add_truth_scores(table, {"perfect": Perfect(), "cpa": NoMasks(), "sams": bundle}, truth).set_index("name")
    assert out.loc["perfect", "mask_f1"] == 1.0 and out.loc["perfect", "mask_precision"] == 1.0
    assert np.isnan(out.loc["cpa", "mask_f1"]) and np.isnan(out.loc["no change", "mask_f1"])
    want = mask_scores(truth_masks_for(truth, bundle.perturbations), bundle.mask_probabilities())["f1"]
    assert out.loc["sams", "mask_f1"] == pytest.approx(want)


def test_evaluate_model_reports_calibration(trained):
    data, split, bundle = trained
    m = evaluate_model(bundle.model, data, split, n_iwelbo_samples=10, n_ate_samples=200, splits=("test",)).metrics
    for key in ("calibration_slope", "calibration_intercept", "calibration_slope_top20", "calibration_intercept_top20"):
        assert np.isfinite(m.loc["test", key]), key


def test_quick_evaluation_scores_a_seeded_sample_of_conditions_and_says_so(trained):
    """The quick evaluation (train's default) scores at most ``max_ate_conditions`` conditions per
    split, the same ones on every call, and a note names the sample; None scores every condition."""
    data, split, bundle = trained
    every = split_conditions(data, split, "train")
    assert len(every) > 3
    kw = dict(n_iwelbo_samples=2, n_ate_samples=100, splits=("train",))
    quick = evaluate_model(bundle.model, data, split, max_ate_conditions=3, **kw)
    again = evaluate_model(bundle.model, data, split, max_ate_conditions=3, **kw)
    full = evaluate_model(bundle.model, data, split, max_ate_conditions=None, **kw)
    assert quick.metrics.loc["train", "n_conditions"] == 3
    assert list(quick.observed["train"].index) == list(again.observed["train"].index)
    assert set(quick.observed["train"].index) < set(every)
    assert any(f"3 of its {len(every)} conditions" in n for n in quick.notes), quick.notes
    assert full.metrics.loc["train", "n_conditions"] == len(every) and not full.notes
    # the sampled conditions' observed effects are those of the full evaluation
    picked = list(quick.observed["train"].index)
    np.testing.assert_allclose(quick.observed["train"].to_numpy(), full.observed["train"].loc[picked].to_numpy(), atol=1e-9)


def test_model_cells_drawn_for_many_conditions_at_once_are_the_same_draws(trained):
    """Compare draws a model's cells for several held-out conditions at once (shared draws of the
    globals and basal states); for one condition they are exactly :func:`predicted_cells`'s, and
    the energy distance of the batched draws agrees with the one-condition-at-a-time sampler."""
    from sams_core.evaluation.compare import (
        HeldoutCells,
        model_sampler,
        predicted_cells,
        predicted_cells_of_rows,
    )

    data, split, bundle = trained
    cond = next(c for c in split_conditions(data, split, "test"))
    lib = np.array([900.0, 1500.0, 3000.0, 1200.0])
    one = predicted_cells(bundle.model, data.dosage_row(cond), lib, data.is_counts, seed=4)
    many = predicted_cells_of_rows(bundle.model, data.dosage_row(cond)[None], lib[None], data.is_counts, seed=4)
    np.testing.assert_array_equal(many[0], one)
    ref = HeldoutCells.build(data, split, n_cells=60, n_pcs=5, seed=0)
    batched = ref.energy_of_model(bundle.model, data, seed=0, chunk=3)
    single = ref.energy_of_sampler(model_sampler(bundle.model, data), seed=0)
    assert np.isfinite(batched) and batched == pytest.approx(single, rel=0.35, abs=0.2)
