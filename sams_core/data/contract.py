"""The data contract's checks (DESIGN §4), written once for the in-memory and the backed reader.

:func:`sams_core.data.screen.from_anndata` and :func:`sams_core.data.backed.read_h5ad_backed`
run the same steps, so a malformed screen gets the same message from both:

1. :func:`check_path` (files), :func:`check_shape`, :func:`gene_names` (no duplicates);
2. :func:`read_conditions`: the perturbation column (named or found among
   :data:`PERTURBATION_KEYS`), every cell labelled, controls and perturbations present, no empty
   categories; each cell's canonical label and dosage row;
3. :func:`expression_source`: counts from ``layers[counts_layer or 'counts']`` or ``X``;
4. :class:`ValueScan`: numeric, finite values (read in one block or block by block), then
   integer counts that are never negative and no empty cells, or log-normalised values;
5. :func:`carried_obs` (covariates) and :func:`contract_settings`.

Every check raises :class:`~sams_core.errors.SamsError` naming the problem and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sams_core.errors import SamsError
from sams_core.labels import SEPARATORS, canonical_label, control_words, perturbation_order, split_label

#: obs columns searched, in this order, for each cell's perturbation.
PERTURBATION_KEYS: tuple[str, ...] = (
    "perturbation",
    "condition",
    "guide_identity",
    "gene",
    "perturbation_name",
)

#: Covariates detected (in this order) and modelled when present; others are named by the user.
DEFAULT_COVARIATES: tuple[str, ...] = ("cell_type", "cell_line", "batch", "gem_group", "donor", "sample")

#: How many stored values decide whether a matrix holds integer counts.
INTEGER_SAMPLE = 200_000


# ---- files and shapes ------------------------------------------------------------------------
def check_path(path: str | Path) -> Path:
    """``path`` as a :class:`Path` once it names an existing ``.h5ad`` file."""
    p = Path(path)
    if not p.exists():
        raise SamsError(f"File not found: {p}. Check the path.")
    if p.suffix.lower() != ".h5ad":
        raise SamsError(
            f"{p.name} is not an .h5ad file. Convert it with anndata/scanpy "
            "(e.g. sc.read_10x_mtx(...).write_h5ad('screen.h5ad'))."
        )
    return p


def unreadable(p: Path, exc: Exception) -> SamsError:
    """The error for a file that h5py / anndata could not read (they raise many types)."""
    return SamsError(
        f"Could not read {p.name} as AnnData ({type(exc).__name__}: {exc}). "
        "The file is damaged or not an .h5ad; re-export it with adata.write_h5ad()."
    )


def check_shape(n_cells: int, n_genes: int) -> None:
    """A screen has cells and genes."""
    if n_cells == 0 or n_genes == 0:
        raise SamsError(f"The data has {n_cells} cells and {n_genes} genes. Load a file with cells and genes.")


def gene_names(var_names: Sequence[Any]) -> list[str]:
    """The gene names as strings, refused when some repeat."""
    genes = [str(g) for g in var_names]
    index = pd.Index(genes)
    dup = index[index.duplicated()].unique().tolist()
    if dup:
        raise SamsError(
            f"Duplicated gene names: {', '.join(map(str, dup[:5]))}{' ...' if len(dup) > 5 else ''}. "
            "Make them unique first (adata.var_names_make_unique())."
        )
    return genes


# ---- perturbation labels ---------------------------------------------------------------------
def find_perturbation_key(obs: pd.DataFrame, key: str | None) -> str:
    """The obs column of each cell's perturbation: ``key``, or the first of :data:`PERTURBATION_KEYS`."""
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


@dataclass(frozen=True)
class Conditions:
    """Each cell's condition as the contract reads it from ``obs[key]``."""

    key: str
    raw: pd.Series  # the column as written
    labels: np.ndarray  # canonical labels ("control", "A", "A+B"), object dtype
    dosages: sp.csr_matrix  # [cells, perturbations] CSR float32, 1 for each member
    perturbations: list[str]  # the single perturbations, sorted
    separators: tuple[str, ...]
    controls: frozenset[str]


