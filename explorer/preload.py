"""The modules every page needs, imported once per server process before any page runs.

Streamlit runs each session's script on its own thread. On a freshly started server, two tabs
opened together would import pandas, torch and the library at the same moment, and one of them
could see a partially initialised module. :func:`preload` imports them under one process-wide
lock: the first session imports, the others wait for it, and later runs return at once.
PyTorch and the modules built on it are imported the same way, by :func:`preload_models`, when
the first model is loaded (the first page never waits for PyTorch). That also starts importing
umap-learn on a background thread and compiling its functions on a tiny embedding (about 18 s
and 17 s on 2 cores: numba compiles them in every new process), so that the first Latent space
visit finds it ready; the page waits for it with :func:`preload_umap`.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable

#: What every page draws with, PyTorch not included (the first page never waits for it).
MODULES: tuple[str, ...] = (
    "numpy",
    "pandas",
    "scipy.sparse",
    "h5py",
    "anndata",
    "plotly.graph_objects",
    "sams_core.labels",
    "sams_core.plots",
    "sams_core.models.registry",
    "sams_core.io.manifest",
    "sams_core.io.paths",
    "sams_core.data.contract",
    "sams_core.data.screen",
    "sams_core.data.splits",
    "sams_core.data.summary",
    "sams_core.interpret.genesets",
    "sams_core.demo",
)

#: What a page showing a model needs: PyTorch and the library built on it.
MODEL_MODULES: tuple[str, ...] = (
    "torch",
    "sams_core.io.bundle",
    "sams_core.training.trainer",
    "sams_core.evaluation.metrics",
    "sams_core.evaluation.compare",
    "sams_core.pipeline",
    "sams_core.interpret.effects",
    "sams_core.interpret.programs",
    "sams_core.interpret.embed",
)

#: What the Latent space page needs beyond :data:`MODEL_MODULES` (slow to import).
UMAP_MODULES: tuple[str, ...] = ("umap",)

_LOCK = threading.Lock()
_UMAP_LOCK = threading.Lock()  # its own lock: pages that do not need UMAP never wait for it
_DONE: set[tuple[str, ...]] = set()


def _once(modules: tuple[str, ...], lock: threading.Lock = _LOCK, then: Callable[[], None] | None = None) -> None:
    """Import ``modules`` (and run ``then``) once in this process, under ``lock``."""
    if modules in _DONE:
        return
    with lock:
        if modules in _DONE:
            return
        for name in modules:
            importlib.import_module(name)
        if then is not None:
            then()
        _DONE.add(modules)


def preload() -> None:
    """Import :data:`MODULES` once in this process (other threads wait until it is done)."""
    _once(MODULES)


def preload_models() -> None:
    """Import :data:`MODEL_MODULES` once in this process, before the first model is loaded, and
    start importing :data:`UMAP_MODULES` in the background."""
    first = MODEL_MODULES not in _DONE
    _once(MODEL_MODULES)
    if first and UMAP_MODULES not in _DONE:
        threading.Thread(target=_import_umap_quietly, name="preload-umap", daemon=True).start()


def _import_umap_quietly() -> None:
    try:
        preload_umap()
    except Exception:  # noqa: BLE001 - the page's own import says what is wrong
        pass


def preload_umap() -> None:
    """Import :data:`UMAP_MODULES` and compile umap-learn's functions on a tiny embedding, once in
    this process (waits while the background import runs): the first embedding a user asks for
    then takes seconds, not the ~20 s of compilation a first embedding costs in a new process."""
    def warm_up() -> None:
        from sams_core.interpret.embed import warm_up_umap

        warm_up_umap()

    _once(UMAP_MODULES, _UMAP_LOCK, then=warm_up)


__all__ = ["MODEL_MODULES", "MODULES", "UMAP_MODULES", "preload", "preload_models", "preload_umap"]
