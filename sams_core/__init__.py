"""SAMS Explorer core: sparse-mechanism-shift models of single-cell perturbation screens."""

from __future__ import annotations

__version__ = "0.1.0"

from sams_core.errors import SamsError

__all__ = ["SamsError", "__version__"]
