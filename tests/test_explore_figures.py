"""The latent-space, differential-expression and perturbation-map figures, and the functions
behind them, on small data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sams_core import plots
from sams_core.data.screen import from_anndata
from sams_core.errors import SamsError
from sams_core.interpret.differential import condition_clusters, observed_de, perturbation_map


def test_umap_values_colours_cells_by_their_value_highest_on_top():
    xy = np.array([[0, 0], [1, 1], [2, 2]], float)
    fig = plots.umap_values(xy, np.array([3.0, 1.0, 2.0]), hover=["a", "b", "c"], value_label="GATA1")
    tr = fig.data[0]
    assert list(tr.marker.color) == [1.0, 2.0, 3.0] and list(tr.text) == ["b", "c", "a"]
    eff = plots.umap_values(xy, np.array([-4.0, 1.0, 2.0]), diverging=True)
    assert eff.data[0].marker.cmin == -4 and eff.data[0].marker.cmax == 4
    with pytest.raises(SamsError):
        plots.umap_values(xy, np.zeros(2))


def test_highlight_draws_the_perturbations_cells_on_top():
    xy = np.arange(10, dtype=float).reshape(5, 2)
    fig = plots.umap_highlight(xy, np.array([0, 1, 0, 1, 0], bool), "KLF1")
    assert [len(t.x) for t in fig.data] == [3, 2] and fig.data[1].name.startswith("KLF1 (2)")


def test_box_selection_gives_the_cells_and_their_composition():
    xy = np.array([[0, 0], [1, 1], [1, 1], [5, 5]], float)
    picked = plots.selected_cells(xy, [{"x": 1.0, "y": 1.0, "point_index": 0}, {"x": 5.0, "y": 5.0}])
    assert picked.tolist() == [1, 2, 3]
    assert plots.selected_cells(xy, []).size == 0
    comp = plots.composition_table({"perturbation": ["c", "A", "A", "B"], "cell_type": ["x", "y", "y", "y"]}, picked)
    a = comp[(comp.by == "perturbation") & (comp.value == "A")].iloc[0]
    assert a.cells == 2 and a.share == pytest.approx(2 / 3) and a.share_all_cells == pytest.approx(0.5)
    assert comp[comp.by == "cell_type"].share.tolist() == [1.0]
    fig = plots.composition_bars(comp)
    assert len(fig.data) == 4  # selected and all cells, per grouping


def test_observed_de_finds_the_genes_a_perturbation_moves(screen):
    data = from_anndata(screen[0])
    de = observed_de(data, "KLF1", method="t-test")
    assert list(de.columns) == ["gene", "logfoldchange", "score", "pval", "pval_adj"]
    assert de.pval_adj.iloc[0] < 1e-5 and de.pval_adj.is_monotonic_increasing
    pair = observed_de(data, "GATA1+KLF1", method="t-test")
    assert set(pair.gene) == set(data.genes)
    with pytest.raises(SamsError, match="cells"):
        observed_de(data, "NOT_A_PERTURBATION")
    fig = plots.de_volcano(de, title="KLF1")
    assert sum(len(t.x) for t in fig.data) == data.n_genes
    assert "e}" in fig.data[0].hovertemplate  # p-values in scientific notation


def test_perturbation_map_keeps_near_perturbations_near_and_clusters_them():
    pts = np.array([[0, 0], [0.1, 0], [5, 5], [5.1, 5]], float)
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    names = ["A", "B", "C", "D"]
    m = perturbation_map(pd.DataFrame(d, index=names, columns=names), n_clusters=2)
    xy = m[["x", "y"]].to_numpy()
    assert np.allclose(np.linalg.norm(xy[:, None] - xy[None], axis=-1), d, atol=1e-6)
    assert m.cluster[0] == m.cluster[1] != m.cluster[2] == m.cluster[3]
    fig = plots.perturbation_map(m)
    assert len(fig.data) == 2 and set(fig.data[0].text) | set(fig.data[1].text) == set(names)
    with pytest.raises(SamsError):
        perturbation_map(pd.DataFrame(d[:3], index=names[:3], columns=names))


def test_cells_are_grouped_by_their_conditions_cluster():
    """Colouring a UMAP by perturbation cluster: a single takes its cluster, a pair within one
    cluster (with or without doses) that cluster, a pair across clusters and controls their own group."""
    table = pd.DataFrame({"perturbation": ["A", "B", "C"], "x": 0.0, "y": 0.0, "cluster": [1, 1, 2]})
    labels = np.array(["A", "control", "A+B", "A+C", "C", "B:0.5+A", "Z"])
    got = condition_clusters(labels, table)
    assert list(got) == ["cluster 1", "control", "cluster 1", "combination across clusters", "cluster 2", "cluster 1",
                         "not in the map"]


def test_mask_distances_match_the_pairwise_definition():
    from sams_core.interpret.effects import _mask_distances

    p = np.random.default_rng(0).random((7, 5))
    want = np.array([[1 - np.minimum(u, v).sum() / np.maximum(u, v).sum() for v in p] for u in p])
    np.fill_diagonal(want, 0.0)
    np.testing.assert_allclose(_mask_distances(p, block=3), want, atol=1e-12)


def test_webgl_scatter_exports_as_the_same_svg_scatter():
    fig = plots.umap_values(np.array([[0, 0], [1, 1]], float), np.array([1.0, 2.0]))
    assert fig.data[0].type == "scattergl"
    static = plots._static(fig)
    assert static.data[0].type == "scatter" and list(static.data[0].x) == list(fig.data[0].x)
    assert fig.data[0].type == "scattergl"  # the shown figure is left as it was


def test_gene_set_labels_show_the_id_once():
    assert plots.set_label("GO:0000002", "GO:0000002 mitochondrial genome maintenance") == "GO:0000002 mitochondrial genome maintenance"
    assert plots.set_label("HALLMARK_E2F", "targets of E2F") == "HALLMARK_E2F targets of E2F"
    assert plots.set_label("P1", "P1") == "P1"
    t = pd.DataFrame({"set": ["GO:1", "GO:2"], "description": ["GO:1 apoptosis", "GO:2 growth"], "unit": [0, 0], "q": [0.01, 0.5]})
    assert list(plots.enrichment_heatmap(t).data[0].y) == ["GO:1 apoptosis", "GO:2 growth"]


def test_observed_de_on_log_normalised_data_reports_the_mean_difference(screen):
    a = screen[0].copy()
    x = np.asarray(a.X.todense(), dtype=np.float32)
    a.X = np.log1p(1e4 * x / x.sum(1, keepdims=True))
    data = from_anndata(a)
    assert not data.is_counts
    de = observed_de(data, "KLF1", method="t-test").set_index("gene")
    lab = np.asarray(data.labels).astype(str)
    g = de.index[0]
    j = list(data.genes).index(g)
    expect = (a.X[lab == "KLF1", j].mean() - a.X[lab == "control", j].mean()) / np.log(2)
    assert de.loc[g, "logfoldchange"] == pytest.approx(expect, rel=1e-4)
    assert np.abs(de["logfoldchange"]).max() < 10  # no log of a non-positive mean


def test_observed_de_compares_with_controls_of_the_same_cell_type():
    """Controls of another cell type differ in their own genes: comparing a perturbation with
    them would report the cell-type difference as an effect."""
    import anndata as ad

    rng = np.random.default_rng(0)
    n, g = 240, 30
    x = rng.normal(0.0, 0.3, size=(n, g)).astype(np.float32)
    cell_type = np.array(["k562"] * 120 + ["u87"] * 120)
    cond = np.array((["control"] * 60 + ["KLF1"] * 60) + ["control"] * 120)
    x[cell_type == "u87", :5] += 3.0   # the other line's own genes
    x[cond == "KLF1", 10] += 2.0       # the perturbation's gene
    a = ad.AnnData(x, obs=pd.DataFrame({"condition": cond, "cell_type": cell_type}, index=[f"c{i}" for i in range(n)]))
    a.var_names = [f"G{i}" for i in range(g)]
    data = from_anndata(a)
    de = observed_de(data, "KLF1", method="t-test").set_index("gene")
    assert de.attrs["n_controls"] == 60 and "k562" in de.attrs["controls"]
    assert de.loc["G10", "pval_adj"] < 1e-6
    assert (de.loc[[f"G{i}" for i in range(5)], "pval_adj"] > 0.01).all()
    with pytest.raises(SamsError, match="not a level"):
        observed_de(data, "KLF1", level="hela")
