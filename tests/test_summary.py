"""Screen summary for the home page: right counts, cached on disk, clear errors; metrics tables."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sams_core.data.screen import read_h5ad
from sams_core.errors import SamsError
from sams_core.io.manifest import csv_text, markdown_table, metrics_table, read_manifest
from sams_core.data.summary import screen_summary

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo"


def test_summary_matches_loaded_screen_and_is_cached(tmp_path, monkeypatch):
    h5ad = tmp_path / "screen.h5ad"
    shutil.copy(DEMO / "screen.h5ad", h5ad)
    first = screen_summary(h5ad, cache_dir=tmp_path / "cache")
    data = read_h5ad(h5ad)
    assert (first.cells, first.genes, first.perturbations) == (data.n_cells, data.n_genes, data.n_perturbations)
    assert first.combinations == len(data.combinations()) and first.control_cells == int(data.control_mask.sum())
    assert first.simulated
    assert first.covariates == data.covariates == {"batch": ["batch1", "batch2"]}
    import anndata

    def no_read(*a, **k):
        raise AssertionError("the cached summary must not open the file again")

    monkeypatch.setattr(anndata, "read_h5ad", no_read)
    assert screen_summary(h5ad, cache_dir=tmp_path / "cache") == first


def test_summary_errors(tmp_path):
    with pytest.raises(SamsError, match="No data file"):
        screen_summary(tmp_path / "missing.h5ad", cache_dir=tmp_path)
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(SamsError, match="as an .h5ad file"):
        screen_summary(bad, cache_dir=tmp_path)


def test_metrics_table_markdown_and_csv():
    manifest = {"metrics": {"train": {"ate_r": 0.123456, "iwelbo": -300.0}, "test": {"ate_r": 0.5}}}
    rows = metrics_table(manifest)
    assert rows == [["metric", "train", "test"], ["ate_r", "0.1235", "0.5"], ["iwelbo", "-300", ""]]
    md = markdown_table(rows).splitlines()
    assert md[0] == "| metric | train | test |" and md[1] == "|---|---|---|" and len(md) == 4
    assert csv_text(metrics_table(manifest, digits=None)).splitlines()[1] == "ate_r,0.123456,0.5"
    assert metrics_table({}) == [["metric"]]
    demo = metrics_table(read_manifest(DEMO / "sams_vae_mean_field.sams"))
    assert demo[0] == ["metric", "train", "test"] and any(r[0] == "iwelbo" for r in demo)
