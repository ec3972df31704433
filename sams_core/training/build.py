"""A model sized for a screen and ready to train: the family's checks, its data hooks and the
encoder statistics of the training cells.

What a family is and accepts comes from :mod:`sams_core.models.registry`; what it sets up from the
training cells, from its hooks (:meth:`~sams_core.models.base.PerturbationModel.data_hparams`,
:meth:`~sams_core.models.base.PerturbationModel.prepare_for_data`). Nothing here names a family.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sams_core.data.batches import covariate_matrix, input_statistics
from sams_core.data.screen import PerturbationData
from sams_core.data.splits import TRAIN
from sams_core.errors import SamsError
from sams_core.models import registry
from sams_core.models.base import PerturbationModel, cells_per_perturbation


def build_for_data(family: str, data: PerturbationData, split: np.ndarray, **hparams: Any) -> PerturbationModel:
    """A model of ``family`` sized for ``data``, with encoder statistics from the training cells.

    Raises :class:`SamsError` for an unknown family, an option out of range, a likelihood the
    family or the data cannot take, or a split without training cells. A screen with covariates
    (``data.covariates``) gives a model that conditions on them (``covariate_sizes``); train on
    ``data.without_covariates()`` for one that does not.
    """
    spec = registry.get(family)
    caps = spec.capabilities
    train_idx = np.flatnonzero(split == TRAIN)
    if train_idx.size == 0:
        raise SamsError("The split leaves no training cells. Lower the held-out fraction.")
    hp = spec.check(hparams)
    hp.setdefault("likelihood", data.likelihood)
    if hp["likelihood"] not in caps.likelihoods:
        raise SamsError(
            f"{spec.label} does not take the {hp['likelihood']!r} likelihood. Choose one of: {', '.join(caps.likelihoods)}."
        )
    if caps.needs_counts and not data.is_counts:
        raise SamsError(f"{spec.label} needs raw counts, but this data is log-normalised. Load the screen's counts.")
    if hp["likelihood"] in ("nb", "poisson") and not data.is_counts:
        raise SamsError(
            f"The {hp['likelihood']} likelihood needs counts, but this data is log-normalised. "
            "Use likelihood='gaussian' or load raw counts."
        )
    cls = registry.model_class(family)
    hp.update(cls.data_hparams(data, train_idx))
    sizes = list(getattr(data, "covariate_sizes", []))
    if sizes:
        hp.setdefault("covariate_sizes", sizes)
    model = cls(n_genes=data.n_genes, n_perturbations=data.n_perturbations, **hp)
    mean, std = input_statistics(data, train_idx)
    counts = cells_per_perturbation(data.dosages[train_idx])
    model.set_data_stats(torch.as_tensor(mean), torch.as_tensor(std), torch.as_tensor(counts))
    if sizes:
        model.set_covariate_stats(torch.as_tensor(covariate_matrix(data, train_idx).mean(0)))
    model.prepare_for_data(data, train_idx)
    return model


__all__ = ["build_for_data"]
