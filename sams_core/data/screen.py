"""Perturbation screens as the models see them: the data contract of DESIGN §4.

A :class:`PerturbationData` is one screen: a cells × genes matrix (counts, or log-normalised
values when no counts exist), each cell's dosage row over the single perturbations (all zero for
controls, several ones for combinations), observed library sizes and carried covariates. It is
built from an ``.h5ad`` file or an in-memory AnnData with :func:`read_h5ad` / :func:`from_anndata`,
and split into train / validation / test cells with :func:`make_split`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sams_core.errors import SamsError

PERTURBATION_KEYS: tuple[str, ...] = (
    "perturbation",
    "condition",
    "guide_identity",
    "gene",
    "perturbation_name",
)


CONTROL_LABELS: frozenset[str] = frozenset(
    s.lower()
    for s in (
        "control",
        "ctrl",
        "non-targeting",
        "nontargeting",
        "non_targeting",
        "NT",
        "DMSO",
        "unperturbed",
        "",
    )
)


@dataclass
class PerturbationData:
    """One perturbation screen, ready for the models.

    ``X`` holds counts (``is_counts``) or log-normalised values, dense or CSR sparse, float32;
    ``dosages[i, t]`` is the dose of single perturbation ``perturbations[t]`` in cell i;
    ``labels[i]`` is the cell's condition as a canonical string ("control", "A", "A+B").
    """

    X: np.ndarray | sp.csr_matrix
    is_counts: bool
    library: np.ndarray
    dosages: np.ndarray
    labels: np.ndarray
    perturbations: list[str]
    genes: list[str]
    obs: pd.DataFrame
    settings: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_perturbations(self) -> int:
        return len(self.perturbations)

    @property
    def likelihood(self) -> str:
        """The likelihood the data calls for: negative binomial on counts, else Gaussian."""
        return "nb" if self.is_counts else "gaussian"

    @property
    def control_mask(self) -> np.ndarray:
        """Boolean vector of control cells (all-zero dosage row)."""
        return ~np.any(self.dosages != 0, axis=1)

    @property
    def n_members(self) -> np.ndarray:
        """Number of single perturbations each cell received."""
        return np.count_nonzero(self.dosages, axis=1)

    def conditions(self) -> pd.DataFrame:
        """One row per distinct condition: label, number of members, cell count."""
        labels, counts = np.unique(self.labels, return_counts=True)
        n_members = [0 if lab == "control" else len(lab.split("+")) for lab in labels]
        return pd.DataFrame({"label": labels, "n_members": n_members, "n_cells": counts})

    def combinations(self) -> list[str]:
        """Labels of the conditions with two or more members."""
        c = self.conditions()
        return c.loc[c.n_members >= 2, "label"].tolist()

    def dosage_row(self, label: str) -> np.ndarray:
        """The dosage row of a condition label such as "A+B" (controls: all zero)."""
        return dosage_rows([label], self.perturbations)[0]

    def subset(self, idx: np.ndarray) -> "PerturbationData":
        """The cells at ``idx`` (integer positions or a boolean mask), sharing gene metadata."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return PerturbationData(
            X=self.X[idx],
            is_counts=self.is_counts,
            library=self.library[idx],
            dosages=self.dosages[idx],
            labels=self.labels[idx],
            perturbations=list(self.perturbations),
            genes=list(self.genes),
            obs=self.obs.iloc[idx],
            settings=dict(self.settings),
        )

    def dense(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Expression of the cells at ``idx`` (all when None) as a dense float32 array."""
        m = self.X if idx is None else self.X[idx]
        if sp.issparse(m):
            m = m.toarray()
        return np.asarray(m, dtype=np.float32)

    def checksum(self) -> str:
        """A short content hash of the matrix, labels and genes (for caches)."""
        h = hashlib.sha256()
        if sp.issparse(self.X):
            for a in (self.X.data, self.X.indices, self.X.indptr):
                h.update(np.ascontiguousarray(a).tobytes())
        else:
            h.update(np.ascontiguousarray(self.X).tobytes())
        h.update("\n".join(map(str, self.labels)).encode())
        h.update("\n".join(self.genes).encode())
        return h.hexdigest()[:16]


def split_label(label: str, separators: Sequence[str] = ("+",)) -> list[str]:
    """The member perturbations of a condition label ([] for controls)."""
    s = str(label).strip()
    if s.lower() in CONTROL_LABELS:
        return []
    pattern = "|".join(re.escape(sep) for sep in separators)
    parts = [p.strip() for p in re.split(pattern, s)]
    members = [p for p in parts if p and p.lower() not in CONTROL_LABELS]
    return members


def dosage_rows(
    combos: Sequence[str | Sequence[str] | dict[str, float]], perturbations: Sequence[str]
) -> np.ndarray:
    """Dosage rows for conditions given as labels ("A+B"), member lists or {name: dose}.

    Raises :class:`SamsError` naming any perturbation the model does not know.
    """
    index = {p: i for i, p in enumerate(perturbations)}
    rows = np.zeros((len(combos), len(perturbations)), dtype=np.float32)
    for r, combo in enumerate(combos):
        if isinstance(combo, dict):
            items = list(combo.items())
        elif isinstance(combo, str):
            items = [(m, 1.0) for m in split_label(combo)]
        else:
            items = [(m, 1.0) for m in combo]
        for name, dose in items:
            if name not in index:
                raise SamsError(
                    f"Unknown perturbation {name!r}: the model knows {len(index)} perturbations "
                    f"(e.g. {', '.join(list(index)[:5])}). Pick names from the model's list."
                )
            rows[r, index[name]] += float(dose)
    return rows


def canonical_label(members: Sequence[str], perturbations: Sequence[str]) -> str:
    """The canonical label of a set of members, ordered as in ``perturbations``."""
    if not members:
        return "control"
    order = {p: i for i, p in enumerate(perturbations)}
    return "+".join(sorted(set(members), key=lambda m: order.get(m, len(order))))


def _find_perturbation_key(obs: pd.DataFrame, key: str | None) -> str:
    if key is not None:
        if key not in obs.columns:
            raise SamsError(
                f"Perturbation column {key!r} is not in obs (columns: {', '.join(map(str, obs.columns)) or 'none'}). "
                "Name the column that holds each cell's perturbation."
            )
        return key
    for k in PERTURBATION_KEYS:
        if k in obs.columns:
            return k
    raise SamsError(
        "No perturbation column found in obs: looked for "
        f"{', '.join(PERTURBATION_KEYS)} (obs has: {', '.join(map(str, obs.columns)) or 'no columns'}). "
        "Pass perturbation_key='<column>' (command line: --perturbation-key)."
    )


def _is_integer_valued(m: np.ndarray | sp.spmatrix) -> bool:
    vals = m.data if sp.issparse(m) else np.asarray(m)
    if vals.size == 0:
        return True
    sample = vals.ravel()[: 200_000]
    return bool(np.all(np.mod(sample, 1) == 0))


def _check_matrix(m: np.ndarray | sp.spmatrix, where: str) -> None:
    vals = m.data if sp.issparse(m) else np.asarray(m)
    if not np.issubdtype(vals.dtype, np.number):
        raise SamsError(f"{where} is not numeric (dtype {vals.dtype}). Store expression as numbers.")
    if np.isnan(vals).any() or np.isinf(vals).any():
        raise SamsError(
            f"{where} contains NaN or infinite values. Remove or impute them before loading "
            "(e.g. adata = adata[:, np.isfinite(adata.X.sum(0))])."
        )


def from_anndata(
    adata,
    perturbation_key: str | None = None,
    control_labels: Sequence[str] | None = None,
    separators: Sequence[str] = ("+",),
    counts_layer: str | None = None,
    n_top_genes: int | None = None,
    covariate_keys: Sequence[str] | None = None,
) -> PerturbationData:
    """Read an AnnData screen into :class:`PerturbationData` following the data contract.

    The perturbation column is ``perturbation_key`` or the first of the common names found in
    ``obs``; combinations are labels joined by ``separators``; labels in ``control_labels``
    (default: control, ctrl, non-targeting, NT, DMSO ...) are controls. Counts come from
    ``layers[counts_layer or 'counts']`` or from an integer-valued ``X``; otherwise ``X`` is
    taken as log-normalised and the data asks for a Gaussian likelihood. ``n_top_genes`` keeps
    that many highly variable genes (scanpy). Covariates (``cell_type``, ``batch`` and any in
    ``covariate_keys``) are carried in ``obs``.
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise SamsError(
            f"The data has {adata.n_obs} cells and {adata.n_vars} genes. Load a file with cells and genes."
        )
    genes = [str(g) for g in adata.var_names]
    dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique().tolist()
    if dup:
        raise SamsError(
            f"Duplicated gene names: {', '.join(map(str, dup[:5]))}{' ...' if len(dup) > 5 else ''}. "
            "Make them unique first (adata.var_names_make_unique())."
        )
    key = _find_perturbation_key(adata.obs, perturbation_key)
    raw_labels = adata.obs[key]
    if raw_labels.isna().any():
        n = int(raw_labels.isna().sum())
        raise SamsError(
            f"{n} cells have no value in obs[{key!r}] (NaN). Label them (e.g. 'control') or drop them."
        )
    controls = CONTROL_LABELS if control_labels is None else frozenset(
        s.lower() for s in control_labels
    )

    # counts or log-normalised values
    layer = counts_layer or ("counts" if "counts" in adata.layers else None)
    if counts_layer is not None and counts_layer not in adata.layers:
        raise SamsError(
            f"Layer {counts_layer!r} not found (layers: {', '.join(adata.layers.keys()) or 'none'}). "
            "Name an existing counts layer or leave it empty to use X."
        )
    if layer is not None:
        m = adata.layers[layer]
        where = f"layers[{layer!r}]"
    else:
        m = adata.X
        where = "X"
    if m is None:
        raise SamsError("The file has no expression matrix (X is empty). Store counts in X or layers['counts'].")
    if hasattr(m, "to_memory"):
        m = m.to_memory()
    if sp.issparse(m):
        m = sp.csr_matrix(m, dtype=np.float32)
    else:
        m = np.asarray(m, dtype=np.float32)
    _check_matrix(m, where)
    is_counts = _is_integer_valued(m)
    if layer is not None and not is_counts:
        raise SamsError(
            f"{where} holds non-integer values, so they are not raw counts. Store raw UMI counts there, "
            "or remove the layer to model X as log-normalised data."
        )
    vals = m.data if sp.issparse(m) else m
    if is_counts and vals.size and vals.min() < 0:
        raise SamsError(
            f"{where} has negative counts (min {vals.min():g}). Counts must be ≥ 0: load raw UMI counts."
        )

    # perturbation labels → canonical labels and dosage rows
    seps = tuple(separators)
    members_per_cell: list[list[str]] = []
    for lab in raw_labels.astype(str).tolist():
        s = lab.strip()
        if s.lower() in controls:
            members_per_cell.append([])
            continue
        pattern = "|".join(re.escape(sep) for sep in seps)
        ms = [p.strip() for p in re.split(pattern, s)]
        members_per_cell.append(sorted({p for p in ms if p and p.lower() not in controls}))
    singles = sorted({p for ms in members_per_cell for p in ms})
    if not singles:
        raise SamsError(
            f"obs[{key!r}] has only control cells: no perturbations to model. Check the column."
        )
    n_control = sum(1 for ms in members_per_cell if not ms)
    if n_control == 0:
        raise SamsError(
            f"No control cells in obs[{key!r}] (labels seen: {', '.join(map(str, pd.unique(raw_labels)[:6]))}). "
            "Controls are labelled control / ctrl / non-targeting / NT / DMSO; "
            "pass control_labels=[...] (command line: --control-label) for other names."
        )
    if hasattr(raw_labels, "cat"):
        unused = [c for c in raw_labels.cat.categories if c not in set(raw_labels.astype(str))]
        if unused:
            raise SamsError(
                f"Perturbation(s) {', '.join(map(str, unused[:5]))} are listed in obs[{key!r}] but have no cells. "
                f"Drop unused categories first (adata.obs[{key!r}] = adata.obs[{key!r}].cat.remove_unused_categories())."
            )
    index = {p: i for i, p in enumerate(singles)}
    dosages = np.zeros((len(members_per_cell), len(singles)), dtype=np.float32)
    for i, ms in enumerate(members_per_cell):
        for p in ms:
            dosages[i, index[p]] = 1.0
    labels = np.array([canonical_label(ms, singles) for ms in members_per_cell], dtype=object)

    if is_counts:
        library = np.asarray(m.sum(axis=1)).ravel().astype(np.float32)
        if (library <= 0).any():
            n = int((library <= 0).sum())
            raise SamsError(
                f"{n} cells have zero total counts. Filter them first (sc.pp.filter_cells(adata, min_counts=1))."
            )
    else:
        library = np.ones(m.shape[0], dtype=np.float32)

    keep_cov = ["cell_type", "batch", *(covariate_keys or [])]
    missing = [c for c in (covariate_keys or []) if c not in adata.obs.columns]
    if missing:
        raise SamsError(
            f"Covariate column(s) {', '.join(missing)} not in obs. Name existing columns."
        )
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    obs["perturbation"] = labels.astype(str)
    obs["raw_perturbation"] = raw_labels.astype(str).values
    for c in keep_cov:
        if c in adata.obs.columns:
            obs[c] = adata.obs[c].values

    data = PerturbationData(
        X=m,
        is_counts=is_counts,
        library=library,
        dosages=dosages,
        labels=labels,
        perturbations=singles,
        genes=genes,
        obs=obs,
        settings={
            "perturbation_key": key,
            "separators": list(seps),
            "control_labels": sorted(controls),
            "counts_source": where if is_counts else None,
            "likelihood": "nb" if is_counts else "gaussian",
            "n_top_genes": n_top_genes,
        },
    )
    if n_top_genes is not None and n_top_genes < data.n_genes:
        data = select_genes(data, n_top_genes)
    return data


def select_genes(data: PerturbationData, n_top_genes: int) -> PerturbationData:
    """Keep the ``n_top_genes`` most highly variable genes (scanpy's Seurat-v3 on counts)."""
    import anndata as ad
    import scanpy as sc

    if n_top_genes <= 0:
        raise SamsError(f"n_top_genes must be positive, got {n_top_genes}.")
    a = ad.AnnData(X=data.X.copy())
    a.var_names = data.genes
    if data.is_counts:
        try:
            sc.pp.highly_variable_genes(a, n_top_genes=n_top_genes, flavor="seurat_v3")
        except ImportError:  # seurat_v3 needs scikit-misc; fall back to dispersion on log data
            sc.pp.normalize_total(a, target_sum=1e4)
            sc.pp.log1p(a)
            sc.pp.highly_variable_genes(a, n_top_genes=n_top_genes)
    else:
        sc.pp.highly_variable_genes(a, n_top_genes=n_top_genes)
    keep = np.flatnonzero(a.var["highly_variable"].to_numpy())
    X = data.X[:, keep]
    library = data.library
    if data.is_counts:
        library = np.asarray(X.sum(axis=1)).ravel().astype(np.float32)
        library = np.maximum(library, 1.0)
    return PerturbationData(
        X=X,
        is_counts=data.is_counts,
        library=library,
        dosages=data.dosages,
        labels=data.labels,
        perturbations=data.perturbations,
        genes=[data.genes[i] for i in keep],
        obs=data.obs,
        settings={**data.settings, "n_top_genes": int(n_top_genes)},
    )


def read_h5ad(path: str | Path, **kwargs) -> PerturbationData:
    """Read an ``.h5ad`` file into :class:`PerturbationData` (see :func:`from_anndata`)."""
    import anndata as ad

    p = Path(path)
    if not p.exists():
        raise SamsError(f"File not found: {p}. Check the path.")
    if p.suffix.lower() != ".h5ad":
        raise SamsError(
            f"{p.name} is not an .h5ad file. Convert it with anndata/scanpy "
            "(e.g. sc.read_10x_mtx(...).write_h5ad('screen.h5ad'))."
        )
    try:
        adata = ad.read_h5ad(p)
    except Exception as exc:  # h5py / anndata raise many types for corrupt files
        raise SamsError(
            f"Could not read {p.name} as AnnData ({type(exc).__name__}: {exc}). "
            "The file is damaged or not an .h5ad; re-export it with adata.write_h5ad()."
        ) from exc
    data = from_anndata(adata, **kwargs)
    data.settings["source"] = str(p)
    return data
