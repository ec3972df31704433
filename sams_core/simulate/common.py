"""What every simulator shares: the answer-key type, names, checks of the arguments, random masks,
effects and pairs, the cells of each condition, the true decoders and the AnnData layout.

All numpy, deterministic for a ``np.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sams_core.errors import SamsError

#: Real human gene symbols (mostly transcription factors and signalling genes) used as the
#: names of simulated perturbations, in this order; beyond the list names are ``PERT150`` ...
PERTURBATION_SYMBOLS: tuple[str, ...] = (
    "KLF1", "GATA1", "SPI1", "CEBPA", "CEBPB", "CEBPE", "TAL1", "RUNX1", "FLI1", "ETV6",
    "IKZF1", "IKZF3", "MYB", "MYC", "MAX", "JUN", "FOS", "FOSB", "EGR1", "EGR2",
    "IRF1", "IRF4", "IRF8", "STAT1", "STAT3", "STAT5A", "NFKB1", "RELA", "TP53", "CDKN1A",
    "CDKN2A", "RB1", "E2F1", "HES1", "NOTCH1", "TCF7", "LEF1", "CTNNB1", "SOX2", "SOX9",
    "POU5F1", "NANOG", "PAX5", "EBF1", "BCL6", "BCL2", "MCL1", "BAX", "BAK1", "CASP3",
    "KRAS", "BRAF", "MAP2K1", "MAPK1", "PIK3CA", "AKT1", "MTOR", "PTEN", "TSC2", "SMAD3",
    "SMAD4", "TGFBR2", "ZEB1", "ZEB2", "SNAI1", "TWIST1", "HIF1A", "EPAS1", "VHL", "NFE2L2",
    "KEAP1", "ATF4", "DDIT3", "XBP1", "ERN1", "HSF1", "YAP1", "TEAD1", "FOXO1", "FOXO3",
    "FOXA1", "FOXM1", "GATA2", "GATA3", "HNF1A", "HNF4A", "NR4A1", "PPARG", "RXRA", "ESR1",
    "AR", "VDR", "SET", "DUSP9", "CBL", "SLC4A1", "PTPN12", "COL1A1", "UBASH3B", "LHX1",
    "MAML2", "ARID1A", "CNN1", "BPGM", "SGK1", "PRDM1", "ZBTB10", "TBX3", "OSR2", "ISL2",
    "NFE2", "KLF2", "KLF4", "KLF5", "CDX2", "HOXA9", "MEIS1", "LMO2", "LYL1", "ERG",
    "ELF1", "ELK1", "ETS1", "ETS2", "NR2F2", "CUX1", "CDKN1B", "CDKN1C", "CCND1", "CCNE1",
    "CDK4", "CDK6", "BHLHE40", "ATF3", "JUNB", "IRF2", "IRF7", "STAT6", "NFKBIA", "TNFAIP3",
    "SPIB", "TFEC", "NR1H3", "POU2F2", "CREB1", "SRF", "MEF2C", "TFAP2A", "ZNF318", "MAP7D1",
)

#: Count-matrix entries generated per block (bounds memory at large sizes).
_BLOCK_ENTRIES = 1 << 22


@dataclass
class SimulationTruth:
    """The answer key of a simulated screen (what ``uns["sams_truth"]`` holds).

    Attributes:
        kind: ``"sams"``, ``"svae"`` or ``"reference"``.
        perturbations: (T,) names of the single perturbations; the row order of ``masks`` and
            ``embeddings`` (sorted, so it equals the data loader's perturbation order).
        masks: (T, K) int8, 1 where perturbation t acts on latent unit k.
        embeddings: (T, K) float32, the latent shift of each single (0 off the mask).
        combinations: (C,) labels of the simulated pairs, e.g. ``"GATA1+KLF1"``.
        heldout_combinations: the suggested held-out subset of ``combinations``.
        program_sets: program name (``"PROGRAM_U03"``) → names of the genes that unit drives.
        unit_of_program: program name → latent unit index.
        seed: the seed the screen was simulated with.
        params: the scalar parameters of the simulation.
        decoder: the decoder's parameters (see :func:`sams_core.simulate.true_mean`).
        inverse_dispersion: (G,) negative-binomial inverse dispersion θ of each gene (count kinds).
        noise_sd: (G,) standard deviation of the Gaussian noise of each gene (the reference kind,
            whose values are real numbers, not counts).
    """

    kind: str
    perturbations: np.ndarray
    masks: np.ndarray
    embeddings: np.ndarray
    combinations: np.ndarray
    heldout_combinations: np.ndarray
    program_sets: dict[str, list[str]]
    unit_of_program: dict[str, int]
    seed: int
    params: dict[str, Any]
    decoder: dict[str, Any] = field(default_factory=dict)
    inverse_dispersion: np.ndarray | None = None
    noise_sd: np.ndarray | None = None

    @property
    def n_latent(self) -> int:
        """Number of true latent units K."""
        return int(self.masks.shape[1])

    @property
    def n_perturbations(self) -> int:
        """Number of single perturbations T."""
        return int(self.masks.shape[0])

    @property
    def is_counts(self) -> bool:
        """True when the screen holds negative-binomial counts, False for Gaussian values."""
        return self.noise_sd is None


# --------------------------------------------------------------------------- names and checks


def perturbation_names(n: int) -> list[str]:
    """``n`` human-readable perturbation names: the first ``n`` real gene symbols of
    :data:`PERTURBATION_SYMBOLS`, then ``PERT150``, ``PERT151``, ... (in list order, unsorted)."""
    base = list(PERTURBATION_SYMBOLS[:n])
    return base + [f"PERT{i:03d}" for i in range(len(base), n)]


def need_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int ≥ ``minimum``, else a SamsError naming the argument."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SamsError(f"{name} must be an integer ≥ {minimum}, got {value!r}.")
    return int(value)


def need_float(name: str, value: Any, low: float, high: float = np.inf, open_low: bool = False) -> float:
    """``value`` as a finite float in [low, high] ((low, high] with ``open_low``), else a SamsError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SamsError(f"{name} must be a number, got {value!r}.") from None
    if not np.isfinite(v) or v > high or v < low or (open_low and v == low):
        bound = f"> {low:g}" if open_low else f"≥ {low:g}"
        upper = "" if high == np.inf else f" and ≤ {high:g}"
        raise SamsError(f"{name} must be {bound}{upper}, got {value!r}.")
    return v


def check_targets(targets: Sequence[int], K: int) -> tuple[int, int]:
    """(fewest, most) latent units a perturbation acts on, checked against ``K``."""
    try:
        lo, hi = (int(targets[0]), int(targets[1]))
    except (TypeError, ValueError, IndexError):
        raise SamsError(f"targets_per_perturbation must be a pair (fewest, most), got {targets!r}.") from None
    if lo < 1 or hi < lo or hi > K:
        raise SamsError(
            f"targets_per_perturbation must satisfy 1 ≤ fewest ≤ most ≤ n_latent, got {(lo, hi)} with "
            f"n_latent={K}. Lower the most targets or raise n_latent."
        )
    return lo, hi


@dataclass(frozen=True)
class Design:
    """The checked arguments every simulator has: sizes, effect sizes, seed and the covariate."""

    n_perturbations: int
    n_latent: int
    n_genes: int
    cells_per_perturbation: int
    n_control: int
    effect_mean: float
    effect_sd: float
    seed: int
    n_batches: int

    @classmethod
    def checked(
        cls,
        n_perturbations: Any,
        n_latent: Any,
        n_genes: Any,
        cells_per_perturbation: Any,
        n_control: Any,
        effect_mean: Any,
        effect_sd: Any,
        seed: Any,
        n_batches: Any,
    ) -> Design:
        """Validate the shared arguments (``n_control`` already defaulted by the caller)."""
        return cls(
            need_int("n_perturbations", n_perturbations, 1),
            need_int("n_latent", n_latent, 1),
            need_int("n_genes", n_genes, 1),
            need_int("cells_per_perturbation", cells_per_perturbation, 1),
            need_int("n_control", n_control, 1),
            need_float("effect_mean", effect_mean, 0.0),
            need_float("effect_sd", effect_sd, 0.0),
            need_int("seed", seed, 0),
            need_int("n_batches", n_batches, 1),
        )

    def params(self) -> dict[str, Any]:
        """The design as scalar parameters of the answer key."""
        return {
            "n_perturbations": self.n_perturbations, "n_latent": self.n_latent, "n_genes": self.n_genes,
            "cells_per_perturbation": self.cells_per_perturbation, "n_control": self.n_control,
            "effect_mean": self.effect_mean, "effect_sd": self.effect_sd, "n_batches": self.n_batches,
        }


@dataclass(frozen=True)
class CountNoise:
    """Library sizes and negative-binomial noise of the count simulators.

    Library sizes are log-normal with mean ``library_mean`` UMIs (None: 2,500 × √(G/200)) and
    log-scale sd ``library_sd``; each gene's inverse dispersion θ_g is log-normal around
    ``dispersion`` with log-scale sd ``dispersion_sd`` (lower θ is noisier).
    """

    library_mean: float | None
    library_sd: float
    dispersion: float
    dispersion_sd: float

    @classmethod
    def checked(cls, library_mean: Any, library_sd: Any, dispersion: Any, dispersion_sd: Any) -> CountNoise:
        """Validate the noise arguments."""
        return cls(
            None if library_mean is None else need_float("library_mean", library_mean, 0.0, open_low=True),
            need_float("library_sd", library_sd, 0.0),
            need_float("dispersion", dispersion, 0.0, open_low=True),
            need_float("dispersion_sd", dispersion_sd, 0.0),
        )

    def mean_library(self, n_genes: int) -> float:
        """Mean library size in UMIs (the default grows as √G)."""
        return 2500.0 * float(np.sqrt(n_genes / 200.0)) if self.library_mean is None else float(self.library_mean)

    def draw(self, rng: np.random.Generator, n_genes: int, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
        """(θ per gene (float64), library size per cell (≥ 50))."""
        theta = (self.dispersion * np.exp(rng.normal(0.0, self.dispersion_sd, n_genes))).astype(np.float64)
        median = self.mean_library(n_genes) * np.exp(-0.5 * self.library_sd**2)
        library = np.maximum(rng.lognormal(np.log(median), self.library_sd, n_cells), 50.0)
        return theta, library

    def params(self, n_genes: int) -> dict[str, Any]:
        """The noise as scalar parameters of the answer key."""
        return {"library_mean": self.mean_library(n_genes), "library_sd": self.library_sd,
                "dispersion": self.dispersion, "dispersion_sd": self.dispersion_sd}


# --------------------------------------------------------------------------- random design


def draw_masks(rng: np.random.Generator, T: int, K: int, targets: tuple[int, int]) -> np.ndarray:
    """(T, K) int8 masks with ``targets`` units each; every unit is targeted when the targets suffice."""
    lo, hi = targets
    n_targets = rng.integers(lo, hi + 1, size=T)
    uncovered = [int(k) for k in rng.permutation(K)]
    masks = np.zeros((T, K), dtype=np.int8)
    for t in rng.permutation(T):
        chosen: list[int] = []
        for _ in range(int(n_targets[t])):
            if uncovered:
                chosen.append(uncovered.pop())
            else:
                free = np.setdiff1d(np.arange(K), chosen)
                chosen.append(int(rng.choice(free)))
        masks[t, chosen] = 1
    return masks


def draw_effects(rng: np.random.Generator, masks: np.ndarray, mean: float, sd: float) -> np.ndarray:
    """±N(mean, sd²) on the mask, 0 elsewhere (float32)."""
    size = rng.normal(mean, sd, masks.shape)
    sign = rng.choice(np.array([-1.0, 1.0]), masks.shape)
    return (masks * size * sign).astype(np.float32)


def check_pairs(n_combinations: int, T: int) -> int:
    """``n_combinations`` checked against the T(T−1)/2 distinct pairs of T singles."""
    max_pairs = T * (T - 1) // 2
    if n_combinations > max_pairs:
        raise SamsError(
            f"{n_combinations} combinations requested but {T} perturbations make only {max_pairs} distinct pairs. "
            f"Ask for at most {max_pairs} combinations or more perturbations."
        )
    return n_combinations


def draw_pairs(rng: np.random.Generator, T: int, n: int) -> list[tuple[int, int]]:
    """``n`` distinct pairs (i < j) of singles, sorted."""
    if n == 0:
        return []
    max_pairs = T * (T - 1) // 2
    if max_pairs <= 2_000_000:
        i, j = np.triu_indices(T, k=1)
        pick = np.sort(rng.choice(max_pairs, size=n, replace=False))
        return [(int(i[p]), int(j[p])) for p in pick]
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n:
        a, b = rng.choice(T, 2, replace=False)
        pairs.add((int(min(a, b)), int(max(a, b))))
    return sorted(pairs)


def draw_heldout(rng: np.random.Generator, combos: list[str], fraction: float) -> list[str]:
    """The suggested held-out combinations: a ``fraction`` of them (at least one when > 0), sorted."""
    n_held = round(fraction * len(combos))
    if fraction > 0 and combos:
        n_held = max(1, n_held)
    return sorted(rng.choice(combos, n_held, replace=False).tolist()) if n_held else []


@dataclass(frozen=True)
class PairDesign:
    """The checked pair arguments: how many pairs, their cells, the held-out suggestion."""

    n_combinations: int
    cells_per_combination: int
    heldout_fraction: float

    @classmethod
    def checked(cls, n_combinations: Any, cells_per_combination: Any, heldout_fraction: Any, design: Design) -> PairDesign:
        """Validate (``cells_per_combination`` None: as many as a single has)."""
        n_combo = design.cells_per_perturbation if cells_per_combination is None else cells_per_combination
        return cls(
            check_pairs(need_int("n_combinations", n_combinations, 0), design.n_perturbations),
            need_int("cells_per_combination", n_combo, 1),
            need_float("heldout_fraction", heldout_fraction, 0.0, 1.0),
        )

    def params(self) -> dict[str, Any]:
        """The pair design as scalar parameters of the answer key."""
        return {"n_combinations": self.n_combinations, "cells_per_combination": self.cells_per_combination,
                "heldout_fraction": self.heldout_fraction}


#: No pairs (the sVAE-style screen).
NO_PAIRS = PairDesign(0, 1, 0.0)


@dataclass(frozen=True)
class Cells:
    """The simulated conditions and cells: pair labels, the held-out suggestion, one label per cell
    (ordered controls, singles, pairs) and the true basal and full latent states (N × K)."""

    combinations: list[str]
    heldout: list[str]
    labels: list[str]
    z_b: np.ndarray
    z: np.ndarray


def draw_cells(rng: np.random.Generator, names: list[str], emb: np.ndarray, design: Design, pairs: PairDesign) -> Cells:
    """Draw the pairs, the held-out suggestion and every cell's latent state.

    A pair's shift is the sum of its members' shifts and its label joins the members in the
    order of ``names``; each cell has z_b ~ N(0, I_K) and z = z_b + its condition's shift.
    """
    K = emb.shape[1]
    chosen = draw_pairs(rng, design.n_perturbations, pairs.n_combinations)
    combos = [f"{names[i]}+{names[j]}" for i, j in chosen]
    labels = ["control"] * design.n_control
    cond_shift = [np.zeros(K, np.float32)]
    cond_n = [design.n_control]
    for t, name in enumerate(names):
        labels += [name] * design.cells_per_perturbation
        cond_shift.append(emb[t])
        cond_n.append(design.cells_per_perturbation)
    for (i, j), lab in zip(chosen, combos):
        labels += [lab] * pairs.cells_per_combination
        cond_shift.append(emb[i] + emb[j])
        cond_n.append(pairs.cells_per_combination)
    shift = np.repeat(np.stack(cond_shift), cond_n, axis=0)
    heldout = draw_heldout(rng, combos, pairs.heldout_fraction)
    z_b = rng.normal(size=shift.shape).astype(np.float32)
    return Cells(combos, heldout, labels, z_b, z_b + shift)


def truth_record(
    kind: str,
    names: list[str],
    masks: np.ndarray,
    emb: np.ndarray,
    cells: Cells,
    decoder: dict[str, Any],
    seed: int,
    params: dict[str, Any],
    **noise: np.ndarray,
) -> dict[str, Any]:
    """The answer key as stored in ``uns["sams_truth"]`` (``noise``: ``inverse_dispersion`` for
    counts or ``noise_sd`` for Gaussian values; programs are added by the SAMS-style simulator)."""
    return {
        "kind": kind,
        "perturbations": str_array(names),
        "masks": masks,
        "embeddings": emb,
        "combinations": str_array(cells.combinations),
        "heldout_combinations": str_array(cells.heldout),
        "programs": {},
        "decoder": decoder,
        **noise,
        "seed": seed,
        "params": {**params, "n_cells": len(cells.labels)},
    }


def orthogonal(rng: np.random.Generator, rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
    """A (rows × cols) matrix with orthonormal rows or columns (whichever are fewer), like
    ``torch.nn.init.orthogonal_``: QR of a standard normal matrix, signs fixed by R's diagonal."""
    flat = rng.normal(size=(rows, cols))
    if rows < cols:
        flat = flat.T
    q, r = np.linalg.qr(flat)
    q = q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))
    return gain * (q.T if rows < cols else q)


# --------------------------------------------------------------------------- true decoders


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax."""
    logits = logits - logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    return p


def _leaky(h: np.ndarray, leak: float) -> np.ndarray:
    return np.where(h > 0, h, leak * h)


def decode(decoder: dict[str, Any], z: np.ndarray) -> np.ndarray:
    """The decoder's output for latent states ``z`` (n × K): per-gene logits before the softmax
    (``programs`` and ``mlp`` decoders of the count kinds) or the Gaussian mean (``dense``)."""
    z = np.asarray(z, dtype=np.float64)
    kind = str(decoder["kind"])
    leak = float(decoder["leak"])
    if kind == "programs":
        program = np.asarray(decoder["program"], dtype=np.int64)
        base = np.asarray(decoder["baseline"], dtype=np.float64)
        slope = np.asarray(decoder["slope"], dtype=np.float64)
        offset = np.asarray(decoder["offset"], dtype=np.float64)
        logits = np.broadcast_to(base, (z.shape[0], base.size)).copy()
        on = program >= 0
        u = z[:, program[on]] + offset[on]
        # smooth leaky map: (1 - leak)·softplus(u) + leak·u, slope in [leak, 1]: strictly monotone
        logits[:, on] += slope[on] * ((1.0 - leak) * np.logaddexp(0.0, u) + leak * u)
        return logits
    if kind == "mlp":
        W1, b1 = np.asarray(decoder["W1"], np.float64), np.asarray(decoder["b1"], np.float64)
        W2, b2 = np.asarray(decoder["W2"], np.float64), np.asarray(decoder["b2"], np.float64)
        return _leaky(z @ W1.T + b1, leak) @ W2.T + b2
    if kind == "dense":
        n_layers = int(decoder["n_layers"])
        h = z
        for i in range(1, n_layers + 1):
            h = h @ np.asarray(decoder[f"W{i}"], np.float64).T
            if i < n_layers:
                h = _leaky(h, leak)
        return h / np.asarray(decoder["scale"], np.float64)
    raise SamsError(f"Unknown decoder kind {kind!r} in the simulation truth. It was not written by sams_core.simulate.")


def sample_counts(
    rng: np.random.Generator,
    z: np.ndarray,
    decoder: dict[str, Any],
    library: np.ndarray,
    theta: np.ndarray,
) -> sp.csr_matrix:
    """NB(mean = library × softmax(decoder(z)), inverse dispersion θ) counts, built in row blocks."""
    N, G = z.shape[0], theta.size
    rows = max(256, _BLOCK_ENTRIES // max(G, 1))
    blocks = []
    for s in range(0, N, rows):
        e = min(N, s + rows)
        mu = softmax_rows(decode(decoder, z[s:e])) * library[s:e, None]
        rate = rng.gamma(theta[None, :], mu / theta[None, :])  # Gamma-Poisson mixture = NB
        blocks.append(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, G), dtype=np.float32)
    X.sort_indices()
    return X.astype(np.float32)


# --------------------------------------------------------------------------- the AnnData layout


def str_array(values: Sequence[str]) -> np.ndarray:
    """A numpy string array (also for an empty list, which h5ad can store)."""
    return np.array(list(values), dtype=str) if len(values) else np.array([], dtype="<U1")


def to_adata(
    X: sp.csr_matrix | np.ndarray,
    labels: list[str],
    genes: list[str],
    program_of_gene: np.ndarray,
    z_b: np.ndarray,
    z: np.ndarray,
    rng: np.random.Generator,
    n_batches: int,
    truth: dict[str, Any],
):
    """The simulated screen as AnnData (layout in the package docstring).

    Counts (sparse ``X``) are also stored in ``layers["counts"]`` with ``obs["library_size"]``;
    real values (dense ``X``, the Gaussian reference kind) have neither, so the data contract
    reads them as log-normalised-like values with a Gaussian likelihood.
    """
    import anndata as ad  # heavy optional import: only when a screen is built

    N = len(labels)
    a = ad.AnnData(X=X)
    if sp.issparse(X):
        a.layers["counts"] = X.copy()
    a.obs_names = [f"cell{i:06d}" for i in range(N)]
    a.var_names = genes
    a.obs["perturbation"] = pd.Categorical(labels)
    if sp.issparse(X):
        a.obs["library_size"] = np.asarray(X.sum(1), dtype=np.float32).ravel()
    batches = [f"batch{b + 1}" for b in range(n_batches)]
    a.obs["batch"] = pd.Categorical(np.asarray(batches)[rng.integers(0, n_batches, N)], categories=batches)
    a.var["program"] = program_of_gene.astype(np.int64)
    a.obsm["X_true_basal"] = np.asarray(z_b, dtype=np.float32)
    a.obsm["X_true_latent"] = np.asarray(z, dtype=np.float32)
    a.uns["sams_truth"] = truth
    return a