def read_conditions(
    obs: pd.DataFrame,
    perturbation_key: str | None = None,
    control_labels: Sequence[str] | None = None,
    separators: Sequence[str] = SEPARATORS,
) -> Conditions:
    """Every cell's members, canonical label and dosage row, with the contract's label checks."""
    key = find_perturbation_key(obs, perturbation_key)
    raw = obs[key]
    if raw.isna().any():
        n = int(raw.isna().sum())
        raise SamsError(f"{n} cells have no value in obs[{key!r}] (NaN). Label them (e.g. 'control') or drop them.")
    seps = tuple(separators)
    controls = control_words(control_labels)
    text = raw.astype(str)
    codes, uniques = pd.factorize(text.to_numpy(), sort=False)
    check_labels(key, text, uniques)
    members = [sorted(set(split_label(u, seps, controls))) for u in uniques]
    singles = sorted({p for ms in members for p in ms})
    if not any(len(ms) > 1 for ms in members):
        check_unsplit_pairs(key, [str(u) for u in uniques], seps)
    if not singles:
        raise SamsError(f"obs[{key!r}] has only control cells: no perturbations to model. Check the column.")
    if all(ms for ms in members):
        raise SamsError(
            f"No control cells in obs[{key!r}] (labels seen: {', '.join(map(str, pd.unique(raw)[:6]))}). "
            "Controls are labelled control / ctrl / non-targeting / NT / DMSO; "
            "pass control_labels=[...] (command line: --control-label) for other names."
        )
    if hasattr(raw, "cat"):
        present = set(uniques)  # built once, not once per category
        unused = [c for c in raw.cat.categories if str(c) not in present]
        if unused:
            raise SamsError(
                f"Perturbation(s) {', '.join(map(str, unused[:5]))} are listed in obs[{key!r}] but have no cells. "
                f"Drop unused categories first (adata.obs[{key!r}] = adata.obs[{key!r}].cat.remove_unused_categories())."
            )
    order = perturbation_order(singles)
    labels = np.array([canonical_label(ms, order) for ms in members], dtype=object)
    # every distinct raw label was parsed once above; codes map the results back to the cells
    return Conditions(key, raw, labels[codes], _dosage_matrix(codes, members, order), singles, seps, controls)


