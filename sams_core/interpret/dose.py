"""Dose-response: what a model predicts one perturbation does over a range of dosages.

A SAMS-VAE (and the other composing families) scales a perturbation's latent shift by its dosage
(DESIGN §2: z = z_basal + Σ dosage · mask ⊙ embedding), so a dosage other than 1 is a
prediction beyond the measured conditions (screens measure dosage 1); the curve shows how the
predicted effect on each gene grows with it, with credible intervals from the posterior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from sams_core.errors import SamsError
from sams_core.interpret.effects import predict_effect
from sams_core.io.bundle import ModelBundle

#: Dosages of the default curve: 0 (control) to 2 (twice the measured dosage) in steps of 0.25.
DEFAULT_DOSES: tuple[float, ...] = tuple(np.round(np.linspace(0.0, 2.0, 9), 2))


@dataclass
class DoseResponse:
    """Predicted effect (log2 fold change against control) of one perturbation at each dosage.

    ``mean``, ``lower`` and ``upper`` are [dosages × genes] for the genes in ``genes``;
    ``norm`` is the length of the mean effect over every gene of the model at each dosage.
    """

    perturbation: str
    doses: np.ndarray
    genes: list[str]
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    norm: np.ndarray
    level: float
    covariate_level: str | None = None

    def table(self) -> pd.DataFrame:
        """Long table for :func:`sams_core.plots.dose_response_figure`: one row per (dosage,
        gene) with columns ``dose``, ``gene``, ``mean``, ``lower``, ``upper``."""
        d, g = len(self.doses), len(self.genes)
        return pd.DataFrame({
            "dose": np.repeat(self.doses, g),
            "gene": np.tile(np.asarray(self.genes, dtype=object), d),
            "mean": self.mean.ravel(),
            "lower": self.lower.ravel(),
            "upper": self.upper.ravel(),
        })


def dose_response(
    bundle: ModelBundle,
    perturbation: str,
    doses: Sequence[float] = DEFAULT_DOSES,
    top_k: int = 5,
    genes: Sequence[str] | None = None,
    n_globals: int = 50,
    n_per_global: int = 10,
    level: float = 0.9,
    seed: int = 0,
    covariate_level: str | None = None,
) -> DoseResponse:
    """The predicted effect of ``perturbation`` at each of ``doses``, with ``level`` credible
    intervals, on ``genes`` (default: the ``top_k`` genes it moves most at dosage 1, or at the
    largest dosage when 1 is not in the range).

    Every dosage is predicted with the same seed (the same posterior draws), so the curve's
    steps are the dosage's doing, not Monte-Carlo noise. Dosage 0 is the control: no effect.
    ``covariate_level`` predicts in one level of the primary covariate (see
    :func:`~sams_core.interpret.effects.predict_effect`). Raises :class:`SamsError` for an
    unknown perturbation or gene, a combination, or dosages that are not a range of numbers ≥ 0.
    """
    if perturbation not in bundle.perturbations:
        raise SamsError(f"{perturbation!r} is not a perturbation of this model. Pick one of its {len(bundle.perturbations)} "
                        "perturbations (a single one: a dose-response curve varies one dosage).")
    try:
        grid = np.asarray(sorted({float(x) for x in doses}), dtype=float)
    except (TypeError, ValueError) as e:
        raise SamsError(f"Dosages must be numbers, got {list(doses)!r}.") from e
    if grid.size < 2 or not np.all(np.isfinite(grid)) or grid.min() < 0:
        raise SamsError(f"Give at least two finite dosages of 0 or more (e.g. 0 to 2 in steps of 0.25), got {list(doses)!r}.")
    if top_k < 1 and genes is None:
        raise SamsError(f"Show at least one gene (top_k ≥ 1), got {top_k}.")
    n_genes = len(bundle.genes)
    mean = np.zeros((grid.size, n_genes))
    lower = np.zeros((grid.size, n_genes))
    upper = np.zeros((grid.size, n_genes))
    for i, dose in enumerate(grid):
        if dose == 0.0:
            continue  # the control: no effect, no uncertainty
        p = predict_effect(bundle, {perturbation: float(dose)}, n_globals=n_globals, n_per_global=n_per_global,
                           level=level, seed=seed, covariate_level=covariate_level)
        mean[i], lower[i], upper[i] = p.mean, p.lower, p.upper
    if genes is not None:
        pos = {g: j for j, g in enumerate(bundle.genes)}
        unknown = [g for g in genes if g not in pos]
        if unknown:
            raise SamsError(f"Genes not in the model: {', '.join(unknown[:5])}. Pick genes the model was trained on.")
        cols = np.asarray([pos[g] for g in genes], dtype=int)
    else:
        ref = int(np.argmin(np.abs(grid - 1.0))) if np.any(grid == 1.0) else grid.size - 1
        cols = np.argsort(-np.abs(mean[ref]), kind="stable")[: min(top_k, n_genes)]
    return DoseResponse(
        perturbation=perturbation,
        doses=grid,
        genes=[bundle.genes[j] for j in cols],
        mean=mean[:, cols],
        lower=lower[:, cols],
        upper=upper[:, cols],
        norm=np.linalg.norm(mean, axis=1),
        level=level,
        covariate_level=covariate_level,
    )
