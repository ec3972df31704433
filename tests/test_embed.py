"""UMAP of latents: subsampling, disk cache hit is fast and identical."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sams_core.data.screen import from_anndata
from sams_core.interpret.embed import subsample, umap_embedding
from sams_core.errors import SamsError
from sams_core.pipeline import SplitSpec, train_bundle
from sams_core.training.trainer import TrainConfig


def test_umap_cached_and_subsampled(screen, tmp_path):
    data = from_anndata(screen[0])
    bundle, _, _ = train_bundle(data, "cpa_vae", SplitSpec("random"), TrainConfig(epochs=2, batch_size=256), None,
                                evaluate=False, n_latent=3, n_hidden=16)
    steps = []
    first = umap_embedding(bundle, data, max_cells=400, cache_dir=tmp_path, progress=lambda m, f: steps.append(f))
    assert first.coords.shape == (400, 2) and not first.from_cache and steps[-1] == 1.0
    assert len(set(first.cells)) == 400 and first.cells.max() < data.n_cells
    t = time.perf_counter()
    second = umap_embedding(bundle, data, max_cells=400, cache_dir=tmp_path)
    assert second.from_cache and time.perf_counter() - t < 1.0
    np.testing.assert_array_equal(first.coords, second.coords)
    np.testing.assert_array_equal(first.cells, second.cells)
    other = umap_embedding(bundle, data, latent="basal", max_cells=400, cache_dir=tmp_path)
    assert not other.from_cache
    with pytest.raises(SamsError, match="basal"):
        umap_embedding(bundle, data, latent="nope", cache_dir=tmp_path)


def test_subsample_seeded():
    np.testing.assert_array_equal(subsample(10, 20), np.arange(10))
    a, b = subsample(1000, 50, seed=3), subsample(1000, 50, seed=3)
    np.testing.assert_array_equal(a, b) and len(a) == 50


def test_large_layout_path_and_compile_cache(screen, tmp_path, monkeypatch):
    """Above LARGE_EMBEDDING the layout starts from PCA on every core; compiled code is kept."""
    import sams_core.interpret.embed as embed

    data = from_anndata(screen[0])
    bundle, _, _ = train_bundle(data, "cpa_vae", SplitSpec("random"), TrainConfig(epochs=2, batch_size=256), None,
                                evaluate=False, n_latent=3, n_hidden=16)
    monkeypatch.setattr(embed, "LARGE_EMBEDDING", 300)
    emb = umap_embedding(bundle, data, max_cells=400, cache_dir=tmp_path)
    assert emb.coords.shape == (400, 2) and np.isfinite(emb.coords).all()
    import umap.umap_

    assert type(umap.umap_.smooth_knn_dist._cache).__name__ != "NullCache"


def test_demo_layouts_ship_with_the_demo(tmp_path):
    """Every demo bundle's UMAP (full and basal) opens from assets/ with nothing computed."""
    from sams_core.io.bundle import load_bundle
    from sams_core.demo import demo_paths
    from sams_core.pipeline import data_for_bundle

    data_path, bundles = demo_paths()
    assert bundles, "the demo bundles are missing"
    for name, path in bundles.items():
        bundle = load_bundle(path, device="cpu")
        data = data_for_bundle(bundle, data_path)
        for latent in ("full", "basal"):
            emb = umap_embedding(bundle, data, latent=latent, max_cells=data.n_cells + 500, cache_dir=tmp_path)
            assert emb.from_cache, f"{name} {latent}: rerun python -m sams_core build-demo --embeddings-only"
            assert emb.coords.shape == (data.n_cells, 2)
    assert not list(tmp_path.iterdir()), "nothing is written to the user's cache for shipped layouts"
