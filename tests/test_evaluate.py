"""Evaluation scores on known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sams_core.data.screen import from_anndata
from sams_core.evaluation.metrics import ate_transform, cosine_rank, data_ate, effect_scores


def test_ate_transform_and_data_ate_by_hand(screen):
    data = from_anndata(screen[0])
    ate = data_ate(data)
    x = data.dense()
    v = np.log2(1 + 1e4 * x / data.library[:, None])
    ref = v[data.labels == "KLF1"].mean(0) - v[data.control_mask].mean(0)
    np.testing.assert_allclose(ate.loc["KLF1"].to_numpy(), ref, rtol=1e-4, atol=1e-4)
    assert "control" not in ate.index
    assert ate_transform(np.array([[1.0]]), np.array([1e4]), True)[0, 0] == pytest.approx(1.0)


def test_effect_scores_known_answers():
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(rng.normal(size=(8, 50)), index=[f"p{i}" for i in range(8)])
    perfect = effect_scores(obs, obs)
    assert perfect["ate_r"] == pytest.approx(1) and perfect["ate_r2"] == pytest.approx(1)
    assert perfect["ate_r_top20"] == pytest.approx(1) and perfect["cosine_rank"] == 0.0
    # the same prediction for every perturbation: rank near chance, cosine still positive-ish
    collapsed = pd.DataFrame(np.tile(obs.mean(0).to_numpy(), (8, 1)), index=obs.index)
    s = effect_scores(obs, collapsed)
    assert s["cosine_rank"] == pytest.approx(0.5), "a collapsed predictor ranks at chance"
    ranks = cosine_rank(collapsed.to_numpy(), obs.to_numpy())
    assert sorted(ranks * 7) == pytest.approx(list(range(8)))
    shuffled = effect_scores(obs, pd.DataFrame(obs.to_numpy()[::-1], index=obs.index))
    assert shuffled["cosine_rank"] > 0.3 and abs(shuffled["ate_r"]) < 0.3
    scaled = effect_scores(obs, obs * 0.5)
    assert scaled["ate_r"] == pytest.approx(1) and scaled["ate_r2"] < 1


def test_energy_distance_known_answers():
    from sams_core.evaluation.compare import energy_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 3))
    assert energy_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    near = energy_distance(a, rng.normal(size=(200, 3)))
    far = energy_distance(a, rng.normal(size=(200, 3)) + 3)
    assert far > 10 * max(near, 1e-3)


def test_compare_models_and_baselines_on_heldout(screen):
    from sams_core.evaluation.compare import compare_on_heldout
    from sams_core.pipeline import SplitSpec, train_bundle
    from sams_core.training.trainer import TrainConfig

    data = from_anndata(screen[0])
    spec = SplitSpec("heldout-combos", 0.67, seed=0)
    bundle, _, _ = train_bundle(data, "sams_vae", spec, TrainConfig(epochs=15, lr=3e-3, batch_size=256), None,
                                evaluate=False, n_latent=4, n_hidden=64)
    split = spec.make(data)
    t = compare_on_heldout({"SAMS-VAE": bundle}, data, split, n_cells=100, n_ate_samples=200).set_index("name")
    assert list(t.index) == ["no change", "additive in data", "SAMS-VAE"]
    assert t.loc["additive in data", "ate_r"] > 0.5
    assert t.loc["no change", "energy_distance"] > t.loc["additive in data", "energy_distance"]
    assert np.isfinite(t.loc["SAMS-VAE", "iwelbo"]) and np.isnan(t.loc["no change"].get("iwelbo", np.nan))
    assert t.loc["SAMS-VAE", "energy_distance"] < t.loc["no change", "energy_distance"]
