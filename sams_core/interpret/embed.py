"""Latent embeddings for display: UMAP of cells' latents, subsampled and cached on disk.

The cache key is the bundle's weights checksum, the data checksum and the settings, so a second
request for the same view is a file read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sams_core.data.batches import DeviceData, condition_ids
from sams_core.data.screen import PerturbationData
from sams_core.errors import SamsError
from sams_core.io.bundle import ModelBundle
from sams_core.settings import SETTINGS

__all__ = ["LARGE_EMBEDDING", "Embedding", "cell_latents", "embedding_key", "subsample", "umap_embedding"]

#: Layouts that ship with the demos (``python -m sams_core build-demo`` writes them): the simulated
#: demo's and the real screen's.
SHIPPED_EMBEDDINGS = SETTINGS.demo_embeddings
SHIPPED_EMBEDDING_DIRS: tuple[Path, ...] = (SHIPPED_EMBEDDINGS, SETTINGS.demo_real_dir / "embeddings")
#: Where computed layouts are cached (the user's cache directory; ``SAMS_CACHE_DIR`` overrides).
DEFAULT_CACHE = SETTINGS.cache_dir


@dataclass
class Embedding:
    """2-D coordinates of a subset of cells (``cells`` are row positions in the data)."""

    coords: np.ndarray  # [n, 2]
    cells: np.ndarray  # [n] int
    latent: str
    from_cache: bool


@torch.no_grad()
def cell_latents(bundle: ModelBundle, data: PerturbationData, cells: np.ndarray, which: str = "full") -> np.ndarray:
    """Posterior latent means (``basal`` or ``full``) of the cells at ``cells``."""

    if which not in ("basal", "full"):
        raise SamsError(f"Latent must be 'basal' or 'full', got {which!r}.")
    model = bundle.model
    dd = DeviceData(data, np.asarray(cells), model.input_mean.device, condition_ids(model, data))
    return torch.cat([model.latent(b)[which] for b in dd.batches(4096)]).cpu().numpy()


def subsample(n_cells: int, max_cells: int, seed: int = 0) -> np.ndarray:
    """All cell positions, or a seeded sorted sample of ``max_cells`` of them."""
    if n_cells <= max_cells:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng(seed).choice(n_cells, max_cells, replace=False))


#: Above this many cells the UMAP layout runs 100 epochs instead of umap-learn's default.
LARGE_EMBEDDING = 20_000

_COMPILE_CACHE_ON = False


def warm_up_umap(seed: int = 0) -> None:
    """Compile umap-learn's functions on a tiny embedding of random points (the settings
    :func:`umap_embedding` uses for small layouts), so that the next embedding in this process
    does not pay ~20 s of compilation."""
    import umap

    keep_umap_compilation()
    z = np.random.default_rng(seed).normal(size=(300, 8)).astype(np.float32)
    umap.UMAP(n_neighbors=15, random_state=seed, n_jobs=1, init="spectral", n_epochs=20,
              force_approximation_algorithm=True).fit_transform(z)


def keep_umap_compilation() -> None:
    """Keep umap-learn's and pynndescent's compiled (numba) functions on disk between runs.

    Both packages compile most of their functions on first use in every new process (~20 s of
    a 100k-cell embedding). With numba's own on-disk cache turned on for them, only the first
    embedding after installation pays for it; a few functions that numba cannot cache are
    still compiled each time. The cache lives where numba puts it (``NUMBA_CACHE_DIR`` when
    set, else beside the packages' sources or in the user's cache directory).
    """
    global _COMPILE_CACHE_ON
    if _COMPILE_CACHE_ON:
        return
    import sys
    import warnings

    import numba
    from numba.core.dispatcher import Dispatcher

    warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=numba.NumbaWarning)
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("umap.", "pynndescent.")):
            continue
        for fn in list(vars(module).values()):
            if isinstance(fn, Dispatcher) and type(fn._cache).__name__ == "NullCache":
                fn.enable_caching()
    _COMPILE_CACHE_ON = True


def embedding_key(bundle: ModelBundle, data: PerturbationData, latent: str, n_cells: int, seed: int,
                  n_neighbors: int, min_dist: float) -> str:
    """The name under which a layout is cached: model weights, data, and every setting."""
    return hashlib.sha256(json.dumps(
        [bundle.checksum(), data.checksum(), latent, int(n_cells), int(seed), int(n_neighbors), float(min_dist)]
    ).encode()).hexdigest()[:24]


def umap_embedding(
    bundle: ModelBundle,
    data: PerturbationData,
    latent: str = "full",
    max_cells: int = 20000,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.3,
    shipped_dirs: Sequence[str | Path] = SHIPPED_EMBEDDING_DIRS,
    cache_dir: str | Path | None = DEFAULT_CACHE,
    progress: Callable[[str, float], None] | None = None,
) -> Embedding:
    """UMAP (umap-learn) of cells' latents, cached on disk by bundle, data and settings.

    Above ``max_cells`` a seeded subsample is embedded. Up to ``LARGE_EMBEDDING`` cells the
    layout is seeded (identical on every run); above, it runs in parallel with fewer epochs and
    is not seeded, so a recomputed layout may differ while the cached one is reused.
    Layouts are looked up in ``cache_dir`` and then in ``shipped_dirs`` (read-only: the demo's
    layouts ship with it) before anything is computed; new ones are written to ``cache_dir``.
    ``progress(message, fraction)`` is told about the slow steps.
    """
    cells = subsample(data.n_cells, max_cells, seed)
    name = f"umap_{embedding_key(bundle, data, latent, len(cells), seed, n_neighbors, min_dist)}.npz"
    path = Path(cache_dir) / name if cache_dir is not None else None
    for found in ([path] if path is not None else []) + [Path(d) / name for d in shipped_dirs]:
        if found.exists():
            with np.load(found, allow_pickle=False) as f:
                return Embedding(f["coords"], f["cells"], latent, True)
    if progress:
        progress("computing latents", 0.1)
    z = cell_latents(bundle, data, cells, latent)
    if progress:
        progress("running UMAP (the first run after installation compiles it: ~30 s more)", 0.3)
    import umap

    keep_umap_compilation()
    # Up to LARGE_EMBEDDING cells: umap-learn's defaults, seeded (the same layout every time).
    # Above: PCA start, 100 layout epochs on every core, unseeded (umap-learn runs seeded
    # layouts on one thread); the spectral start alone takes ~9 s at 100k cells, and the disk
    # cache keeps the layout stable between requests.
    # Neighbours by NN-descent at every size: below 4,096 cells umap-learn otherwise computes all
    # pairwise distances through a Python-level callback (8 s of a 10 s embedding of 2,000 cells).
    large = len(cells) > LARGE_EMBEDDING
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, random_state=None if large else seed,
                        n_epochs=100 if large else None, n_jobs=-1 if large else 1,
                        init="pca" if large else "spectral", force_approximation_algorithm=True)
    coords = reducer.fit_transform(z).astype(np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial.npz")
        np.savez_compressed(tmp, coords=coords, cells=cells)
        tmp.replace(path)
    if progress:
        progress("done", 1.0)
    return Embedding(coords, cells, latent, False)
