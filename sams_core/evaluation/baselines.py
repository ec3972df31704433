"""Data baselines scored beside the models: no change, additive in data, and the collapse check.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from sams_core.data.screen import PerturbationData
from sams_core.evaluation.metrics import cosine_matrix, data_ate, data_ate_by_level
from sams_core.labels import split_label


# ---------------------------------------------------------------------------------------------
# baselines from data alone
def observed_effects(data: PerturbationData, cells: np.ndarray | None = None, level: str | None = None) -> pd.DataFrame:
    """Observed effect (data ATE) of every measured condition; rows = condition labels.

    On a screen with covariates, cells are compared with the controls of their own level of the
    primary covariate (:func:`~sams_core.evaluation.metrics.data_ate`): ``level`` gives one
    level's effects, None each condition's cell-weighted mean over levels. ``attrs["notes"]``
    says where a level had no controls and all controls were used instead.
    """

    return data_ate(data, cells, level=level)


def observed_effects_by_level(data: PerturbationData, cells: np.ndarray | None = None) -> dict[str, pd.DataFrame]:
    """Observed effects per level of the primary covariate (level → table), each against the
    controls of that level (all controls, with a note, where a level has none); empty without
    covariates. Baselines per level are these tables passed to :func:`additive_baseline` and
    :func:`mean_baseline`."""
    return data_ate_by_level(data, cells)


def additive_baseline(observed: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Additive-in-data prediction of combinations: the sum of the members' observed effects.

    (Observed A + observed B − control, on the log fold-change scale.) A combination with a
    member that was never measured alone gets a row of NaN.
    """
    out = []
    for lab in labels:
        members = split_label(lab)
        if all(m in observed.index for m in members) and members:
            out.append(observed.loc[members].sum(0).to_numpy())
        else:
            out.append(np.full(observed.shape[1], np.nan))
    return pd.DataFrame(np.vstack(out) if out else np.zeros((0, observed.shape[1])), index=list(labels), columns=observed.columns)


def mean_baseline(observed: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """No-change prediction: every condition looks like control (effect 0 for every gene)."""
    return pd.DataFrame(0.0, index=list(labels), columns=observed.columns)


def diversity_check(predicted: pd.DataFrame, threshold: float = 0.95) -> dict[str, float | bool]:
    """Flags a predictor whose effects are nearly the same for every perturbation (mode collapse).

    Returns the mean pairwise cosine similarity of the predicted effect vectors and
    ``collapsed`` = that similarity ≥ ``threshold``.
    """
    p = predicted.dropna().to_numpy(dtype=np.float64)
    if p.shape[0] < 2:
        return {"mean_pairwise_cosine": float("nan"), "collapsed": False}
    c = cosine_matrix(p, p)
    off = c[~np.eye(c.shape[0], dtype=bool)]
    m = float(off.mean())
    return {"mean_pairwise_cosine": m, "collapsed": bool(m >= threshold)}
