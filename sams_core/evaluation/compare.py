"""Models and data baselines scored side by side on the same held-out conditions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from sams_core.data.screen import PerturbationData
from sams_core.data.splits import TEST
from sams_core.errors import SamsError
from sams_core.evaluation.baselines import additive_baseline, diversity_check
from sams_core.evaluation.metrics import (
    LIBRARY_SCALE,
    ate_transform,
    data_ate,
    effect_scores,
    iwelbo,
    model_ate,
    seeded,
    split_conditions,
)
from sams_core.models.base import PerturbationModel


# ---------------------------------------------------------------------------------------------
# distributional distance and one table for models and baselines
def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Energy distance between two samples of points (rows): 2E|A-B| - E|A-A'| - E|B-B'|."""
    from scipy.spatial.distance import cdist

    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(2 * cdist(a, b).mean() - cdist(a, a).mean() - cdist(b, b).mean())


def transformed_cells(data: PerturbationData, cells: np.ndarray) -> np.ndarray:
    """Expression of ``cells`` on the ATE scale (dense)."""
    return np.asarray(ate_transform(data.dense(cells).astype(np.float64), data.library[cells].astype(np.float64), data.is_counts))


@torch.no_grad()
def predicted_cells(model: PerturbationModel, d_row: np.ndarray, n: int, is_counts: bool, seed: int = 0) -> np.ndarray:
    """``n`` posterior-predictive cells of one dosage row on the ATE scale (library 1e4)."""
    device = model.input_mean.device
    with seeded(device, seed):
        g = model.sample_globals(n)
        out = model.predict(torch.as_tensor(d_row[None], device=device), g, 1)[:, 0]
        x = model.likelihood.sample(out, LIBRARY_SCALE) if is_counts else model.likelihood.sample(out, 1.0)
        return ate_transform(x, LIBRARY_SCALE, is_counts).cpu().numpy().astype(np.float64)


def compare_on_heldout(
    bundles: dict[str, "object"],
    data: PerturbationData,
    split: np.ndarray,
    n_cells: int = 300,
    n_pcs: int = 20,
    n_ate_samples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Models (``{name: ModelBundle}``) and data-only baselines scored on the held-out conditions.

    One row per model and per baseline (no change; additive-in-data sum of observed singles):
    ATE r / R² (all and top-20 DE genes), cosine and cosine rank of the effects, energy distance
    between held-out cells and predicted cells in a PCA of the data (mean over conditions),
    held-out IWELBO for the models, and the collapse flag of the diversity check.
    """
    from sklearn.decomposition import PCA

    test = np.flatnonzero(split == "test")
    conds = split_conditions(data, split, TEST)
    if not conds:
        raise SamsError("The split has no held-out conditions to compare on. Use a held-out split.")
    rng = np.random.default_rng(seed)
    observed_all = data_ate(data)
    obs = observed_all.loc[conds]
    ctrl = np.flatnonzero(data.control_mask)
    fit_cells = np.sort(rng.choice(data.n_cells, min(data.n_cells, 5000), replace=False))
    pca = PCA(n_components=min(n_pcs, data.n_genes, len(fit_cells)), random_state=seed).fit(transformed_cells(data, fit_cells))
    obs_cells = {}
    for c in conds:
        idx = test[data.labels[test] == c]
        idx = idx if idx.size <= n_cells else np.sort(rng.choice(idx, n_cells, replace=False))
        obs_cells[c] = pca.transform(transformed_cells(data, idx))
    ctrl_idx = ctrl if ctrl.size <= n_cells else np.sort(rng.choice(ctrl, n_cells, replace=False))
    ctrl_t = transformed_cells(data, ctrl_idx)

    def row(name: str, kind: str, pred: pd.DataFrame, cells_of) -> dict:
        s = effect_scores(obs, pred)
        ed = [energy_distance(obs_cells[c], cells_of(c)) for c in conds if not pred.loc[c].isna().any()]
        return {"name": name, "kind": kind, **s, "energy_distance": float(np.mean(ed)) if ed else float("nan"),
                "collapsed": bool(diversity_check(pred)["collapsed"])}

    rows = []
    zero = pd.DataFrame(0.0, index=conds, columns=data.genes)
    rows.append(row("no change", "baseline", zero, lambda c: pca.transform(ctrl_t)))
    add = additive_baseline(observed_all, conds)
    rows.append(row("additive in data", "baseline", add, lambda c: pca.transform(ctrl_t + add.loc[c].to_numpy())))
    for name, bundle in bundles.items():
        model = bundle.model
        pred = model_ate(model, conds, data.perturbations, data.is_counts, n_ate_samples, seed)
        pred.columns = data.genes

        def cells_of(c, model=model):
            return pca.transform(predicted_cells(model, data.dosage_row(c), n_cells, data.is_counts, seed))

        r = row(name, "model", pred, cells_of)
        r["iwelbo"] = float(iwelbo(model, data, test, 100, seed).mean())
        rows.append(r)
    return pd.DataFrame(rows)
