"""Data baselines scored beside the models: no change, additive in data, and the collapse check.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from sams_core.data.screen import PerturbationData
from sams_core.evaluation.metrics import cosine_matrix, data_ate
from sams_core.labels import split_label


# ---------------------------------------------------------------------------------------------
# baselines from data alone
def observed_effects(data: PerturbationData, cells: np.ndarray | None = None) -> pd.DataFrame:
    """Observed effect (data ATE) of every measured condition; rows = condition labels."""

    return data_ate(data, cells)


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
