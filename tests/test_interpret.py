"""Predicted effects of combinations, interaction, baselines and the collapse check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sams_core.data.screen import from_anndata
from sams_core.errors import SamsError
from sams_core.evaluation.metrics import effect_scores
from sams_core.interpret.programs import effect_enrichment, program_collection, unit_enrichment, top_genes, unit_loadings
from sams_core.plots import heatmap_orders
from sams_core.interpret.effects import compare_with_data, perturbation_distances, predict_effect, rank_unmeasured_pairs
from sams_core.interpret.writeback import write_back, write_h5ad
from sams_core.labels import combination_label
from sams_core.evaluation.baselines import additive_baseline, diversity_check, mean_baseline, observed_effects
from sams_core.pipeline import SplitSpec, train_bundle
from sams_core.training.trainer import TrainConfig


@pytest.fixture(scope="module")
def fitted(screen):
    data = from_anndata(screen[0])
    bundle, _, _ = train_bundle(
        data, "sams_vae", SplitSpec("heldout-combos", 0.34, seed=0), TrainConfig(epochs=40, lr=3e-3, batch_size=256),
        # the ranking is checked against Compose within Monte-Carlo error, which needs a settled
        # posterior: the default schedule leaves a quarter of the budget to the final ELBO, and
        # after 25 epochs (6 of them final) the embeddings' spread is still wide
        None, evaluate=False, n_latent=4, n_hidden=64,
    )
    return data, bundle


def test_effect_of_unmeasured_combination_with_interval(fitted):
    data, bundle = fitted
    pred = predict_effect(bundle, "TAL1+KLF1", n_globals=50, n_per_global=4)
    assert pred.label == "KLF1+TAL1" and "KLF1+TAL1" not in set(data.labels), "the canonical label, in the model's order"
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


def test_compare_with_data_and_summary_numbers(fitted):
    data, bundle = fitted
    obs = observed_effects(data)
    pred = predict_effect(bundle, "KLF1+GATA1", n_globals=30, n_per_global=4)
    assert pred.label == "GATA1+KLF1" and pred.unit_dosages
    t = compare_with_data(pred, obs)
    assert list(t.columns) == ["gene", "predicted", "sum of predicted singles", "additive in data", "observed"]
    np.testing.assert_allclose(t["sum of predicted singles"], pred.singles["GATA1"] + pred.singles["KLF1"])
    np.testing.assert_allclose(t["observed"], obs.loc["GATA1+KLF1"])
    np.testing.assert_allclose(t["additive in data"], additive_baseline(obs, ["GATA1+KLF1"]).iloc[0])
    assert pred.effect_norm == pytest.approx(np.linalg.norm(pred.mean))
    assert pred.mean_interval_width == pytest.approx((pred.upper - pred.lower).mean())
    assert pred.n_genes_excluding_zero == int(((pred.lower > 0) | (pred.upper < 0)).sum())
    half = compare_with_data(predict_effect(bundle, {"GATA1": 0.5, "KLF1": 1}, n_globals=10, n_per_global=2), obs)
    assert list(half.columns) == ["gene", "predicted", "sum of predicted singles"], "no data at other dosages"


def test_dosage_changes_effect_and_errors(fitted):
    _, bundle = fitted
    full = predict_effect(bundle, {"SPI1": 1.0}, n_globals=30, n_per_global=4)
    half = predict_effect(bundle, {"SPI1": 0.5}, n_globals=30, n_per_global=4)
    assert np.abs(half.mean).sum() < np.abs(full.mean).sum()
    assert combination_label({"SPI1": 0.5, "KLF1": 1}) == "SPI1:0.5+KLF1"
    assert half.label == "SPI1:0.5" and half.dosages == {"SPI1": 0.5} and not half.unit_dosages
    assert predict_effect(bundle, "SPI1:0.5", n_globals=30, n_per_global=4).label == "SPI1:0.5"
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


def test_rank_unmeasured_pairs(fitted):
    data, bundle = fitted
    t = rank_unmeasured_pairs(bundle, sorted(set(data.labels)), n_globals=10, n_per_global=2)
    n_singles = 6
    assert len(t) == n_singles * (n_singles - 1) // 2 - 3, "every unmeasured pair, measured ones left out"
    assert not set(t.pair) & {"GATA1+KLF1", "KLF1+GATA1"}
    assert t.rank_interaction.min() == 1 and (t.uncertainty > 0).all()
    assert list(t.rank_interaction) == sorted(t.rank_interaction)


def test_ranked_pair_scores_what_compose_shows(fitted):
    """The refined ranking scores a clearly interacting pair as Compose's prediction of that pair
    does (within Monte-Carlo error), and its first pass already puts that pair on top (weak
    pairs: see the test below)."""
    data, bundle = fitted
    t = rank_unmeasured_pairs(bundle, sorted(set(data.labels)), refine=None).set_index("pair")
    first = rank_unmeasured_pairs(bundle, sorted(set(data.labels)), refine=0)
    strong = t[t.interaction_score > 0.5]
    assert len(strong) >= 1
    for pair, r in strong.iterrows():
        shown = predict_effect(bundle, pair)
        assert r.interaction_score == pytest.approx(shown.interaction_score, rel=0.1), pair
        assert r.effect_norm == pytest.approx(shown.effect_norm, rel=0.1), pair
    assert set(first.pair[: len(strong)]) == set(strong.index)


def test_similarity_orders_and_loadings(fitted):
    data, bundle = fitted
    dm = perturbation_distances(bundle, "mask")
    assert dm.shape == (6, 6) and np.allclose(np.diag(dm), 0) and np.allclose(dm, dm.T)
    ds = perturbation_distances(bundle, "shift")
    assert (ds.to_numpy() >= 0).all()
    rows, cols = heatmap_orders(bundle.model.mask_probs().detach().numpy())
    assert sorted(rows) == list(range(6)) and sorted(cols) == list(range(4))
    L = unit_loadings(bundle, data, n_cells=300)
    assert L.shape == (4, data.n_genes)
    tg = top_genes(L, 0, n=5)
    assert len(tg) == 10 and tg.loading.iloc[0] == L.iloc[0].max()


def test_write_back_opens_in_scanpy(fitted, screen):
    import scanpy as sc

    data, bundle = fitted
    a = screen[0].copy()
    write_back(a, bundle, data, unit_loadings(bundle, data, n_cells=200))
    assert a.obsm["X_sams"].shape == (a.n_obs, 4) and "X_sams_basal" in a.obsm
    assert a.uns["sams"]["mask_probs"].shape == (6, 4)
    import matplotlib

    matplotlib.use("Agg")
    ax = sc.pl.embedding(a, basis="X_sams", color="perturbation", show=False)
    assert ax is not None and len(ax.collections) > 0
    with pytest.raises(SamsError, match="same screen"):
        write_back(a[:10].copy(), bundle, data)


def test_write_back_command_writes_an_annotated_h5ad(fitted, screen_path, tmp_path):
    import anndata as ad

    from sams_core.cli import main
    from sams_core.io.bundle import save_bundle

    data, bundle = fitted
    path = save_bundle(tmp_path / "model.sams", bundle.model, bundle.manifest)
    out = tmp_path / "annotated.h5ad"
    assert main(["write-back", str(path), "--data", str(screen_path), "--out", str(out)]) == 0
    a = ad.read_h5ad(out)
    assert a.obsm["X_sams"].shape == (data.n_cells, 4) and "X_sams_basal" in a.obsm
    assert a.uns["sams"]["mask_probs"].shape == (6, 4) and list(a.uns["sams"]["mask_rows"]) == bundle.mask_rows
    assert a.n_obs == ad.read_h5ad(screen_path).n_obs and "perturbation" in a.obs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotated.h5ad", "model.sams"], "no temporary file left"
    assert main(["write-back", str(path), "--data", str(screen_path), "--out", str(tmp_path / "x.csv")]) == 2


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    import anndata as ad

    out = tmp_path / "a.h5ad"
    write_h5ad(ad.AnnData(np.ones((2, 2), dtype=np.float32)), out)

    class Broken(ad.AnnData):
        def write_h5ad(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_h5ad(Broken(np.zeros((3, 2), dtype=np.float32)), out)
    assert ad.read_h5ad(out).n_obs == 2 and [p.name for p in tmp_path.iterdir()] == ["a.h5ad"]


def test_unit_and_effect_enrichment_find_true_programs():
    """On a simulated screen, the units a perturbation truly targets show up as enriched programs."""
    from sams_core.simulate import simulate_sams_screen, truth_from_adata

    sim = simulate_sams_screen(n_perturbations=8, n_latent=4, n_genes=80, n_combinations=4, cells_per_perturbation=80, seed=3)
    truth = truth_from_adata(sim)
    data = from_anndata(sim)
    bundle, _, _ = train_bundle(data, "cpa_vae", SplitSpec("random"), TrainConfig(epochs=30, lr=3e-3, batch_size=256),
                                None, evaluate=False, n_latent=4, n_hidden=64)
    coll = program_collection(sim)
    # known answer: loadings that put unit k on program k (with noise) name program k first
    rng = np.random.default_rng(0)
    genes = list(sim.var_names)
    L = pd.DataFrame(rng.normal(0, 0.1, (4, len(genes))), columns=genes)
    for name, members in coll.sets.items():
        L.loc[truth.unit_of_program[name], members] += 1.0
    for method in ("rank", "hypergeometric"):
        res = unit_enrichment(L, coll, method, n_top=15)
        best = res.sort_values("p").groupby("unit").head(1).set_index("unit")
        assert all(best.loc[k, "set"] == f"PROGRAM_U{k:02d}" for k in range(4)), method
        assert (best.q < 0.05).all() and {"set", "p", "q", "overlap"} <= set(res.columns)
    # a trained model's loadings go through the same path
    assert set(unit_enrichment(unit_loadings(bundle, data, n_cells=300), coll).unit) == set(range(4))
    t = truth.perturbations[0]
    pred = predict_effect(bundle, t, n_globals=30, n_per_global=5)
    eff = effect_enrichment(pred, coll)
    targeted = {f"PROGRAM_U{k:02d}" for k in np.flatnonzero(truth.masks[0])}
    assert set(eff.sort_values("p").set.head(len(targeted))) & targeted


def test_prediction_draws_are_paired_across_rows(fitted):
    """Every dosage row is decoded at the same basal draws: the same row twice gives the same
    effect draw for draw, so a combination minus its members carries no basal Monte-Carlo noise."""
    from sams_core.evaluation.metrics import model_ate_draws

    data, bundle = fitted
    row = data.dosage_row("KLF1")
    draws = model_ate_draws(bundle.model, np.vstack([row, row]), bundle.is_counts, 8, 5, seed=1, sample_counts=False)
    np.testing.assert_allclose(draws[:, 0], draws[:, 1], atol=1e-5)  # float32 rounding; unpaired draws differ by ~0.1


def test_weak_pairs_score_in_compose_as_in_the_ranking(fitted):
    """With paired draws Compose's interaction score of every ranked pair, weak ones included,
    is the ranking's within a few hundredths. The score is a ratio to the pair's own effect: where
    the members cancel (an effect a tenth of the others') it is several units, and then it agrees
    to a few percent of itself."""
    data, bundle = fitted
    t = rank_unmeasured_pairs(bundle, sorted(set(data.labels)), refine=None)
    off = [abs(r.interaction_score - predict_effect(bundle, r.pair).interaction_score) / max(1.0, r.interaction_score)
           for r in t.itertuples()]
    assert max(off) < 0.06, sorted(off)
