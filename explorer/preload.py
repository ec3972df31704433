"""The modules every page needs, imported once per server process before any page runs.

Streamlit runs each session's script on its own thread. On a freshly started server, two tabs
opened together would import pandas, torch and the library at the same moment, and one of them
could see a partially initialised module. :func:`preload` imports them under one process-wide
lock: the first session imports, the others wait for it, and later runs return at once.
"""

from __future__ import annotations

import importlib
import threading

#: What the pages and the shared dashboard state import, heavy libraries first.
MODULES: tuple[str, ...] = (
    "numpy",
    "pandas",
    "scipy.sparse",
    "plotly.graph_objects",
    "anndata",
    "torch",
    "sams_core.plots",
    "sams_core.labels",
    "sams_core.models.registry",
    "sams_core.io.manifest",
    "sams_core.io.bundle",
    "sams_core.data.screen",
    "sams_core.data.summary",
    "sams_core.data.splits",
    "sams_core.pipeline",
    "sams_core.evaluation.compare",
    "sams_core.interpret.effects",
    "sams_core.interpret.programs",
    "sams_core.interpret.genesets",
    "sams_core.interpret.embed",
)

_LOCK = threading.Lock()
_DONE = False


def preload() -> None:
    """Import :data:`MODULES` once in this process (other threads wait until it is done)."""
    global _DONE
    if _DONE:
        return
    with _LOCK:
        if _DONE:
            return
        for name in MODULES:
            importlib.import_module(name)
        _DONE = True


__all__ = ["MODULES", "preload"]
