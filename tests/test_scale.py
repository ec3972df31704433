"""Screens the size users have (issue 18), checked on small data: the library sizes a model is
scored with, views of hundreds of perturbations, the capped and paired pair ranking, the quick
comparison and the screen shared by every session."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sams_core import plots
from sams_core.data.screen import from_anndata, read_h5ad
from sams_core.pipeline import SplitSpec, data_for_bundle, train_bundle
from sams_core.training.trainer import TrainConfig


def _many_singles(n_perts: int = 300, per: int = 4, genes: int = 40, seed: int = 0) -> ad.AnnData:
    """A counts screen with ``n_perts`` singles named P000..., a few cells each, and controls."""
    rng = np.random.default_rng(seed)
    labels = ["control"] * 60 + [f"P{t:03d}" for t in range(n_perts) for _ in range(per)]
    x = rng.poisson(rng.gamma(2.0, 2.0, (len(labels), genes))).astype(np.float32)
    x[:, 0] += 1
    a = ad.AnnData(sp.csr_matrix(x))
    a.obs["perturbation"] = pd.Categorical(labels)
    a.obs_names = [f"c{i}" for i in range(len(labels))]
    a.var_names = [f"G{g:03d}" for g in range(genes)]
    return a


# ---- the library a model is scored with is the one it was trained with ----------------------
def test_library_for_scoring_is_the_training_library_with_top_genes(screen):
    adata = screen[0]
    trained = from_anndata(adata, n_top_genes=20)
    all_genes = from_anndata(adata)
    assert trained.n_genes == 20
    # the training library sums the kept genes only, so it differs from the all-gene total
    assert not np.allclose(trained.library, all_genes.library)
    bundle = SimpleNamespace(manifest={"data": trained.settings}, genes=trained.genes, perturbations=trained.perturbations,
                             is_counts=True, covariate_levels={})
    scored = data_for_bundle(bundle, adata)  # what the app and `evaluate` score the model on
    assert scored.genes == trained.genes
    np.testing.assert_allclose(scored.library, trained.library)
    np.testing.assert_allclose(scored.library, np.asarray(adata.X[:, [adata.var_names.get_loc(g) for g in trained.genes]].sum(1)).ravel())


def test_reading_a_screen_parses_each_label_once(tmp_path):
    """2,000 perturbations × 3 cells: read in well under the time a per-cell parse would take, and
    every cell keeps its label."""
    a = _many_singles(2000, per=3, genes=10)
    path = tmp_path / "wide.h5ad"
    a.write_h5ad(path)
    t = time.perf_counter()
    data = read_h5ad(path)
    took = time.perf_counter() - t
    assert data.n_perturbations == 2000 and list(data.labels[:61]) == ["control"] * 60 + ["P000"]
    assert (np.asarray(data.dosages.sum(1)).ravel() == (data.labels != "control")).all()
    assert took < 20, f"reading 6,060 cells of 2,000 perturbations took {took:.1f} s"


def test_wide_screen_dosages_are_sparse_and_held_sparse_on_the_device(monkeypatch):
    """2,000 singles × 3 cells: the dosage matrix is CSR with memory per cell (dense it would be
    48 MB), control_mask / n_members read its rows, and a device copy larger than the dense limit
    stays CSR while its batches are the dense rows."""
    import torch

    from sams_core.data import batches
    from sams_core.data.batches import DeviceData
    from sams_core.models.svae import SVAEPlus

    data = from_anndata(_many_singles(2000, per=3, genes=10))
    d = data.dosages
    assert isinstance(d, sp.csr_matrix) and d.dtype == np.float32 and d.has_canonical_format
    assert d.shape == (6060, 2000) and d.nnz == 6000
    held = d.data.nbytes + d.indices.nbytes + d.indptr.nbytes
    assert held <= 16 * data.n_cells, f"{held} bytes for {data.n_cells} cells"
    assert data.control_mask.sum() == 60 and (data.n_members == (data.labels != "control")).all()
    counts = data.dosages[data.n_members > 0].getnnz(axis=0)
    assert (counts == 3).all()

    # on the device: dense below the limit, a fixed-width members table above it; both gather in-graph
    idx = np.arange(data.n_cells)
    cond = np.full(data.n_cells, -1)
    small = DeviceData(data, idx, torch.device("cpu"), cond)
    assert small.gathers_on_device
    monkeypatch.setattr(batches, "DOSAGE_DENSE_LIMIT_BYTES", 1024)
    big = DeviceData(data, idx, torch.device("cpu"), cond)
    assert big.gathers_on_device and big.nbytes < small.nbytes - 40e6
    pick = torch.tensor([0, 61, 6059, 61, 3000])
    got = big.batch(pick).d
    assert got.dtype == torch.float32 and got.shape == (5, 2000)
    torch.testing.assert_close(got, torch.as_tensor(d[pick.numpy()].toarray()))
    torch.testing.assert_close(got, small.batch(pick).d)

    # sVAE+ maps each distinct row once, sparse or dense alike
    conds = sorted(set(data.labels[data.labels != "control"]))[:50]
    model = SVAEPlus(n_genes=10, n_perturbations=2000, n_conditions=len(conds))
    model.set_conditions(torch.as_tensor(np.stack([data.dosage_row(c) for c in conds])), torch.ones(len(conds)))
    ids = model.condition_ids(d)
    want = np.array([conds.index(lab) if lab in conds else -1 for lab in data.labels])
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(model.condition_ids(d[:100].toarray()), want[:100])


# ---- views of many perturbations --------------------------------------------------------------
def test_heatmap_search_and_top_rows_with_hundreds_of_perturbations():
    rng = np.random.default_rng(0)
    names = [f"P{t:03d}" for t in range(300)]
    probs = rng.random((300, 20)) * 0.4
    probs[[7, 123, 250], :5] = 0.95  # three perturbations that target five units each
    scores = plots.row_scores("targeted units", probs, None, threshold=0.5)
    top = plots.heatmap_rows(names, scores, "", top=3)
    assert sorted(top.tolist()) == [7, 123, 250]
    assert plots.heatmap_rows(names, scores, "", top=60).size == 60
    found = plots.heatmap_rows(names, scores, "p12", top=None)  # search is a case-insensitive substring
    assert [names[i] for i in found] == [f"P12{k}" for k in range(10)]
    found_top = plots.heatmap_rows(names, scores, "P12", top=1)
    assert found_top.tolist() == [123]
    assert plots.heatmap_rows(names, scores, "nothing", top=5).size == 0
    emb = rng.normal(size=(300, 20))
    size = plots.row_scores("shift size", probs, emb)
    assert plots.heatmap_rows(names, size, "", top=1)[0] == int(np.argmax(np.linalg.norm(emb * probs, axis=1)))
    # the whole matrix stays one screen-high chart, names on hover
    fig = plots.mask_heatmap(probs, names, threshold=0.5, cluster=False)
    assert fig.layout.height == 900 and fig.layout.yaxis.showticklabels is False
    small = plots.mask_heatmap(probs[top], [names[i] for i in top], threshold=0.5, cluster=False)
    assert small.layout.height < 900 and small.layout.yaxis.showticklabels is not False


def test_umap_colours_the_searched_perturbations():
    labels = np.array(["control"] * 50 + [f"P{t:03d}" for t in range(300) for _ in range(2)])
    groups = plots.colour_groups(labels, "", 30)
    assert len(set(groups) - {"other"}) == 29 and "control" in set(groups)  # most cells first
    groups = plots.colour_groups(labels, "p01", 30)
    assert set(groups) - {"other"} == {f"P01{k}" for k in range(10)}
    assert (groups[labels == "P012"] == "P012").all() and (groups[labels == "control"] == "other").all()


# ---- pair ranking and comparison on a model of many perturbations -------------------------------
@pytest.fixture(scope="module")
def wide_model():
    """A model of 40 singles trained for a few steps (the ranking's bookkeeping, not its science)."""
    a = _many_singles(40, per=8, genes=30)
    labels = list(a.obs["perturbation"].astype(str))
    pairs = ["P000+P001", "P002+P003"]
    extra = ad.AnnData(sp.csr_matrix(np.random.default_rng(1).poisson(3.0, (16, 30)).astype(np.float32) + 1))
    extra.obs["perturbation"] = [p for p in pairs for _ in range(8)]
    extra.var_names = a.var_names
    a.obs["perturbation"] = labels
    full = ad.concat([a, extra])
    full.obs_names = [f"c{i}" for i in range(full.n_obs)]
    data = from_anndata(full)
    bundle, _, _ = train_bundle(data, "sams_vae", SplitSpec(kind="heldout-combos", fraction=0.5, seed=0),
                                TrainConfig(epochs=1, max_steps=3, batch_size=128), evaluate=False, n_latent=4, n_hidden=16)
    return data, bundle


def test_pair_ranking_is_capped_refined_and_reproducible(wide_model):
    from sams_core.interpret.effects import candidate_pairs, rank_unmeasured_pairs

    data, bundle = wide_model
    measured = sorted(set(map(str, data.labels)))
    singles, n = candidate_pairs(bundle, measured)
    assert len(singles) == 40 and n == 40 * 39 // 2 - 2
    seen = []
    t = rank_unmeasured_pairs(bundle, measured, max_pairs=100, refine=10, n_globals=5, n_per_global=2,
                              progress=lambda msg, f: seen.append(f))
    assert len(t) == 100 and int(t.refined.sum()) == 10
    assert not set(t.pair) & {"P000+P001", "P002+P003"}
    assert t.refined.iloc[:10].all() and t.uncertainty.iloc[:10].gt(0).all() and t.uncertainty.iloc[10:].isna().all()
    assert list(t.rank_interaction) == list(range(1, 101))
    assert seen and seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    again = rank_unmeasured_pairs(bundle, measured, max_pairs=100, refine=10, n_globals=5, n_per_global=2)
    pd.testing.assert_frame_equal(t, again)  # the same draws every time: the order is not noise


def test_quick_comparison_subsamples_and_caches_each_model(wide_model, monkeypatch):
    from sams_core.evaluation.compare import compare_on_heldout
    from sams_core.pipeline import split_for_bundle

    data, bundle = wide_model
    split = split_for_bundle(bundle, data)
    cache: dict = {}
    kw = dict(n_cells=20, n_pcs=5, n_ate_samples=100, max_iwelbo_cells=5, n_iwelbo_samples=5, cache=cache)
    first = compare_on_heldout({"m": bundle}, data, split, **kw)
    assert len(cache) == 2 and set(first["name"]) == {"no change", "additive in data", "m"}  # the data side, the model
    from sams_core.evaluation import compare as compare_mod

    built = []
    monkeypatch.setattr(compare_mod.HeldoutCells, "build", lambda *a, **k: built.append(1))
    second = compare_on_heldout({"again": bundle}, data, split, **kw)  # same weights and data: cached rows
    assert len(cache) == 2 and not built  # neither the held-out cells nor the baselines were scored again
    a = first.set_index("name").loc["m"].drop("kind")
    b = second.set_index("name").loc["again"].drop("kind")
    pd.testing.assert_series_equal(a, b, check_names=False)
    pd.testing.assert_frame_equal(first.iloc[:2], second.iloc[:2])  # the baselines' rows


# ---- one screen per server process ------------------------------------------------------------
def test_two_sessions_share_one_screen_until_the_file_changes(tmp_path):
    from streamlit.testing.v1 import AppTest

    path = tmp_path / "s.h5ad"
    _many_singles(20, per=3, genes=10).write_h5ad(path)
    script = f"""
import streamlit as st
from explorer import state as S
st.session_state.setdefault("seen", [])
st.markdown(str(id(S._adata({str(path)!r}))))
"""
    one = AppTest.from_string(script).run()
    two = AppTest.from_string(script).run()  # a second session (its own session state)
    assert not one.exception and not two.exception
    assert one.markdown[0].value == two.markdown[0].value
    _many_singles(20, per=4, genes=10).write_h5ad(path)  # rewritten: another size and time
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    three = AppTest.from_string(script).run()
    assert three.markdown[0].value != one.markdown[0].value


def test_members_table_on_the_device_keeps_doses_and_combinations(monkeypatch):
    """Above the dense limit each cell's members and doses sit in a fixed-width table; the rows a
    batch gets are exactly the screen's dosage rows (doses, pairs, triples, controls)."""
    import scipy.sparse as sp
    import torch

    from sams_core.data import batches

    rows = np.array([[0, 0, 0, 0], [0.5, 0, 0, 0], [1, 0, 2, 0], [0, 1, 1, 1], [0, 0, 0, 0.25]], dtype=np.float32)
    monkeypatch.setattr(batches, "DOSAGE_DENSE_LIMIT_BYTES", 0)
    held = batches._DeviceDosages(sp.csr_matrix(rows), torch.device("cpu"))
    assert held.dense is None and held.members[0].shape == (5, 3)
    pick = torch.tensor([3, 0, 2, 2, 4, 1])
    torch.testing.assert_close(held.rows(pick), torch.as_tensor(rows[pick.numpy()]))
