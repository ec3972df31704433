"""The data contract: what loads, how it is read, and the message for every malformed input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sams_core.data.screen import from_anndata, read_h5ad
from sams_core.data.splits import make_split
from sams_core.errors import SamsError
from sams_core.labels import dosage_rows, split_label


def test_reads_counts_labels_and_dosages(screen):
    a, _ = screen
    data = from_anndata(a)
    assert data.is_counts and data.likelihood == "nb"
    assert data.perturbations == sorted(["KLF1", "GATA1", "SPI1", "CEBPA", "TAL1", "RUNX1"])
    assert data.control_mask.sum() == 300
    i = int(np.flatnonzero(data.labels == "GATA1+KLF1")[0])
    assert isinstance(data.dosages, sp.csr_matrix) and data.dosages.dtype == np.float32
    assert data.dosages[i].sum() == 2 and data.dosages[i, data.perturbations.index("KLF1")] == 1
    np.testing.assert_allclose(data.library, np.asarray(a.X.sum(1)).ravel())
    assert sp.issparse(data.X), "sparse X stays sparse"
    assert "batch" in data.obs.columns
    assert set(data.combinations()) == {"GATA1+KLF1", "CEBPA+SPI1", "RUNX1+TAL1"}


def test_detects_other_column_names_and_controls():
    a = ad.AnnData(np.ones((4, 3), dtype=np.float32))
    a.obs["condition"] = ["ctrl", "A_B", "A", "non-targeting"]
    data = from_anndata(a, separators=("_",))
    assert data.perturbations == ["A", "B"]
    assert data.control_mask.tolist() == [True, False, False, True]
    assert data.labels.tolist() == ["control", "A+B", "A", "control"]


def test_log_normalised_input_uses_gaussian():
    a = ad.AnnData(np.array([[0.5, 1.2], [0.1, 0.0], [2.2, 0.3]], dtype=np.float32))
    a.obs["perturbation"] = ["control", "A", "A"]
    data = from_anndata(a)
    assert not data.is_counts and data.likelihood == "gaussian"


def test_counts_layer_preferred(screen):
    a, _ = screen
    b = a.copy()
    b.layers["counts"] = b.X.copy()
    b.X = sp.csr_matrix(np.log1p(b.X.toarray()))
    assert from_anndata(b).is_counts


def test_highly_variable_gene_selection(screen):
    data = from_anndata(screen[0], n_top_genes=20)
    assert data.n_genes == 20 and len(data.genes) == 20


def test_dosage_rows_and_labels():
    assert split_label("A+B") == ["A", "B"] and split_label("ctrl") == []
    rows = dosage_rows(["A+B", {"B": 0.5}, "control"], ["A", "B"])
    np.testing.assert_array_equal(rows, [[1, 1], [0, 0.5], [0, 0]])
    with pytest.raises(SamsError, match="Unknown perturbation 'C'"):
        dosage_rows(["C"], ["A", "B"])


def _bad(**kw):
    x = kw.pop("x", np.ones((4, 3), dtype=np.float32))
    a = ad.AnnData(x)
    a.obs["perturbation"] = kw.pop("labels", ["control", "A", "B", "A+B"])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _bad(labels=["A", "A", "B", "A+B"]), "No control cells"),
        (lambda: _bad(x=np.array([[1, np.nan, 1]] * 4, dtype=np.float32)), "NaN"),
        (lambda: _bad(x=-np.ones((4, 3), dtype=np.float32)), "negative counts"),
        (lambda: _bad(x=sp.csr_matrix(-np.ones((4, 3), dtype=np.float32))), "negative counts"),
        (lambda: _bad(var_names=pd.Index(["g", "g", "h"])), "Duplicated gene names"),
        (lambda: _bad(labels=["control", "control", "control", "control"]), "only control cells"),
        (lambda: _bad(labels=["control", None, "A", "A"]), "no value"),
    ],
)
def test_malformed_input_names_problem(make, message):
    with pytest.raises(SamsError, match=message):
        from_anndata(make())


def test_missing_column_and_empty_category():
    a = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    a.obs["something"] = ["x", "y", "z"]
    with pytest.raises(SamsError, match="No perturbation column"):
        from_anndata(a)
    with pytest.raises(SamsError, match="not in obs"):
        from_anndata(a, perturbation_key="guide")
    a.obs["perturbation"] = pd.Categorical(["control", "A", "A"], categories=["control", "A", "B"])
    with pytest.raises(SamsError, match="have no cells"):
        from_anndata(a)


def test_wrong_file_type(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(SamsError, match="not an .h5ad"):
        read_h5ad(p)
    q = tmp_path / "broken.h5ad"
    q.write_bytes(b"not hdf5 at all")
    with pytest.raises(SamsError, match="Could not read"):
        read_h5ad(q)
    with pytest.raises(SamsError, match="File not found"):
        read_h5ad(tmp_path / "missing.h5ad")


def test_splits(screen):
    data = from_anndata(screen[0])
    s = make_split(data, "heldout-combos", fraction=0.34, seed=1)
    test_labels = set(data.labels[s == "test"])
    assert len(test_labels) == 1 and test_labels <= set(data.combinations())
    assert not (set(data.labels[s == "train"]) & test_labels), "held-out combinations never reach training"
    assert set(data.perturbations) <= set(data.labels[s == "train"]), "singles always trained"
    np.testing.assert_array_equal(s, make_split(data, "heldout-combos", fraction=0.34, seed=1))
    de = make_split(data, "data-efficiency", fraction=0.2, seed=0)
    combo = data.n_members >= 2
    assert (de[combo] == "test").mean() == pytest.approx(0.5, abs=0.02)
    assert np.isin(de[combo], ["train", "val"]).mean() == pytest.approx(0.1, abs=0.02)
    hp = make_split(data, "heldout-perturbations", fraction=0.2, seed=0)
    assert "control" not in set(data.labels[hp == "test"])
    r = make_split(data, "random", test_fraction=0.1, seed=0)
    assert (r == "test").mean() == pytest.approx(0.1, abs=0.01)
    with pytest.raises(SamsError, match="Unknown split"):
        make_split(data, "whatever")


def test_subset_of_cells_and_genes(screen):
    data = from_anndata(screen[0])
    cells = np.flatnonzero(data.labels == "GATA1+KLF1")[:5]
    sub = data.subset(cells=cells)
    assert sub.n_cells == 5 and sub.genes == data.genes and set(sub.labels) == {"GATA1+KLF1"}
    np.testing.assert_array_equal(sub.library, data.library[cells])
    assert list(sub.obs.index) == list(data.obs.index[cells])
    mask = data.control_mask
    assert data.subset(cells=mask).n_cells == int(mask.sum())
    genes = ["G003", "G001"]
    g = data.subset(genes=genes)
    assert g.genes == genes and g.n_cells == data.n_cells
    np.testing.assert_array_equal(g.dense(), data.dense()[:, [3, 1]])
    np.testing.assert_allclose(g.library, np.maximum(data.dense()[:, [3, 1]].sum(1), 1))
    assert data.subset(genes=data.genes).library is data.library, "all genes: library sizes unchanged"
    g.settings["x"] = 1
    assert "x" not in data.settings, "a derived screen's settings are its own"
    with pytest.raises(SamsError, match="not in the data"):
        data.subset(genes=["NOPE"])


def test_with_perturbations_reindexes_dosages(screen):
    data = from_anndata(screen[0])
    order = [*reversed(data.perturbations), "EXTRA"]
    r = data.with_perturbations(order)
    assert r.perturbations == order and r.dosages.shape == (data.n_cells, len(order))
    assert isinstance(r.dosages, sp.csr_matrix) and r.dosages.has_canonical_format
    np.testing.assert_array_equal(r.dosages[:, : data.n_perturbations].toarray(), data.dosages.toarray()[:, ::-1])
    assert r.dosages[:, -1].nnz == 0
    np.testing.assert_array_equal(r.n_members, data.n_members)
    with pytest.raises(SamsError, match="not in the list"):
        data.with_perturbations(data.perturbations[1:])


def test_control_mask_and_members_on_a_mixed_screen():
    """Controls (any control word), singles, pairs in either order, a triple and a member next to
    a control word: the CSR dosage matrix holds exactly each cell's members, and control_mask /
    n_members read them from the row lengths."""
    labels = ["control", "A", "B+A", "A+B", "ctrl", "C", "A+B+C", "NT", "C+ctrl", "B"]
    a = ad.AnnData(np.ones((len(labels), 3), dtype=np.float32))
    a.obs["perturbation"] = labels
    data = from_anndata(a)
    d = data.dosages
    assert isinstance(d, sp.csr_matrix) and d.dtype == np.float32 and d.has_canonical_format
    assert d.nnz == 1 + 2 + 2 + 1 + 3 + 1 + 1 and (d.data == 1).all()
    assert data.control_mask.tolist() == [True, False, False, False, True, False, False, True, False, False]
    assert data.n_members.tolist() == [0, 1, 2, 2, 0, 1, 3, 0, 1, 1] and data.n_members.dtype == np.int64
    np.testing.assert_array_equal(d.toarray(), dosage_rows(list(data.labels), data.perturbations))
    # screens on disk hold plain member names ("A:0.5" would be a perturbation named so); a dose
    # other than 1 and explicit zeros given directly are kept sparse, the zeros dropped
    dense = np.array([[0, 0, 0], [0.5, 0, 0], [0.5, 0, 1], [0, 0, 0]], dtype=np.float64)
    sub = data.subset(cells=[0, 1, 2, 4]).replace(dosages=dense)
    assert isinstance(sub.dosages, sp.csr_matrix) and sub.dosages.dtype == np.float32 and sub.dosages.nnz == 3
    assert sub.control_mask.tolist() == [True, False, False, True] and sub.n_members.tolist() == [0, 1, 2, 0]
    zeros = sp.csr_matrix((np.array([0.0, 1.0], np.float32), np.array([2, 0]), np.array([0, 1, 2, 2, 2])), shape=(4, 3))
    kept = sub.replace(dosages=zeros)
    assert kept.n_members.tolist() == [0, 1, 0, 0] and zeros.nnz == 2, "explicit zeros dropped, the caller's matrix untouched"
    # a subset and a re-indexing stay sparse
    part = data.subset(cells=data.n_members >= 2)
    assert isinstance(part.dosages, sp.csr_matrix) and part.n_members.tolist() == [2, 2, 3]
