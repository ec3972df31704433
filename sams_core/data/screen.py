"""Perturbation screens as the models see them: the data contract of DESIGN §4.

A :class:`PerturbationData` is one screen: a cells × genes matrix (counts, or log-normalised
values when no counts exist), each cell's dosage row over the single perturbations (all zero for
controls, several ones for combinations), observed library sizes and carried covariates. It is
built from an ``.h5ad`` file or an in-memory AnnData with :func:`read_h5ad` / :func:`from_anndata`
(checks in :mod:`sams_core.data.contract`, labels read by :mod:`sams_core.labels`); a screen
restricted to some cells or genes comes from :meth:`PerturbationData.subset`, and
:mod:`sams_core.data.splits` splits it into train / validation / test cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sams_core.data import contract
from sams_core.errors import SamsError
from sams_core.labels import SEPARATORS, dosage_rows, split_label

__all__ = [
    "MAX_COVARIATE_LEVELS",
    "PerturbationData",
    "from_anndata",
    "read_anndata",
    "read_covariates",
    "read_h5ad",
    "select_genes",
]

#: An auto-detected covariate column with more levels than this (or one level) is not modelled.
MAX_COVARIATE_LEVELS = 1000

#: Cells or genes picked by position, by boolean mask, or (genes) by name.
Selection = Sequence[int] | Sequence[bool] | Sequence[str] | np.ndarray | slice


@dataclass
class PerturbationData:
    """One perturbation screen, ready for the models.

    ``X`` holds counts (``is_counts``) or log-normalised values, dense or CSR sparse, float32;
    ``dosages[i, t]`` is the dose of single perturbation ``perturbations[t]`` in cell i, held as a
    ``scipy.sparse.csr_matrix`` (float32, no explicit zeros, sorted indices: a cell's stored
    entries are its members; a dense or other sparse matrix given here is converted), so a screen
    of thousands of perturbations costs memory per member, not per cell × perturbation;
    ``labels[i]`` is the cell's condition as a canonical string ("control", "A", "A+B").

    ``covariates`` maps each modelled covariate column (cell type, batch ...) to its levels, in
    the order the models one-hot encode them; ``covariate_codes[i, j]`` is cell i's level of
    covariate j (an index into its levels). The first covariate is the *primary* one: data ATEs
    compare cells with the controls of their own level of it, and metrics are reported per level
    of it. A screen without covariates has ``covariates == {}``.
    """

    X: np.ndarray | sp.csr_matrix
    is_counts: bool
    library: np.ndarray
    dosages: sp.csr_matrix
    labels: np.ndarray
    perturbations: list[str]
    genes: list[str]
    obs: pd.DataFrame
    settings: dict = field(default_factory=dict)
    covariates: dict[str, list[str]] = field(default_factory=dict)
    covariate_codes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.dosages = contract.as_dosage_matrix(self.dosages)
        if self.covariate_codes is None:
            self.covariate_codes = np.zeros((int(self.X.shape[0]), len(self.covariates)), dtype=np.int64)

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
        """Boolean vector of control cells (all-zero dosage row): the rows without stored entries."""
        return self.n_members == 0

    @property
    def n_members(self) -> np.ndarray:
        """Number of single perturbations each cell received: its row's stored entries (int64)."""
        return np.diff(self.dosages.indptr).astype(np.int64)

    # ---- covariates -----------------------------------------------------------------------
    @property
    def covariate_keys(self) -> list[str]:
        """The modelled covariate columns, primary first (empty without covariates)."""
        return list(self.covariates)

    @property
    def primary_covariate(self) -> str | None:
        """The covariate whose levels data ATEs and per-level metrics are taken in (None without)."""
        return next(iter(self.covariates), None)

    @property
    def levels(self) -> list[str]:
        """The levels of the primary covariate (empty without covariates)."""
        key = self.primary_covariate
        return list(self.covariates[key]) if key is not None else []

    @property
    def covariate_sizes(self) -> list[int]:
        """Number of levels of each covariate (the widths of their one-hot blocks)."""
        return [len(v) for v in self.covariates.values()]

    def level_of_cells(self, cells: np.ndarray | None = None) -> np.ndarray:
        """Each cell's level of the primary covariate as a string (object array); all "" without."""
        idx = np.arange(self.n_cells) if cells is None else np.asarray(cells)
        if not self.covariates:
            return np.full(idx.size, "", dtype=object)
        names = np.asarray(self.levels, dtype=object)
        return names[self.covariate_codes[idx, 0]]

    def covariate_onehot(self, cells: np.ndarray | None = None) -> np.ndarray:
        """The one-hot covariate encoding [cells, Σ levels] (float32) the models condition on:
        one block per covariate, in :attr:`covariates` order; [cells, 0] without covariates."""
        codes = self.covariate_codes if cells is None else self.covariate_codes[np.asarray(cells)]
        sizes = self.covariate_sizes
        out = np.zeros((codes.shape[0], int(sum(sizes))), dtype=np.float32)
        offset = 0
        rows = np.arange(codes.shape[0])
        for j, size in enumerate(sizes):
            out[rows, offset + codes[:, j]] = 1.0
            offset += size
        return out

    def without_covariates(self) -> PerturbationData:
        """This screen with no modelled covariate (their obs columns stay for display)."""
        settings = {**self.settings, "covariate_keys": [], "covariate_levels": {}}
        return self.replace(covariates={}, covariate_codes=np.zeros((self.n_cells, 0), dtype=np.int64), settings=settings)

    def conditions(self) -> pd.DataFrame:
        """One row per distinct condition: label, number of members, cell count."""
        labels, counts = np.unique(self.labels, return_counts=True)
        n_members = [len(split_label(lab)) for lab in labels]
        return pd.DataFrame({"label": labels, "n_members": n_members, "n_cells": counts})

    def combinations(self) -> list[str]:
        """Labels of the conditions with two or more members."""
        c = self.conditions()
        return c.loc[c.n_members >= 2, "label"].tolist()

    def dosage_row(self, label: str) -> np.ndarray:
        """The dosage row of a condition label such as "A+B" (controls: all zero)."""
        return dosage_rows([label], self.perturbations)[0]

    # ---- derived screens: every one is built by replace() ------------------------------------
    def replace(self, **changes: Any) -> PerturbationData:
        """This screen with some fields changed (``X``, ``library``, ``genes``, ``settings`` ...).

        The one constructor path of derived screens: :meth:`subset`, :meth:`with_perturbations`,
        :func:`select_genes` and the backed reader's in-memory copies go through it.
        """
        changes.setdefault("settings", dict(self.settings))  # a derived screen's settings are its own
        return dataclasses.replace(self, **changes)

    def subset(self, cells: Selection | None = None, genes: Selection | None = None) -> PerturbationData:
        """The screen restricted to some cells and/or genes, in the order given.

        ``cells``: positions or a boolean mask; ``genes``: positions, a boolean mask or gene
        names. Cells keep their dosages, labels, library sizes and obs rows. With ``genes``,
        count data get the library sizes of a screen read with those genes only: each cell's
        total over the kept genes (at least 1). Perturbations and settings are kept.
        """
        changes: dict[str, Any] = {}
        X = self.X
        if cells is not None:
            rows = _positions(cells, self.n_cells, "cells")
            X = X[rows]
            changes.update(library=self.library[rows], dosages=self.dosages[rows], labels=self.labels[rows],
                           obs=self.obs.iloc[rows], covariate_codes=self.covariate_codes[rows])
        if genes is not None:
            cols = _positions(genes, self.n_genes, "genes", names=self.genes)
            if not np.array_equal(cols, np.arange(self.n_genes)):
                X = X[:, cols]
                changes["genes"] = [self.genes[i] for i in cols]
                if self.is_counts:
                    changes["library"] = np.maximum(np.asarray(X.sum(axis=1), dtype=np.float32).ravel(), 1.0)
        return self.replace(X=X, **changes)

    def with_perturbations(self, perturbations: Sequence[str]) -> PerturbationData:
        """The dosage columns re-indexed to ``perturbations`` (e.g. a model's list), which must
        name every perturbation of this screen; names the screen lacks get zero columns."""
        pos = {p: i for i, p in enumerate(perturbations)}
        unknown = [p for p in self.perturbations if p not in pos]
        if unknown:
            raise SamsError(
                f"The data has perturbations not in the list: {', '.join(unknown[:5])}. "
                "Re-index to a list that names every perturbation of the screen."
            )
        if list(perturbations) == list(self.perturbations):
            return self.replace(perturbations=list(perturbations))
        new_col = np.array([pos[p] for p in self.perturbations], dtype=self.dosages.indices.dtype)
        d = self.dosages
        d = sp.csr_matrix((d.data.copy(), new_col[d.indices], d.indptr.copy()), shape=(self.n_cells, len(pos)))
        d.sort_indices()
        return self.replace(dosages=d, perturbations=list(perturbations))

    def dense(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Expression of the cells at ``idx`` (all when None) as a dense float32 array."""
        m = self.X if idx is None else self.X[idx]
        if sp.issparse(m):
            m = m.toarray()
        return np.asarray(m, dtype=np.float32)

    def checksum(self) -> str:
        """A short content hash of the matrix, labels and genes (for caches)."""
        h = hashlib.sha256()
        # the arrays' own memory is hashed (no copy into a bytes object: 2.5 s of a 4.4 s hash at
        # Norman scale); the bytes, hence the hash, are the same
        if sp.issparse(self.X):
            for a in (self.X.data, self.X.indices, self.X.indptr):
                h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        else:
            h.update(np.ascontiguousarray(self.X).reshape(-1).view(np.uint8))
        h.update("\n".join(map(str, self.labels)).encode())
        h.update("\n".join(self.genes).encode())
        return h.hexdigest()[:16]


def read_covariates(
    obs: pd.DataFrame,
    covariate_keys: Sequence[str] | None = None,
    levels: dict[str, Sequence[str]] | None = None,
) -> tuple[dict[str, list[str]], np.ndarray, list[str]]:
    """The covariates a screen models: (column → levels, codes [cells, covariates], notes).

    ``covariate_keys`` None detects the columns of
    :data:`~sams_core.data.contract.DEFAULT_COVARIATES` present in ``obs`` (a detected column with
    one level, or more than :data:`MAX_COVARIATE_LEVELS`, is left out and the notes say why);
    ``[]`` models none; a list models exactly those columns. Levels are the column's values as
    strings, sorted, unless ``levels`` gives them (a bundle's levels): a cell whose level is not
    among them is refused with a :class:`SamsError` naming the column and the level.
    """
    notes: list[str] = []
    if covariate_keys is None:
        keys: list[str] = []
        for c in contract.DEFAULT_COVARIATES:
            if c not in obs.columns:
                continue
            n = int(obs[c].astype(str).nunique())
            if n < 2:
                notes.append(f"obs[{c!r}] has one level only: not modelled as a covariate.")
            elif n > MAX_COVARIATE_LEVELS:
                notes.append(
                    f"obs[{c!r}] has {n} levels (more than {MAX_COVARIATE_LEVELS}): not modelled as a covariate; "
                    f"name it with covariate_keys=[{c!r}] to model it anyway."
                )
            else:
                keys.append(c)
    else:
        keys = [str(c) for c in covariate_keys]
        if len(set(keys)) != len(keys):
            raise SamsError(f"Covariate column(s) named twice: {', '.join(keys)}. Name each once.")
        missing = [c for c in keys if c not in obs.columns]
        if missing:
            raise SamsError(
                f"Covariate column(s) {', '.join(missing)} not in obs (columns: {', '.join(map(str, obs.columns)) or 'none'}). "
                "Name existing columns, or pass covariate_keys=[] (command line: --no-covariates) for none."
            )
    covariates: dict[str, list[str]] = {}
    codes = np.zeros((len(obs), len(keys)), dtype=np.int64)
    for j, c in enumerate(keys):
        col = obs[c]
        if col.isna().any():
            raise SamsError(
                f"{int(col.isna().sum())} cells have no value in covariate obs[{c!r}] (NaN). "
                f"Fill them (e.g. adata.obs[{c!r}] = adata.obs[{c!r}].astype(str).fillna('unknown')) or drop those cells."
            )
        text = col.astype(str).to_numpy()
        if levels is not None and c in levels:
            known = [str(v) for v in levels[c]]
            pos = {v: i for i, v in enumerate(known)}
            unseen = sorted(set(text) - set(pos))
            if unseen:
                raise SamsError(
                    f"Covariate {c!r} has level(s) {', '.join(map(repr, unseen[:5]))} that the model never saw "
                    f"(it knows {', '.join(map(repr, known[:8]))}{' ...' if len(known) > 8 else ''}). "
                    "Keep only cells of the known levels, or train a model on data with these levels."
                )
        else:
            known = sorted(set(text))
            pos = {v: i for i, v in enumerate(known)}
        covariates[c] = known
        codes[:, j] = np.fromiter((pos[v] for v in text), dtype=np.int64, count=len(text))
    return covariates, codes, notes


def covariate_settings(covariates: dict[str, list[str]], notes: Sequence[str]) -> dict[str, Any]:
    """The reading settings that record a screen's covariates (kept in bundles' manifests)."""
    out: dict[str, Any] = {"covariate_keys": list(covariates), "covariate_levels": {k: list(v) for k, v in covariates.items()}}
    if notes:
        out["covariate_notes"] = list(notes)
    return out


def _positions(sel: Selection, n: int, what: str, names: Sequence[str] | None = None) -> np.ndarray:
    """Integer positions of a selection of ``n`` cells or genes (positions, mask, names, slice)."""
    if isinstance(sel, slice):
        return np.arange(n)[sel]
    a = np.asarray(sel)
    if a.dtype == bool:
        if a.shape != (n,):
            raise SamsError(f"A boolean selection of {what} needs {n} values, got {a.size}.")
        return np.flatnonzero(a)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if names is None:
            raise SamsError(f"Select {what} by position or boolean mask, got {a.dtype} values.")
        index = {g: i for i, g in enumerate(names)}
        missing = [str(g) for g in a.tolist() if g not in index]
        if missing:
            raise SamsError(f"{len(missing)} {what} are not in the data (e.g. {', '.join(missing[:3])}). Pick names from data.genes.")
        return np.array([index[g] for g in a.tolist()], dtype=np.int64)
    a = a.astype(np.int64).ravel()
    if a.size and (a.min() < -n or a.max() >= n):
        raise SamsError(f"A {what} position is out of range: the data has {n} {what}.")
    return np.where(a < 0, a + n, a)


def from_anndata(
    adata: Any,
    perturbation_key: str | None = None,
    control_labels: Sequence[str] | None = None,
    separators: Sequence[str] = SEPARATORS,
    counts_layer: str | None = None,
    n_top_genes: int | None = None,
    covariate_keys: Sequence[str] | None = None,
    covariate_levels: dict[str, Sequence[str]] | None = None,
) -> PerturbationData:
    """Read an AnnData screen into :class:`PerturbationData` following the data contract.

    The perturbation column is ``perturbation_key`` or the first of the common names found in
    ``obs``; combinations are labels joined by ``separators``; labels in ``control_labels``
    (default: control, ctrl, non-targeting, NT, DMSO ...) are controls. Counts come from
    ``layers[counts_layer or 'counts']`` or from an integer-valued ``X``; otherwise ``X`` is
    taken as log-normalised and the data asks for a Gaussian likelihood. ``n_top_genes`` keeps
    that many highly variable genes (scanpy). Covariates the models condition on
    (:func:`read_covariates`): detected among ``cell_type``, ``cell_line``, ``batch``,
    ``gem_group``, ``donor``, ``sample`` when ``covariate_keys`` is None, none for ``[]``, else the
    columns named; ``covariate_levels`` (a bundle's levels) codes them with known levels and
    refuses unseen ones. The checks and their messages are those of
    :mod:`sams_core.data.contract`, shared with the backed reader.
    """
    contract.check_shape(adata.n_obs, adata.n_vars)
    genes = contract.gene_names(adata.var_names)
    conditions = contract.read_conditions(adata.obs, perturbation_key, control_labels, separators)
    obs = contract.carried_obs(adata.obs, conditions, covariate_keys)
    covariates, codes, notes = read_covariates(adata.obs, covariate_keys, covariate_levels)
    layer, where = contract.expression_source(adata.layers.keys(), adata.X is not None, counts_layer)
    m = adata.layers[layer] if layer is not None else adata.X
    if hasattr(m, "to_memory"):
        m = m.to_memory()
    contract.check_numeric(m.dtype, where)
    m = sp.csr_matrix(m, dtype=np.float32) if sp.issparse(m) else np.asarray(m, dtype=np.float32)
    scan = contract.ValueScan(m.shape[0], where)
    scan.add(slice(None), m)
    is_counts, library = scan.counts_and_library(layer)
    contract.check_raw_counts(getattr(adata, "raw", None), is_counts, where)
    data = PerturbationData(
        X=m,
        is_counts=is_counts,
        library=library,
        dosages=conditions.dosages,
        labels=conditions.labels,
        perturbations=conditions.perturbations,
        genes=genes,
        obs=obs,
        settings={**contract.contract_settings(conditions, where, is_counts, n_top_genes), **covariate_settings(covariates, notes)},
        covariates=covariates,
        covariate_codes=codes,
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
    out = data.subset(genes=keep)
    return out.replace(settings={**out.settings, "n_top_genes": int(n_top_genes)})


def read_anndata(path: str | Path) -> Any:
    """The AnnData of an ``.h5ad`` file, as it is (no checks of its content), with the data
    contract's messages for a missing, misnamed or damaged file."""
    import anndata as ad

    p = contract.check_path(path)
    try:
        return ad.read_h5ad(p)
    except Exception as exc:  # h5py / anndata raise many types for corrupt files
        raise contract.unreadable(p, exc) from exc


def read_h5ad(path: str | Path, **kwargs: Any) -> PerturbationData:
    """Read an ``.h5ad`` file into :class:`PerturbationData` (see :func:`from_anndata`)."""
    data = from_anndata(read_anndata(path), **kwargs)
    data.settings["source"] = str(Path(path))
    return data
