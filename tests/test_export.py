"""Export: the screen with everything a model learned, as one .h5ad, from the command line."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from sams_core.cli import main

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "screen.h5ad").exists(), reason="demo not built")


def test_export_writes_latents_umap_masks_and_embeddings(tmp_path, capsys):
    out = tmp_path / "annotated.h5ad"
    before = (DEMO / "screen.h5ad").read_bytes()
    assert main(["export", str(DEMO / "sams_vae_correlated.sams"), str(DEMO / "screen.h5ad"), "--out", str(out)]) == 0
    a = ad.read_h5ad(out)
    src = ad.read_h5ad(DEMO / "screen.h5ad")
    assert a.n_obs == src.n_obs and a.obsm["X_sams"].shape[1] == a.uns["sams"]["n_latent"]
    assert a.obsm["X_sams_umap"].shape == (a.n_obs, 2) and np.isfinite(a.obsm["X_umap"]).all()
    assert a.uns["sams"]["mask_probs"].shape == (len(a.uns["sams"]["mask_rows"]), a.uns["sams"]["n_latent"])
    assert "embeddings" in a.uns["sams"] and "unit_loadings" in a.uns["sams"]
    assert (DEMO / "screen.h5ad").read_bytes() == before  # the screen itself is untouched
    assert "wrote" in capsys.readouterr().err


def test_export_refuses_a_name_that_is_not_h5ad_and_keeps_an_earlier_file(tmp_path, capsys):
    bad = tmp_path / "out.csv"
    assert main(["export", str(DEMO / "cpa_vae.sams"), str(DEMO / "screen.h5ad"), "--out", str(bad), "--no-umap"]) == 2
    assert ".h5ad" in capsys.readouterr().err and not bad.exists()
    keep = tmp_path / "keep.h5ad"
    keep.write_bytes(b"earlier")
    assert main(["export", str(DEMO / "cpa_vae.sams"), str(tmp_path / "missing.h5ad"), "--out", str(keep)]) == 2
    assert keep.read_bytes() == b"earlier"


def test_the_dashboards_export_is_the_same_file_as_the_command_lines(tmp_path):
    from explorer import state as S

    data_src = (str(DEMO / "screen.h5ad"), None)
    models = {"cpa_vae": (str(DEMO / "cpa_vae.sams"), None)}
    sel = S.Selection("demo", data_src, "demo", models, "cpa_vae")
    a = ad.read_h5ad(__import__("io").BytesIO(S.export_h5ad_bytes(sel, umap=False)))
    assert a.obsm["X_sams"].shape[0] == a.n_obs and "X_sams_umap" not in a.obsm
    assert a.uns["sams"]["family"] == "cpa_vae"