def _dosage_matrix(codes: np.ndarray, members: list[list[str]], order: dict[str, int]) -> sp.csr_matrix:
    """[cells, perturbations] CSR float32 with a 1 for each member of each cell's label
    (``members`` of the distinct labels, ``codes`` each cell's label): built from the members'
    positions without a dense row per cell (a screen of 2,000 perturbations and 124,000 cells
    holds 1 GB densely, about 1.5 MB this way)."""
    lens = np.array([len(ms) for ms in members], dtype=np.int64)
    flat = np.array([order[p] for ms in members for p in ms], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    rep = lens[codes]
    indptr = np.concatenate([[0], np.cumsum(rep)])
    within = np.arange(int(indptr[-1])) - np.repeat(indptr[:-1], rep)
    cols = flat[np.repeat(starts[codes], rep) + within]
    d = sp.csr_matrix((np.ones(cols.size, dtype=np.float32), cols, indptr), shape=(codes.size, len(order)))
    return as_dosage_matrix(d)


def as_dosage_matrix(d: Any) -> sp.csr_matrix:
    """A screen's per-cell dosage matrix in its one form: ``scipy.sparse.csr_matrix``, float32,
    explicit zeros removed, sorted column indices, so that a row's stored entries are exactly its
    members (``control_mask`` and ``n_members`` read the row lengths). Dense arrays and other
    sparse formats are converted; a matrix already in this form is returned as it is, any other
    is copied (the caller's matrix is never changed)."""
    if sp.issparse(d):
        if (
            isinstance(d, sp.csr_matrix) and d.dtype == np.float32 and d.has_canonical_format
            and not (d.data == 0).any()
        ):
            return d
        m = sp.csr_matrix(d, dtype=np.float32, copy=True)
    else:
        a = np.asarray(d.detach().cpu() if hasattr(d, "detach") else d, dtype=np.float32)
        if a.ndim != 2:
            raise SamsError(f"Dosages must be a [cells, perturbations] matrix, got an array of shape {a.shape}.")
        m = sp.csr_matrix(a)
    m.eliminate_zeros()
    m.sum_duplicates()  # sorts the indices too
    m.eliminate_zeros()  # duplicates that summed to zero
    return m


#: Labels that are a missing value written as text (pandas writes NaN/None as these).
MISSING_TEXT: frozenset[str] = frozenset({"nan", "none", "null", "na", "<na>", "n/a"})


def check_labels(key: str, text: pd.Series, uniques: Sequence[str]) -> None:
    """No cell is labelled with empty text or with a missing value written as text ('nan'):
    neither names a control or a perturbation, so neither is guessed."""
    empty = [u for u in uniques if not str(u).strip()]
    if empty:
        n = int(text.str.strip().eq("").sum())
        raise SamsError(
            f"{n} cells have an empty label in obs[{key!r}]. An empty label is not taken as a control: "
            "label them (e.g. 'control' for controls) or drop them."
        )
    missing = [u for u in uniques if str(u).strip().lower() in MISSING_TEXT]
    if missing:
        n = int(text.str.strip().str.lower().isin(MISSING_TEXT).sum())
        raise SamsError(
            f"{n} cells are labelled {missing[0]!r} in obs[{key!r}], a missing value written as text, not a perturbation. "
            "Label them (e.g. 'control' for controls) or drop them."
        )


def check_unsplit_pairs(key: str, uniques: Sequence[str], separators: Sequence[str]) -> None:
    """Refuse labels that look like combinations joined by another separator ('A_B', 'A|B' with
    'A' and 'B' labels of their own) when the separators in use find no combination."""
    names = set(uniques)
    for sep in ("_", "|", ";", "/", ","):
        if sep in separators:
            continue
        pairs = [u for u in uniques if sep in u and all(part in names for part in u.split(sep))]
        if pairs:
            raise SamsError(
                f"obs[{key!r}] has labels such as {pairs[0]!r} whose parts are perturbations of their own, but no "
                f"combination joined by {' or '.join(repr(x) for x in separators)}. If they are combinations, read them "
                f"with separators=[{sep!r}] (command line: --separator {sep!r}; dashboard: the separator setting); if they "
                "are single perturbations, rename them (e.g. replace the separator by '-')."
            )


def check_raw_counts(raw: Any, is_counts: bool, where: str) -> None:
    """Refuse log-normalised ``X`` beside raw counts in ``adata.raw``: the counts would be ignored."""
    if is_counts or raw is None:
        return
    m = raw.X
    vals = m.data if sp.issparse(m) else np.asarray(m)
    vals = np.asarray(vals).ravel()[:INTEGER_SAMPLE]
    if vals.size and np.issubdtype(vals.dtype, np.number) and np.all(np.mod(vals, 1) == 0):
        raise SamsError(
            f"{where} holds log-normalised values while adata.raw holds raw counts, which SAMS models better "
            "(negative-binomial likelihood). Store the counts where they are read: "
            "adata.layers['counts'] = adata.raw[:, adata.var_names].X, then write the file again; "
            "or delete adata.raw (del adata.raw) to model X as log-normalised data."
        )


def check_same_kind(model_counts: bool, data_counts: bool, where: str) -> None:
    """A model trained on counts is applied to counts, one trained on log-normalised data to such data."""
    if model_counts == data_counts:
        return
    if model_counts:
        raise SamsError(
            f"The model was trained on raw counts, but {where} of this data holds log-normalised values: its "
            "likelihoods and effects would be meaningless. Load the raw counts of the screen (layers['counts'] or an "
            "integer X), or train a model on this data."
        )
    raise SamsError(
        f"The model was trained on log-normalised data, but {where} of this data holds raw counts. Load the "
        "log-normalised values it was trained on, or train a model on these counts."
    )


def carried_obs(obs: pd.DataFrame, conditions: Conditions, covariate_keys: Sequence[str] | None = None) -> pd.DataFrame:
    """The obs the screen keeps: canonical and raw labels, and the covariates present or named."""
    missing = [c for c in (covariate_keys or []) if c not in obs.columns]
    if missing:
        raise SamsError(f"Covariate column(s) {', '.join(missing)} not in obs. Name existing columns.")
    out = pd.DataFrame(index=obs.index.astype(str))
    out["perturbation"] = conditions.labels.astype(str)
    out["raw_perturbation"] = conditions.raw.astype(str).values
    for c in (*DEFAULT_COVARIATES, *(covariate_keys or [])):
        if c in obs.columns:
            out[c] = obs[c].values
    return out


# ---- the expression matrix -------------------------------------------------------------------
def expression_source(layers: Collection[str], has_x: bool, counts_layer: str | None = None) -> tuple[str | None, str]:
    """(layer name or None for ``X``, how messages name it): ``counts_layer``, else
    ``layers['counts']`` when present, else ``X``."""
    layers = list(layers)
    if counts_layer is not None and counts_layer not in layers:
        raise SamsError(
            f"Layer {counts_layer!r} not found (layers: {', '.join(layers) or 'none'}). "
            "Name an existing counts layer or leave it empty to use X."
        )
    layer = counts_layer or ("counts" if "counts" in layers else None)
    if layer is None and not has_x:
        raise SamsError("The file has no expression matrix (X is empty). Store counts in X or layers['counts'].")
    return layer, (f"layers[{layer!r}]" if layer is not None else "X")


def check_numeric(dtype: np.dtype, where: str) -> None:
    """Expression is stored as numbers."""
    if not np.issubdtype(dtype, np.number):
        raise SamsError(f"{where} is not numeric (dtype {dtype}). Store expression as numbers.")


class ValueScan:
    """What the contract needs to know of a matrix, gathered in one pass over its rows.

    :meth:`add` takes the rows of the matrix in any blocks (all at once in memory, chunk by
    chunk from a backed file) and checks them (numeric, finite); :meth:`counts_and_library`
    then decides counts or log-normalised values and gives the library sizes.
    """

    def __init__(self, n_cells: int, where: str):
        self.where = where
        self.row_sums = np.zeros(n_cells, dtype=np.float32)
        self.min_value = math.inf
        self._sample: list[np.ndarray] = []
        self._n_sample = 0

    def add(self, rows: np.ndarray | slice, block: np.ndarray | sp.spmatrix) -> None:
        """Check and take in the cells ``rows`` of the matrix (``block``: those rows, dense or sparse)."""
        vals = block.data if sp.issparse(block) else np.asarray(block)
        check_numeric(vals.dtype, self.where)
        vals = vals.astype(np.float32, copy=False).ravel()
        if not np.isfinite(vals).all():
            raise SamsError(
                f"{self.where} contains NaN or infinite values. Remove or impute them before loading "
                "(e.g. adata = adata[:, np.isfinite(adata.X.sum(0))])."
            )
        if self._n_sample < INTEGER_SAMPLE:
            self._sample.append(vals[: INTEGER_SAMPLE - self._n_sample])
            self._n_sample += self._sample[-1].size
        if vals.size:
            self.min_value = min(self.min_value, float(vals.min()))
        b = block.astype(np.float32, copy=False) if sp.issparse(block) else np.asarray(block, dtype=np.float32)
        self.row_sums[rows] = np.asarray(b.sum(axis=1)).ravel()

    @property
    def integer_valued(self) -> bool:
        """Whether the first :data:`INTEGER_SAMPLE` stored values are whole numbers."""
        sample = np.concatenate(self._sample) if self._sample else np.zeros(0, np.float32)
        return bool(np.all(np.mod(sample, 1) == 0))

    def counts_and_library(self, layer: str | None) -> tuple[bool, np.ndarray]:
        """(counts?, library sizes): integer values are counts (never negative, no empty cell),
        others are log-normalised (library 1); a counts ``layer`` must hold counts."""
        is_counts = self.integer_valued
        if layer is not None and not is_counts:
            raise SamsError(
                f"{self.where} holds non-integer values, so they are not raw counts. Store raw UMI counts there, "
                "or remove the layer to model X as log-normalised data."
            )
        if not is_counts:
            return False, np.ones(self.row_sums.shape[0], dtype=np.float32)
        if self.min_value < 0:
            raise SamsError(
                f"{self.where} has negative counts (min {self.min_value:g}). Counts must be ≥ 0: load raw UMI counts."
            )
        empty = int((self.row_sums <= 0).sum())
        if empty:
            raise SamsError(
                f"{empty} cells have zero total counts. Filter them first (sc.pp.filter_cells(adata, min_counts=1))."
            )
        return True, self.row_sums


def contract_settings(conditions: Conditions, where: str, is_counts: bool, n_top_genes: int | None = None) -> dict[str, Any]:
    """The reading settings a screen (and a bundle trained on it) records."""
    return {
        "perturbation_key": conditions.key,
        "separators": list(conditions.separators),
        "control_labels": sorted(conditions.controls),
        "counts_source": where if is_counts else None,
        "likelihood": "nb" if is_counts else "gaussian",
        "n_top_genes": n_top_genes,
    }
