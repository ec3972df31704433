"""The objective a model trains and the one it is scored by (issue 13): the default SAMS-VAE ends on
the paper's ELBO, the held-out IWELBO does not depend on any prior weight, a reloaded bundle
computes the same training objective, sVAE+'s out-of-domain protocol never scores a cell it
fitted on, the correlated guide's expected shift averages over the masks, and training keeps
(and says where it kept) the best state of the schedule's last phase."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sams_core.models.base import Batch
from sams_core.models.registry import build_model, label


def _model(**kw):
    torch.manual_seed(0)
    return build_model("sams_vae", n_genes=20, n_perturbations=12, n_latent=4, n_hidden=16, embed_hidden=8, **kw)


def _batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.rand(9, 20, generator=g) * 5)
    d = torch.eye(12)[torch.arange(9)]
    return Batch(x, d, x.sum(1) + 1, torch.full((9,), -1))


def _loss(model, batch, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.loss(batch, 5)


@pytest.fixture(scope="module")
def data_split(screen):
    from sams_core.data.screen import from_anndata
    from sams_core.data.splits import make_split

    data = from_anndata(screen[0])
    return data, make_split(data, "heldout-combos", fraction=0.34, seed=0)


def test_default_schedule_ends_on_the_untempered_elbo():
    m = _model()
    assert m.hparams["global_weight"] == 1.0
    for epoch in range(1, 21):
        m.end_epoch(epoch, 20)
    assert m.aligned and m.schedule_phase == "final" and m.current_global_weight == 1.0
    out = _loss(m, _batch())
    torch.testing.assert_close(out.loss, out.terms["neg_elbo"])
    assert label("sams_vae", m.hparams) == "SAMS-VAE (mean-field)"


def test_a_temporary_weight_ends_before_the_final_phase():
    m = _model(sparsify_weight=15.0, sparsify_for=0.25)
    seen = []
    for epoch in range(1, 21):
        m.end_epoch(epoch, 20)
        seen.append((m.schedule_phase, m.current_global_weight))
    assert seen[3] == ("warmup", 1.0) and seen[4] == ("sparsify", 15.0) and seen[-1] == ("final", 1.0)
    assert [p for p, _ in seen].index("final") == 9  # aligned after 5 epochs, 5 at weight 15
    out = _loss(m, _batch())
    torch.testing.assert_close(out.loss, out.terms["neg_elbo"])


def test_the_sparsify_weight_on_the_masks_alone_leaves_the_embedding_terms_untempered():
    """With ``sparsify_terms="masks"`` the sparsify phase weights only the masks' prior terms: the
    gap between the trained objective and the ELBO does not move with the embeddings, while with
    every term weighted it does."""
    gaps = {}
    for terms in ("all", "masks"):
        m = _model(sparsify_weight=15.0, sparsify_terms=terms)
        m.end_epoch(5, 20)  # aligned: the sparsify phase
        assert m.schedule_phase == "sparsify"
        gap = []
        for shift in (0.0, 3.0):
            with torch.no_grad():
                m.e_mean.add_(shift)
            out = _loss(m, _batch())
            gap.append(float(out.loss - out.terms["neg_elbo"]))
        gaps[terms] = gap
    assert gaps["masks"][0] == pytest.approx(gaps["masks"][1], rel=1e-5)
    assert abs(gaps["all"][1] - gaps["all"][0]) > 1.0
    assert gaps["masks"][0] != pytest.approx(0.0, abs=1e-6)  # the masks' terms are weighted
    with pytest.raises(Exception, match="sparsify_terms"):
        _model(sparsify_terms="embeddings")


def test_a_tempered_posterior_says_so():
    m = _model(global_weight=15.0, align_at=None)
    out = _loss(m, _batch())
    assert not torch.allclose(out.loss, out.terms["neg_elbo"])
    assert label("sams_vae", m.hparams) == "SAMS-VAE (mean-field, tempered ×15)"
    assert label("svae_plus", {}) == "sVAE+"
    assert label("svae_plus", {"beta": 60.0, "align_at": 0.25}) == "sVAE+ (β=60, aligned at 0.25)"


@pytest.mark.parametrize("weights", [(1.0, 15.0), (1.0, 0.0)])
def test_iwelbo_does_not_depend_on_the_prior_weight(weights):
    a, b = (_model(global_weight=w, align_at=None) for w in weights)
    b.load_state_dict(a.state_dict())
    batch = _batch()
    torch.manual_seed(5)
    g = a.sample_globals(7)
    out = []
    for m in (a, b):
        torch.manual_seed(6)
        with torch.no_grad():
            out.append(m.log_weights(batch, g))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_correlated_expected_shift_averages_over_the_masks():
    """E_q[m ⊙ e] under q(E | M): the Monte-Carlo table matches the exact sum over every mask
    vector, and differs from p ⊙ E[e | m = 1]."""
    m = _model(guide="correlated")
    with torch.no_grad():
        m.mask_logits.copy_(torch.randn(12, 4, generator=torch.Generator().manual_seed(4)))
        for p in m.e_net.parameters():
            p.mul_(4.0)
        p = torch.sigmoid(m.mask_logits)
        exact = torch.zeros(12, 4)
        for bits in itertools.product([0.0, 1.0], repeat=4):
            mm = torch.tensor(bits).expand(12, 4)
            prob = torch.where(mm > 0, p, 1 - p).prod(-1, keepdim=True)
            exact += prob * mm * m._embedding_params(mm)[0]
        got = m.expected_shift_table()
        naive = p * m._embedding_params(torch.ones_like(p))[0]
    scale = exact.abs().mean()
    assert (got - exact).abs().mean() < 0.1 * scale
    assert (naive - exact).abs().mean() > 2 * (got - exact).abs().mean()
    torch.testing.assert_close(got, m.expected_shift_table())  # the same table at every call


def test_validation_counts_replace_the_training_counts_within_the_block():
    m = _model()
    before = m.pert_counts.clone()
    d = np.zeros((5, 12), dtype=np.float32)
    d[:3, 0] = 1
    d[3:, 1] = 1
    with m.charged_to(d, np.full(5, -1)):
        assert m.pert_counts[0] == 3 and m.pert_counts[1] == 2 and m.pert_counts[2] == 1
    torch.testing.assert_close(m.pert_counts, before)


def test_reloaded_bundle_reproduces_the_training_objective(tmp_path):
    from sams_core.io.bundle import load_bundle, make_manifest, save_bundle

    m = _model(sparsify_weight=15.0, sparsify_for=0.5)
    with torch.no_grad():
        m.pert_counts.copy_(torch.arange(1.0, 13.0))
    m.end_epoch(1, 4)  # aligned; now in the sparsify phase at weight 15
    assert m.schedule_phase == "sparsify" and m.current_global_weight == 15.0
    man = make_manifest(m, [f"g{i}" for i in range(20)], [f"p{i}" for i in range(12)])
    assert man["training_state"]["phase"] == "sparsify" and man["training_state"]["global_weight_in_force"] == 15.0
    assert man["training_state"]["n_t"][:3] == [1.0, 2.0, 3.0] and man["training_state"]["aligned"]
    back = load_bundle(save_bundle(tmp_path / "m.sams", m, man)).model
    assert back.schedule_phase == "sparsify" and back.current_global_weight == 15.0 and back.aligned
    batch = _batch()
    a, b = _loss(m, batch), _loss(back, batch)
    torch.testing.assert_close(a.loss, b.loss)
    m.end_epoch(3, 4)  # the schedule goes on from where the bundle says it was
    back.end_epoch(3, 4)
    assert m.schedule_phase == back.schedule_phase == "final"


def test_bundles_of_the_old_defaults_still_load():
    from pathlib import Path

    from sams_core.io.bundle import load_bundle

    paths = sorted((Path(__file__).resolve().parent.parent / "assets" / "demo").glob("*.sams"))
    if not paths:
        pytest.skip("no demo bundles shipped")
    for p in paths:
        b = load_bundle(p)
        assert b.model.schedule_phase == "final"
        if b.family == "sams_vae" and b.manifest["hparams"].get("global_weight", 1.0) != 1.0:
            assert "tempered" in b.label


def test_svae_heldout_protocol_never_scores_a_fitted_cell(screen):
    from sams_core.data.screen import from_anndata
    from sams_core.data.splits import make_split
    from sams_core.training.new_conditions import (
        score_new_conditions,
        split_new_condition_cells,
    )
    from sams_core.training.trainer import TrainConfig, train

    data = from_anndata(screen[0])
    split = make_split(data, "heldout-perturbations", heldout=["TAL1", "RUNX1"], seed=0)
    test = np.flatnonzero(split == "test")
    fit, score = split_new_condition_cells(data, test, seed=0)
    assert not set(fit) & set(score) and set(fit) | set(score) == set(test)
    for lab in set(data.labels[test]):
        n_fit, n_score = (data.labels[fit] == lab).sum(), (data.labels[score] == lab).sum()
        assert n_fit > 0 and abs(n_fit - n_score) <= 1
    model, _ = train(data, "svae_plus", split, TrainConfig(epochs=2, batch_size=256), n_latent=4, n_hidden=16)
    out = score_new_conditions(model, data, test, TrainConfig(epochs=2, lr=3e-2, batch_size=256, global_lr_scale=1.0),
                               n_samples=5, seed=0)
    assert not set(out.fit_cells) & set(out.score_cells)
    # the fit saw only its half: the new conditions' cell counts are those of the fitting cells
    A = model.n_conditions
    new_counts = out.model.cond_counts[A:].tolist()
    assert sorted(new_counts) == sorted(float((data.labels[out.fit_cells] == c).sum()) for c in set(data.labels[test]))
    assert np.isfinite(out.iwelbo_prior) and np.isfinite(out.iwelbo_fitted)


def test_training_keeps_the_final_phase_and_says_when_an_earlier_state_was_better(data_split):
    """A schedule whose last phase starts from a damaged model: the kept state is of that phase,
    and the run says which better state of the earlier phase it did not keep."""
    from sams_core.training.build import build_for_data
    from sams_core.training.trainer import TrainConfig, fit

    data, split = data_split
    torch.manual_seed(0)
    model = build_for_data("sams_vae", data, split, n_latent=4, n_hidden=16, align_at=0.5)

    def damage(mask_logit=0.0):
        with torch.no_grad():
            model.decoder[-1].weight.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(0))
        return torch.eye(4)

    model.align_units = damage
    res = fit(model, data, split, TrainConfig(epochs=4, batch_size=256))
    assert [r.phase for r in res.history] == ["warmup", "warmup", "final", "final"]
    assert res.best_phase == "final" and res.best_epoch in (3, 4)
    assert any("earlier phase 'warmup' scored better" in n for n in res.notes)
    assert model.schedule_phase == "final"


def test_validation_charges_globals_with_the_validation_counts(data_split):
    from sams_core.data.splits import VAL
    from sams_core.training.build import build_for_data
    from sams_core.training.trainer import TrainConfig, fit

    data, split = data_split
    model = build_for_data("sams_vae", data, split, n_latent=4, n_hidden=16)
    train_counts = model.pert_counts.clone()
    seen = []
    plain = model.loss

    def spy(batch, n_particles=5):
        if not model.training:
            seen.append(model.pert_counts.clone())
        return plain(batch, n_particles)

    model.loss = spy
    fit(model, data, split, TrainConfig(epochs=1, batch_size=256))
    want = torch.as_tensor(data.dosages[split == VAL].getnnz(axis=0), dtype=torch.float32).clamp_min(1.0)
    assert seen and all(torch.equal(c, want) for c in seen)
    torch.testing.assert_close(model.pert_counts, train_counts)  # training counts back after validation


def test_history_figure_plots_the_untempered_elbo_with_phases_and_the_kept_state():
    from sams_core.plots import history_figure

    recs = [
        {"epoch": 1, "train_loss": 10.0, "term_neg_elbo": 9.0, "val_loss": 9.5, "phase": "warmup"},
        {"epoch": 2, "train_loss": 30.0, "term_neg_elbo": 8.0, "val_loss": 8.5, "phase": "sparsify"},
        {"epoch": 3, "train_loss": 7.0, "term_neg_elbo": 7.0, "val_loss": 7.5, "phase": "final"},
    ]
    fig = history_figure(recs, kept_epoch=3)
    train = next(t for t in fig.data if t.name == "train")
    assert list(train.y) == [9.0, 8.0, 7.0]  # the −ELBO, not the weighted loss of the sparsify phase
    assert [a.text for a in fig.layout.annotations if a.text in ("sparsify", "final")] == ["sparsify", "final"]
    kept = next(t for t in fig.data if t.name == "kept state")
    assert list(kept.x) == [3] and list(kept.y) == [7.5]
    old = history_figure([{"epoch": 1, "train_loss": 5.0, "val_loss": 6.0}])  # a history from before the term
    assert list(next(t for t in old.data if t.name == "train").y) == [5.0]
