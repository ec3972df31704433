"""What the data says without a model: observed differential expression of a perturbation
against its controls (scanpy's ``rank_genes_groups``), and a map of perturbations by the latent
shifts a model learned for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from sams_core.data.screen import PerturbationData
from sams_core.errors import SamsError
from sams_core.labels import parse_label

__all__ = ["condition_clusters", "observed_de", "perturbation_map"]


def observed_de(
    data: PerturbationData,
    condition: str,
    method: str = "wilcoxon",
    max_cells: int = 2000,
    seed: int = 0,
    level: str | None = None,
) -> pd.DataFrame:
    """Differential expression of the cells of ``condition`` (a canonical label such as "KLF1" or
    "KLF1+GATA1") against the control cells, with scanpy's ``rank_genes_groups`` on
    library-normalised log1p expression (counts) or the data as given (Gaussian data).

    On a screen with covariates (e.g. cell types) the perturbed cells are compared with the
    controls *of their own levels* of the primary covariate, so a cell-type difference is not
    reported as an effect; ``level`` restricts both groups to one level. ``attrs["controls"]``
    says which controls were used.

    Returns one row per gene, most significant first: ``gene``, ``logfoldchange`` (log2; for
    data not given as counts, the difference of the group means divided by ln 2, i.e. log2 units
    when the data is natural-log expression),
    ``score``, ``pval``, ``pval_adj`` (Benjamini-Hochberg). At most ``max_cells`` cells of each
    group are used (a fixed random subsample).
    """
    import anndata as ad
    import scanpy as sc

    labels = np.asarray(data.labels).astype(str)
    cells = np.flatnonzero(labels == condition)
    ctrl = np.flatnonzero(data.control_mask)
    where = ""
    if data.primary_covariate is not None:
        cell_levels = data.level_of_cells()
        if level is not None:
            if level not in data.levels:
                raise SamsError(f"{level!r} is not a level of {data.primary_covariate!r}; the levels are {', '.join(data.levels)}.")
            cells = cells[cell_levels[cells] == level]
            where = f" in {data.primary_covariate} {level}"
        used = sorted(set(cell_levels[cells]))
        ctrl = ctrl[np.isin(cell_levels[ctrl], used)]
        controls_note = f"controls of {data.primary_covariate} {', '.join(used)}" if used else "controls"
    else:
        controls_note = "all controls"
    if cells.size < 2:
        raise SamsError(f"{condition!r} has {cells.size} cells{where} in this screen: at least 2 are needed. Choose a measured perturbation.")
    if ctrl.size < 2:
        raise SamsError(f"Fewer than 2 control cells match {condition!r}'s cells ({controls_note}): differential expression needs controls. Check the control labels.")
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(cells, max_cells, replace=False)) if cells.size > max_cells else cells
    ctrl = np.sort(rng.choice(ctrl, max_cells, replace=False)) if ctrl.size > max_cells else ctrl
    idx = np.concatenate([cells, ctrl])
    x = data.dense(idx).astype(np.float32)
    if data.is_counts:
        lib = np.maximum(x.sum(1, keepdims=True), 1.0)
        x = np.log1p(1e4 * x / lib)
    a = ad.AnnData(x)
    a.var_names = list(data.genes)
    a.obs["group"] = pd.Categorical(["perturbed"] * cells.size + ["control"] * ctrl.size)
    a.uns["log1p"] = {"base": None}
    sc.tl.rank_genes_groups(a, "group", groups=["perturbed"], reference="control", method=method)
    r = sc.get.rank_genes_groups_df(a, group="perturbed")
    lfc = r["logfoldchanges"].to_numpy(dtype=float)
    if not data.is_counts:
        # scanpy's fold change assumes log1p data it can exponentiate; for data given on a log (or
        # scaled) scale, the difference of the group means, in log2 units, is what is meaningful
        diff = pd.Series((x[: cells.size].mean(0) - x[cells.size:].mean(0)) / np.log(2), index=a.var_names)
        lfc = diff.reindex(r["names"].astype(str)).to_numpy(dtype=float)
    out = pd.DataFrame({
        "gene": r["names"].astype(str).to_numpy(),
        "logfoldchange": lfc,
        "score": r["scores"].to_numpy(dtype=float),
        "pval": r["pvals"].to_numpy(dtype=float),
        "pval_adj": r["pvals_adj"].to_numpy(dtype=float),
    })
    out["_abs"] = -out["score"].abs()
    out = out.sort_values(["pval_adj", "_abs"], kind="stable").drop(columns="_abs").reset_index(drop=True)
    out.attrs.update(controls=controls_note, n_cells=int(cells.size), n_controls=int(ctrl.size))
    return out


def perturbation_map(distances: pd.DataFrame, n_clusters: int | None = None) -> pd.DataFrame:
    """Perturbations placed in 2-D by classical multidimensional scaling of their ``distances``
    (a square table, e.g. :func:`sams_core.interpret.effects.perturbation_distances` by latent
    shift) and clustered hierarchically (average linkage) into ``n_clusters`` groups (default:
    about √(n/2)). Returns columns ``perturbation``, ``x``, ``y``, ``cluster`` (1, 2, ...)."""
    d = distances.to_numpy(dtype=np.float64)
    n = d.shape[0]
    if d.shape != (n, n) or list(distances.index) != list(distances.columns):
        raise SamsError("The distances must be a square table with the same perturbations as rows and columns.")
    if n == 0:
        return pd.DataFrame(columns=["perturbation", "x", "y", "cluster"])
    d = (d + d.T) / 2
    j = np.eye(n) - 1.0 / n
    b = -0.5 * j @ (d**2) @ j
    w, v = np.linalg.eigh(b)
    top = np.argsort(w)[::-1][:2]
    xy = v[:, top] * np.sqrt(np.maximum(w[top], 0))
    if xy.shape[1] < 2:
        xy = np.hstack([xy, np.zeros((n, 2 - xy.shape[1]))])
    k = n_clusters or max(1, int(round(np.sqrt(n / 2))))
    if n >= 2:
        clusters = fcluster(linkage(squareform(d, checks=False), method="average"), t=min(k, n), criterion="maxclust")
    else:
        clusters = np.ones(1, dtype=int)
    return pd.DataFrame({"perturbation": list(map(str, distances.index)), "x": xy[:, 0], "y": xy[:, 1], "cluster": clusters.astype(int)})


def condition_clusters(labels: Sequence[str] | np.ndarray, table: pd.DataFrame) -> np.ndarray:
    """Each cell's group on a scatter coloured by perturbation cluster: ``"cluster k"`` of its
    condition in ``table`` (a :func:`perturbation_map`); a combination whose members all lie in
    one cluster gets that cluster, one across clusters ``"combination across clusters"``;
    ``"control"`` for controls and ``"not in the map"`` for conditions the map does not place."""
    where = {str(p): int(c) for p, c in zip(table["perturbation"], table["cluster"], strict=True)}
    lab = np.asarray(labels).astype(str)
    names, codes = np.unique(lab, return_inverse=True)
    groups = []
    for name in names:
        if name == "control":
            groups.append("control")
            continue
        if name in where:  # a condition mapped whole (sVAE+ maps each combination as a row of its own)
            groups.append(f"cluster {where[name]}")
            continue
        found = {where.get(m) for m in parse_label(name, known=where)}
        if None in found:
            groups.append("not in the map")
        elif len(found) == 1:
            groups.append(f"cluster {found.pop()}")
        else:
            groups.append("combination across clusters")
    return np.asarray(groups, dtype=object)[codes]

