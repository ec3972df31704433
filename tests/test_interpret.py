"""Predicted effects of combinations, interaction, baselines and the collapse check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sams_core.data import from_anndata
from sams_core.errors import SamsError
from sams_core.evaluate import effect_scores
from sams_core.interpret import (
    additive_baseline,
    combination_label,
    diversity_check,
    mean_baseline,
    observed_effects,
    predict_effect,
)
from sams_core.pipeline import SplitSpec, train_bundle
from sams_core.train import TrainConfig


@pytest.fixture(scope="module")
def fitted(screen):
    data = from_anndata(screen[0])
    bundle, _, _ = train_bundle(
        data, "sams_vae", SplitSpec("heldout-combos", 0.34, seed=0), TrainConfig(epochs=25, lr=3e-3, batch_size=256),
        None, evaluate=False, n_latent=4, n_hidden=64,
    )
    return data, bundle


def test_effect_of_unmeasured_combination_with_interval(fitted):
    data, bundle = fitted
    pred = predict_effect(bundle, "KLF1+TAL1", n_globals=50, n_per_global=4)
    assert pred.label == "KLF1+TAL1" and "KLF1+TAL1" not in set(data.labels)
    assert pred.mean.shape == (data.n_genes,)
    assert np.all(pred.lower <= pred.mean + 1e-9) and np.all(pred.mean <= pred.upper + 1e-9)
    np.testing.assert_allclose(
        pred.latent_shift,
        bundle.model.latent_shift(__import__("torch").eye(6)[[data.perturbations.index("KLF1")]]).detach().numpy()[0]
        + bundle.model.latent_shift(__import__("torch").eye(6)[[data.perturbations.index("TAL1")]]).detach().numpy()[0],
        rtol=1e-5, atol=1e-5,
    )
    assert set(pred.singles) == {"KLF1", "TAL1"} and pred.interaction is not None
    np.testing.assert_allclose(pred.interaction, pred.mean - pred.singles["KLF1"] - pred.singles["TAL1"], atol=1e-5)
    assert pred.interaction_score >= 0
    t = pred.table()
    assert list(t.columns[:4]) == ["gene", "effect", "lower", "upper"] and len(t) == data.n_genes


def test_predicted_single_tracks_observed(fitted):
    data, bundle = fitted
    obs = observed_effects(data)
    pred = predict_effect(bundle, "GATA1", n_globals=50, n_per_global=10)
    r = np.corrcoef(pred.mean, obs.loc["GATA1"].to_numpy())[0, 1]
    assert r > 0.8, r


def test_dosage_changes_effect_and_errors(fitted):
    _, bundle = fitted
    full = predict_effect(bundle, {"SPI1": 1.0}, n_globals=30, n_per_global=4)
    half = predict_effect(bundle, {"SPI1": 0.5}, n_globals=30, n_per_global=4)
    assert np.abs(half.mean).sum() < np.abs(full.mean).sum()
    assert combination_label({"SPI1": 0.5, "KLF1": 1}) == "SPI1:0.5+KLF1"
    with pytest.raises(SamsError, match="Unknown perturbation"):
        predict_effect(bundle, "NOPE")
    with pytest.raises(SamsError, match="at least one"):
        predict_effect(bundle, "control")


def test_baselines_and_collapse_check(fitted):
    data, _ = fitted
    obs = observed_effects(data)
    combos = data.combinations()
    add = additive_baseline(obs, combos)
    np.testing.assert_allclose(add.loc["GATA1+KLF1"], obs.loc["GATA1"] + obs.loc["KLF1"])
    s_add = effect_scores(obs.loc[combos], add)
    s_mean = effect_scores(obs.loc[combos], mean_baseline(obs, combos))
    assert s_add["ate_r"] > 0.5 and np.isnan(s_mean["ate_r"])
    assert np.isnan(additive_baseline(obs, ["KLF1+UNSEEN"]).to_numpy()).all()
    singles = obs.loc[data.perturbations]
    assert not diversity_check(singles)["collapsed"]
    collapsed = pd.DataFrame(np.tile(singles.mean(0).to_numpy(), (len(singles), 1)), index=singles.index)
    flag = diversity_check(collapsed)
    assert flag["collapsed"] and flag["mean_pairwise_cosine"] == pytest.approx(1.0)
    assert effect_scores(singles, collapsed)["cosine_rank"] == pytest.approx(0.5, abs=0.1)
