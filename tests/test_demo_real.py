"""The shipped real-screen demo (assets/demo_real): the public screen is the published file, its
licence and provenance ship with it, its bundles load on it, know its cell types and record the
conditions they never trained on. No training: the shipped files are read."""

from __future__ import annotations

import pytest

from sams_core.demo import DEFAULT_DEMO, DEMOS, LICENSE_FILE, REAL_HELDOUT_PAIRS, REAL_SHA256, file_sha256, read_provenance

REAL = DEMOS["real"]
pytestmark = pytest.mark.skipif(not REAL.data_path.exists(), reason="real demo not built (python -m sams_core build-demo --only real)")


def test_real_demo_opens_first_and_is_named():
    assert DEFAULT_DEMO == "real" and list(DEMOS)[0] == "real"
    assert REAL.label == "Real screen: Norman 2019 K562 CRISPRa + McFaline-Figueroa 2023 glioma lines, 5,961 cells"
    assert set(REAL.bundle_paths()) == set(REAL.models), "a real-demo bundle is missing: rerun build-demo --only real"


def test_shipped_screen_is_the_published_file_with_its_licence_and_provenance():
    prov = read_provenance(REAL.folder)
    assert file_sha256(REAL.data_path) == prov["sha256"] == REAL_SHA256
    assert prov["bytes"] == REAL.data_path.stat().st_size
    assert prov["origin"]["commit"] == "d357dfa"
    licence = (REAL.folder / LICENSE_FILE).read_text()
    assert "BSD 3-Clause" in licence and "Altos Labs" in licence
    readme = (REAL.folder / "README.md").read_text()
    assert REAL_SHA256 in readme and "CRISPRa" in readme and "CRISPRi" in readme
    assert prov["contents"]["cells"] == 5961
    assert prov["contents"]["cells_per_cell_type"] == {"A172": 850, "T98G": 871, "U87MG": 865, "k562": 3375}
    # the README and the record are what build-demo writes from the shipped files (not edited by hand)
    from sams_core.demo import _real_readme

    assert readme == _real_readme(prov)
    assert set(prov["shared_labels"]) >= {"MAPK1", "TGFBR2"} and "MAPK1" in prov["trap"]


def test_shipped_bundles_load_on_the_screen_with_cell_types_and_held_out_conditions():
    from sams_core.io.manifest import read_manifest
    from sams_core.pipeline import load_data_and_bundle

    prov = read_provenance(REAL.folder)
    pairs = [f"{p}@k562" for p in REAL_HELDOUT_PAIRS]
    assert set(pairs) <= set(prov["split"]["heldout_pairs"])
    assert any(p.endswith("@U87MG") for p in prov["split"]["heldout_pairs"]), "one glioma line's perturbations are held out"
    for name, path in REAL.bundle_paths().items():
        man = read_manifest(path)
        split = man["split"]
        assert sorted(f"{c}@{lv}" for c, lv in split["test_pairs"]) == sorted(prov["split"]["heldout_pairs"]), name
        assert man["data"]["checksum"] == prov["data_checksum"], f"{name} was trained on another screen"
        assert man["data"]["covariate_levels"] == {"cell_type": ["A172", "T98G", "U87MG", "k562"]}, name
        assert prov["training"]["models"][name]
    bundle, data, split = load_data_and_bundle(REAL.bundle_paths()["sams_vae"], REAL.data_path)
    assert data.n_cells == 5961 and len(bundle.genes) == data.n_genes == 500
    assert data.covariates == {"cell_type": ["A172", "T98G", "U87MG", "k562"]}
    assert bundle.covariates == data.covariates and bundle.model.n_covariates == 4
    lv = data.level_of_cells()
    test = {(str(c), str(v)) for c, v in zip(data.labels[split == "test"], lv[split == "test"])}
    assert test == {tuple(p.rsplit("@", 1)) for p in prov["split"]["heldout_pairs"]}, "the app recreates the held-out cells"
    trained = {(str(c), str(v)) for c, v in zip(data.labels[split == "train"], lv[split == "train"])}
    assert ("MAPK1", "U87MG") not in trained and ("MAPK1", "T98G") in trained
    assert "tempered" not in bundle.label, "the demo's SAMS-VAE is the paper's (untempered) model"


def test_real_demo_layouts_ship_for_the_latent_page(tmp_path):
    """Every real-demo bundle's UMAP (full and basal; every cell and the page's default 2000-cell
    subsample) opens from assets/ with nothing computed or written to the user's cache."""
    from sams_core.demo import PAGE_LAYOUT_CELLS
    from sams_core.interpret.embed import umap_embedding
    from sams_core.io.bundle import load_bundle
    from sams_core.pipeline import data_for_bundle

    for name, path in REAL.bundle_paths().items():
        bundle = load_bundle(path, device="cpu")
        data = data_for_bundle(bundle, REAL.data_path)
        for n_cells in (PAGE_LAYOUT_CELLS, data.n_cells):
            for latent in ("full", "basal"):
                emb = umap_embedding(bundle, data, latent=latent, max_cells=n_cells, cache_dir=tmp_path)
                assert emb.from_cache, f"{name} {latent} {n_cells}: rerun python -m sams_core build-demo --only real --embeddings-only"
                assert emb.coords.shape == (n_cells, 2)
    assert not list(tmp_path.iterdir())


def test_build_refuses_a_source_that_is_not_the_published_file(tmp_path):
    from sams_core.demo import REAL_SOURCE_FILE, build_real_demo
    from sams_core.errors import SamsError

    src = tmp_path / "src"
    src.mkdir()
    (src / REAL_SOURCE_FILE).write_bytes(b"not the screen")
    (src / LICENSE_FILE).write_text("BSD 3-Clause")
    out = tmp_path / "out"
    with pytest.raises(SamsError, match="SHA-256"):
        build_real_demo(out, src, epochs=1, log=None, progress=False)
    assert not out.exists(), "nothing is written from a wrong source"
    with pytest.raises(SamsError, match="not found"):
        build_real_demo(out, tmp_path / "missing", epochs=1, log=None, progress=False)
