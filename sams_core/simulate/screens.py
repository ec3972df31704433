"""Simulated perturbation screens with a known answer key.

Two simulators, both numpy-only and deterministic for a seed (``np.random.default_rng(seed)``):

- :func:`simulate_sams_screen` follows SAMS-VAE's generative story (Bereket & Karaletsos 2023):
  every single perturbation moves a sparse set of latent units, a combination's latent shift is
  the sum of its members' shifts, and each latent unit drives its own program of genes.
- :func:`simulate_svae_screen` follows sVAE+ (Lopez et al. 2023): one perturbation per cell,
  z ~ N(m_a ⊙ μ_a, I), an injective leaky-ReLU decoder, no combinations.

Both return an :class:`anndata.AnnData` that loads through the normal data contract
(``sams_core.data.screen``), with the answer key in ``uns["sams_truth"]``:

==========================  ==============================================================
``X``, ``layers["counts"]``  counts, ``scipy.sparse.csr_matrix`` float32 holding integers
``obs["perturbation"]``      ``"control"``, a single (``"KLF1"``) or a pair (``"GATA1+KLF1"``,
                             members in the order of the singles list)
``obs["library_size"]``      total counts of the cell
``obs["batch"]``             a covariate with no effect (``batch1``, ``batch2``, ...)
``var["program"]``           latent unit driving the gene (-1: background gene)
``obsm["X_true_basal"]``     basal state z_b (N × K float32)
``obsm["X_true_latent"]``    z = z_b + shift (N × K float32)
``uns["sams_truth"]``        masks, effects, combinations, held-out suggestion, gene
                             programs, decoder parameters, seed and parameters
==========================  ==============================================================

Perturbations carry real human gene symbols (taken from a fixed list, then sorted so that the
singles list, the mask rows and the data loader's perturbation order are the same); genes carry
obviously synthetic names (``P03_G012``: gene 12 of the program of unit 3; ``BG_G004``: a
background gene; ``SV_G0042`` in sVAE screens) so nobody mistakes them for real genes.
:func:`truth_from_adata` reads the answer key back, also after an ``.h5ad`` round trip.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sams_core.errors import SamsError

__all__ = [
    "PERTURBATION_SYMBOLS",
    "SimulationTruth",
    "combination_shift",
    "perturbation_names",
    "simulate_main",
    "simulate_sams_screen",
    "simulate_svae_screen",
    "true_proportions",
    "truth_from_adata",
    "truth_masks_for",
]

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

#: Labels that mean "no perturbation" (lower case), as in the data contract.
_CONTROL_WORDS = frozenset({"control", "ctrl", "non-targeting", "nontargeting", "non_targeting", "nt", "dmso", ""})

#: Slope of the linear part of the SAMS decoder's smooth leaky map (keeps it strictly monotone).
_SAMS_LEAK = 0.25
#: Negative slope of the sVAE decoder's leaky ReLU.
_SVAE_LEAK = 0.2
#: Count-matrix entries generated per block (bounds memory at large sizes).
_BLOCK_ENTRIES = 1 << 22


@dataclass
class SimulationTruth:
    """The answer key of a simulated screen (what ``uns["sams_truth"]`` holds).

    Attributes:
        kind: ``"sams"`` or ``"svae"``.
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
        decoder: the decoder's parameters (see :func:`true_proportions`).
        inverse_dispersion: (G,) negative-binomial inverse dispersion θ of each gene.
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

    @property
    def n_latent(self) -> int:
        """Number of true latent units K."""
        return int(self.masks.shape[1])

    @property
    def n_perturbations(self) -> int:
        """Number of single perturbations T."""
        return int(self.masks.shape[0])


# --------------------------------------------------------------------------- helpers


def perturbation_names(n: int) -> list[str]:
    """``n`` human-readable perturbation names: the first ``n`` real gene symbols of
    :data:`PERTURBATION_SYMBOLS`, then ``PERT150``, ``PERT151``, ... (in list order, unsorted)."""
    base = list(PERTURBATION_SYMBOLS[:n])
    return base + [f"PERT{i:03d}" for i in range(len(base), n)]


def _need_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SamsError(f"{name} must be an integer ≥ {minimum}, got {value!r}.")
    return int(value)


def _need_float(name: str, value: Any, low: float, high: float = np.inf, open_low: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SamsError(f"{name} must be a number, got {value!r}.") from None
    if not np.isfinite(v) or v > high or v < low or (open_low and v == low):
        bound = f"> {low:g}" if open_low else f"≥ {low:g}"
        upper = "" if high == np.inf else f" and ≤ {high:g}"
        raise SamsError(f"{name} must be {bound}{upper}, got {value!r}.")
    return v


def _check_targets(targets: Sequence[int], K: int) -> tuple[int, int]:
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


def _draw_masks(rng: np.random.Generator, T: int, K: int, targets: tuple[int, int]) -> np.ndarray:
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


def _draw_effects(rng: np.random.Generator, masks: np.ndarray, mean: float, sd: float) -> np.ndarray:
    """±N(mean, sd²) on the mask, 0 elsewhere (float32)."""
    size = rng.normal(mean, sd, masks.shape)
    sign = rng.choice(np.array([-1.0, 1.0]), masks.shape)
    return (masks * size * sign).astype(np.float32)


def _draw_pairs(rng: np.random.Generator, T: int, n: int) -> list[tuple[int, int]]:
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


def _library_median(library_mean: float | None, library_sd: float, n_genes: int) -> float:
    """Median of the log-normal library size; the default mean is 2,500 UMIs at 200 genes, ∝ √G."""
    mean = 2500.0 * np.sqrt(n_genes / 200.0) if library_mean is None else float(library_mean)
    return float(mean * np.exp(-0.5 * library_sd**2))


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    return p


def _decode_logits(decoder: dict[str, Any], z: np.ndarray) -> np.ndarray:
    """Per-gene logits (before the softmax) of latent states ``z`` (n × K)."""
    z = np.asarray(z, dtype=np.float64)
    kind = str(decoder["kind"])
    if kind == "programs":
        program = np.asarray(decoder["program"], dtype=np.int64)
        base = np.asarray(decoder["baseline"], dtype=np.float64)
        slope = np.asarray(decoder["slope"], dtype=np.float64)
        offset = np.asarray(decoder["offset"], dtype=np.float64)
        leak = float(decoder["leak"])
        logits = np.broadcast_to(base, (z.shape[0], base.size)).copy()
        on = program >= 0
        u = z[:, program[on]] + offset[on]
        # smooth leaky map: (1 - leak)·softplus(u) + leak·u, slope in [leak, 1]: strictly monotone
        logits[:, on] += slope[on] * ((1.0 - leak) * np.logaddexp(0.0, u) + leak * u)
        return logits
    if kind == "mlp":
        W1, b1 = np.asarray(decoder["W1"], np.float64), np.asarray(decoder["b1"], np.float64)
        W2, b2 = np.asarray(decoder["W2"], np.float64), np.asarray(decoder["b2"], np.float64)
        leak = float(decoder["leak"])
        h = z @ W1.T + b1
        h = np.where(h > 0, h, leak * h)
        return h @ W2.T + b2
    raise SamsError(f"Unknown decoder kind {kind!r} in the simulation truth.")


def _sample_counts(
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
        mu = _softmax_rows(_decode_logits(decoder, z[s:e])) * library[s:e, None]
        rate = rng.gamma(theta[None, :], mu / theta[None, :])  # Gamma-Poisson mixture = NB
        blocks.append(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, G), dtype=np.float32)
    X.sort_indices()
    return X.astype(np.float32)


def _to_adata(
    X: sp.csr_matrix,
    labels: list[str],
    genes: list[str],
    program_of_gene: np.ndarray,
    z_b: np.ndarray,
    z: np.ndarray,
    rng: np.random.Generator,
    n_batches: int,
    truth: dict[str, Any],
):
    import anndata as ad

    N = len(labels)
    a = ad.AnnData(X=X)
    a.layers["counts"] = X.copy()
    a.obs_names = [f"cell{i:06d}" for i in range(N)]
    a.var_names = genes
    a.obs["perturbation"] = pd.Categorical(labels)
    a.obs["library_size"] = np.asarray(X.sum(1), dtype=np.float32).ravel()
    batches = [f"batch{b + 1}" for b in range(n_batches)]
    a.obs["batch"] = pd.Categorical(np.asarray(batches)[rng.integers(0, n_batches, N)], categories=batches)
    a.var["program"] = program_of_gene.astype(np.int64)
    a.obsm["X_true_basal"] = np.asarray(z_b, dtype=np.float32)
    a.obsm["X_true_latent"] = np.asarray(z, dtype=np.float32)
    a.uns["sams_truth"] = truth
    return a


def _str_array(values: Sequence[str]) -> np.ndarray:
    return np.array(list(values), dtype=str) if len(values) else np.array([], dtype="<U1")


# --------------------------------------------------------------------------- simulators


def simulate_sams_screen(
    n_perturbations: int = 30,
    n_latent: int = 10,
    n_genes: int = 200,
    n_combinations: int = 40,
    cells_per_perturbation: int = 100,
    n_control: int | None = None,
    targets_per_perturbation: tuple[int, int] = (1, 3),
    effect_mean: float = 5.0,
    effect_sd: float = 0.5,
    library_mean: float | None = None,
    library_sd: float = 0.35,
    dispersion: float = 5.0,
    heldout_fraction: float = 0.25,
    seed: int = 0,
    cells_per_combination: int | None = None,
    background_fraction: float = 0.1,
    dispersion_sd: float = 0.5,
    n_batches: int = 2,
):
    """Simulate a SAMS-style screen: sparse masks, additive combinations, one gene program per unit.

    Generative story (T singles, K latent units, G genes):

    - each single perturbation t acts on ``targets_per_perturbation`` (uniform between the
      fewest and the most, so 2 on average for (1, 3)) latent units; every unit is targeted by
      some perturbation when there are enough targets. Its effect on a target is
      ±N(``effect_mean``, ``effect_sd``²) with a random sign, 0 elsewhere (``embeddings``);
    - ``n_combinations`` distinct pairs of singles; a pair's latent shift is the sum of its
      members' shifts; a ``heldout_fraction`` of the pairs (seeded) is suggested as held out;
    - each cell: basal state z_b ~ N(0, I_K), z = z_b + shift of its condition (0 for controls);
    - genes: a ``background_fraction`` of the genes has a constant baseline; the others are
      split into K disjoint programs of (nearly) equal size. A program-k gene's logit is
      baseline_g + a_g·((1 − λ)·softplus(z_k + b_g) + λ·(z_k + b_g)) with λ = 0.25 and a random
      slope a_g of random sign: strictly monotone in z_k and nonlinear, so unit k drives exactly
      its program and the decoder is injective (given at least one background gene).
      Baselines vary (some genes high, many low). Proportions = softmax over genes;
    - counts ~ NB(mean = library × proportion, inverse dispersion θ_g), θ_g log-normal around
      ``dispersion`` (spread ``dispersion_sd`` on the log scale; lower θ is noisier); library
      sizes log-normal with mean ``library_mean`` UMIs (default 2,500 × √(G/200)) and log-scale
      sd ``library_sd``.

    Args:
        n_perturbations: number of single perturbations T.
        n_latent: number of latent units K.
        n_genes: number of genes G (needs at least K program genes).
        n_combinations: number of simulated two-perturbation combinations (≤ T(T−1)/2).
        cells_per_perturbation: cells of each single perturbation.
        n_control: control cells (default 2 × ``cells_per_perturbation``).
        targets_per_perturbation: (fewest, most) latent units a single acts on.
        effect_mean, effect_sd: size of an effect on a targeted unit.
        library_mean, library_sd: library-size distribution (see above).
        dispersion: median NB inverse dispersion θ of the genes.
        heldout_fraction: share of combinations listed in ``heldout_combinations``.
        seed: random seed; the same seed gives the same screen.
        cells_per_combination: cells of each combination (default ``cells_per_perturbation``).
        background_fraction: share of genes in no program.
        dispersion_sd: spread of log θ across genes.
        n_batches: levels of the no-effect covariate ``obs["batch"]``.

    Returns:
        AnnData following the contract in this module's docstring; cells are ordered controls,
        singles, combinations.
    """
    T = _need_int("n_perturbations", n_perturbations, 1)
    K = _need_int("n_latent", n_latent, 1)
    G = _need_int("n_genes", n_genes, 1)
    C = _need_int("n_combinations", n_combinations, 0)
    n_single = _need_int("cells_per_perturbation", cells_per_perturbation, 1)
    n_ctrl = _need_int("n_control", 2 * n_single if n_control is None else n_control, 1)
    n_combo = _need_int("cells_per_combination", n_single if cells_per_combination is None else cells_per_combination, 1)
    n_batches = _need_int("n_batches", n_batches, 1)
    seed = _need_int("seed", seed, 0)
    lo, hi = _check_targets(targets_per_perturbation, K)
    effect_mean = _need_float("effect_mean", effect_mean, 0.0)
    effect_sd = _need_float("effect_sd", effect_sd, 0.0)
    library_sd = _need_float("library_sd", library_sd, 0.0)
    if library_mean is not None:
        library_mean = _need_float("library_mean", library_mean, 0.0, open_low=True)
    dispersion = _need_float("dispersion", dispersion, 0.0, open_low=True)
    dispersion_sd = _need_float("dispersion_sd", dispersion_sd, 0.0)
    heldout_fraction = _need_float("heldout_fraction", heldout_fraction, 0.0, 1.0)
    background_fraction = _need_float("background_fraction", background_fraction, 0.0, 1.0)
    max_pairs = T * (T - 1) // 2
    if C > max_pairs:
        raise SamsError(
            f"{C} combinations requested but {T} perturbations make only {max_pairs} distinct pairs. "
            f"Ask for at most {max_pairs} combinations or more perturbations."
        )
    n_bg = int(round(background_fraction * G))
    if G - n_bg < K:
        raise SamsError(
            f"Only {G - n_bg} of {G} genes are left for {K} gene programs (one gene per unit at least). "
            "Raise n_genes or lower background_fraction."
        )

    rng = np.random.default_rng(seed)
    names = sorted(perturbation_names(T))  # the singles list: sorted like the data loader's
    masks = _draw_masks(rng, T, K, (lo, hi))
    emb = _draw_effects(rng, masks, effect_mean, effect_sd)
    pairs = _draw_pairs(rng, T, C)
    combos = [f"{names[i]}+{names[j]}" for i, j in pairs]
    n_held = int(round(heldout_fraction * len(combos)))
    if heldout_fraction > 0 and combos:
        n_held = max(1, n_held)
    heldout = sorted(rng.choice(combos, n_held, replace=False).tolist()) if n_held else []

    # conditions → cells
    labels = ["control"] * n_ctrl
    cond_shift = [np.zeros(K, np.float32)]
    cond_n = [n_ctrl]
    for t in range(T):
        labels += [names[t]] * n_single
        cond_shift.append(emb[t])
        cond_n.append(n_single)
    for (i, j), lab in zip(pairs, combos):
        labels += [lab] * n_combo
        cond_shift.append(emb[i] + emb[j])
        cond_n.append(n_combo)
    shift = np.repeat(np.stack(cond_shift), cond_n, axis=0)
    N = shift.shape[0]
    z_b = rng.normal(size=(N, K)).astype(np.float32)
    z = z_b + shift

    # gene programs: background genes, then K programs of (nearly) equal size, in random gene order
    program_of_gene = np.full(G, -1, dtype=np.int64)
    program_of_gene[n_bg:] = np.arange(G - n_bg) % K
    program_of_gene = program_of_gene[rng.permutation(G)]
    genes: list[str] = []
    counters = {k: 0 for k in range(-1, K)}
    for k in program_of_gene.tolist():
        genes.append(f"BG_G{counters[k]:03d}" if k < 0 else f"P{k:02d}_G{counters[k]:03d}")
        counters[k] += 1
    decoder = {
        "kind": "programs",
        "program": program_of_gene,
        "baseline": rng.normal(0.0, 1.5, G).astype(np.float32),  # log scale: some genes high, many low
        "slope": (rng.uniform(0.3, 0.7, G) * rng.choice(np.array([-1.0, 1.0]), G)).astype(np.float32),
        "offset": rng.normal(0.0, 1.0, G).astype(np.float32),
        "leak": _SAMS_LEAK,
    }
    theta = (dispersion * np.exp(rng.normal(0.0, dispersion_sd, G))).astype(np.float64)
    library = np.maximum(rng.lognormal(np.log(_library_median(library_mean, library_sd, G)), library_sd, N), 50.0)
    X = _sample_counts(rng, z, decoder, library, theta)

    programs = {f"PROGRAM_U{k:02d}": _str_array([genes[g] for g in np.flatnonzero(program_of_gene == k)]) for k in range(K)}
    truth = {
        "kind": "sams",
        "perturbations": _str_array(names),
        "masks": masks,
        "embeddings": emb,
        "combinations": _str_array(combos),
        "heldout_combinations": _str_array(heldout),
        "programs": programs,
        "decoder": decoder,
        "inverse_dispersion": theta.astype(np.float32),
        "seed": seed,
        "params": {
            "n_perturbations": T, "n_latent": K, "n_genes": G, "n_combinations": C,
            "cells_per_perturbation": n_single, "cells_per_combination": n_combo, "n_control": n_ctrl,
            "min_targets": lo, "max_targets": hi, "effect_mean": effect_mean, "effect_sd": effect_sd,
            "library_mean": 2500.0 * float(np.sqrt(G / 200.0)) if library_mean is None else library_mean,
            "library_sd": library_sd, "dispersion": dispersion, "dispersion_sd": dispersion_sd,
            "heldout_fraction": heldout_fraction, "background_fraction": background_fraction,
            "n_batches": n_batches, "n_cells": N,
        },
    }
    return _to_adata(X, labels, genes, program_of_gene, z_b, z, rng, n_batches, truth)


def simulate_svae_screen(
    n_perturbations: int = 20,
    n_latent: int = 10,
    n_genes: int = 200,
    cells_per_perturbation: int = 200,
    n_control: int | None = None,
    targets_per_perturbation: tuple[int, int] = (1, 3),
    effect_mean: float = 5.0,
    effect_sd: float = 0.5,
    seed: int = 0,
    library_mean: float | None = None,
    library_sd: float = 0.35,
    dispersion: float = 5.0,
    dispersion_sd: float = 0.5,
    n_batches: int = 2,
):
    """Simulate an sVAE+-style screen (Lopez et al. 2023): one perturbation per cell, no combinations.

    Each perturbation a acts on ``targets_per_perturbation`` distinct latent units with shift
    μ_a = ±N(``effect_mean``, ``effect_sd``²) there (0 elsewhere); a cell of a has
    z ~ N(m_a ⊙ μ_a, I_K) (controls: N(0, I_K)). The decoder is an injective leaky-ReLU network
    K → 2K → G: the first layer has orthonormal columns (full column rank), the leaky ReLU
    (negative slope 0.2) is a bijection, and the output layer has full column rank with columns
    orthogonal to the all-ones vector, so the softmax over genes stays injective. Counts are
    NB(library × softmax, θ_g) with log-normal library sizes, as in :func:`simulate_sams_screen`.

    Args:
        n_perturbations: number of perturbations T.
        n_latent: number of latent units K.
        n_genes: number of genes G (at least 2K + 1 for an injective decoder).
        cells_per_perturbation: cells of each perturbation.
        n_control: control cells (default ``cells_per_perturbation``).
        targets_per_perturbation: (fewest, most) latent units a perturbation acts on.
        effect_mean, effect_sd: size of the shift on a targeted unit.
        seed: random seed.
        library_mean, library_sd, dispersion, dispersion_sd, n_batches: as in
            :func:`simulate_sams_screen`.

    Returns:
        AnnData following the module's contract; ``var["program"]`` is -1 for every gene (the
        decoder is dense) and the truth has no combinations and no programs.
    """
    T = _need_int("n_perturbations", n_perturbations, 1)
    K = _need_int("n_latent", n_latent, 1)
    G = _need_int("n_genes", n_genes, 1)
    n_single = _need_int("cells_per_perturbation", cells_per_perturbation, 1)
    n_ctrl = _need_int("n_control", n_single if n_control is None else n_control, 1)
    n_batches = _need_int("n_batches", n_batches, 1)
    seed = _need_int("seed", seed, 0)
    lo, hi = _check_targets(targets_per_perturbation, K)
    effect_mean = _need_float("effect_mean", effect_mean, 0.0)
    effect_sd = _need_float("effect_sd", effect_sd, 0.0)
    library_sd = _need_float("library_sd", library_sd, 0.0)
    if library_mean is not None:
        library_mean = _need_float("library_mean", library_mean, 0.0, open_low=True)
    dispersion = _need_float("dispersion", dispersion, 0.0, open_low=True)
    dispersion_sd = _need_float("dispersion_sd", dispersion_sd, 0.0)
    if G < 2 * K + 1:
        raise SamsError(
            f"n_genes must be at least 2 × n_latent + 1 = {2 * K + 1} for an injective decoder "
            f"(got n_genes={G}, n_latent={K}). Raise n_genes or lower n_latent."
        )

    rng = np.random.default_rng(seed)
    names = sorted(perturbation_names(T))
    masks = _draw_masks(rng, T, K, (lo, hi))
    emb = _draw_effects(rng, masks, effect_mean, effect_sd)
    labels = ["control"] * n_ctrl + [names[t] for t in range(T) for _ in range(n_single)]
    shift = np.repeat(np.vstack([np.zeros((1, K), np.float32), emb]), [n_ctrl] + [n_single] * T, axis=0)
    N = shift.shape[0]
    z_b = rng.normal(size=(N, K)).astype(np.float32)
    z = z_b + shift

    H = 2 * K
    W1 = np.linalg.qr(rng.normal(size=(H, K)))[0] * 1.5  # orthonormal columns × 1.5: full column rank
    W2 = rng.normal(0.0, 1.0 / np.sqrt(H), size=(G, H))
    W2 -= W2.mean(0, keepdims=True)  # columns ⟂ 1: softmax(W2 h + b) is injective in h
    decoder = {
        "kind": "mlp",
        "W1": W1.astype(np.float32),
        "b1": rng.normal(0.0, 0.5, H).astype(np.float32),
        "W2": W2.astype(np.float32),
        "b2": rng.normal(0.0, 1.5, G).astype(np.float32),
        "leak": _SVAE_LEAK,
    }
    theta = (dispersion * np.exp(rng.normal(0.0, dispersion_sd, G))).astype(np.float64)
    library = np.maximum(rng.lognormal(np.log(_library_median(library_mean, library_sd, G)), library_sd, N), 50.0)
    X = _sample_counts(rng, z, decoder, library, theta)
    genes = [f"SV_G{g:04d}" for g in range(G)]
    truth = {
        "kind": "svae",
        "perturbations": _str_array(names),
        "masks": masks,
        "embeddings": emb,
        "combinations": _str_array([]),
        "heldout_combinations": _str_array([]),
        "programs": {},
        "decoder": decoder,
        "inverse_dispersion": theta.astype(np.float32),
        "seed": seed,
        "params": {
            "n_perturbations": T, "n_latent": K, "n_genes": G, "cells_per_perturbation": n_single,
            "n_control": n_ctrl, "min_targets": lo, "max_targets": hi, "effect_mean": effect_mean,
            "effect_sd": effect_sd,
            "library_mean": 2500.0 * float(np.sqrt(G / 200.0)) if library_mean is None else library_mean,
            "library_sd": library_sd, "dispersion": dispersion, "dispersion_sd": dispersion_sd,
            "n_batches": n_batches, "n_cells": N,
        },
    }
    return _to_adata(X, labels, genes, np.full(G, -1, dtype=np.int64), z_b, z, rng, n_batches, truth)


# --------------------------------------------------------------------------- reading the truth


def _scalar(v: Any) -> Any:
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode()
    return v


def _strings(v: Any) -> np.ndarray:
    arr = np.asarray(v if v is not None else [], dtype=object).ravel()
    return np.array([str(_scalar(x)) for x in arr], dtype=str) if arr.size else np.array([], dtype="<U1")


def truth_from_adata(adata) -> SimulationTruth:
    """The answer key a simulator stored in ``adata.uns["sams_truth"]`` (also after an .h5ad round trip)."""
    uns = getattr(adata, "uns", None)
    if uns is None or "sams_truth" not in uns:
        raise SamsError("This data has no simulation truth (uns['sams_truth']). Only simulated screens carry one.")
    t = uns["sams_truth"]
    missing = [k for k in ("kind", "perturbations", "masks", "embeddings", "combinations", "seed") if k not in t]
    if missing:
        raise SamsError(f"uns['sams_truth'] lacks {', '.join(missing)}: it was not written by sams_core.simulate.")
    masks = np.asarray(t["masks"]).astype(np.int8)
    emb = np.asarray(t["embeddings"], dtype=np.float32)
    perts = _strings(t["perturbations"])
    if masks.ndim != 2 or emb.shape != masks.shape or perts.size != masks.shape[0]:
        raise SamsError(
            f"uns['sams_truth'] is inconsistent: masks {masks.shape}, embeddings {emb.shape}, "
            f"{perts.size} perturbation names."
        )
    programs = {str(k): [str(g) for g in _strings(v)] for k, v in dict(t.get("programs", {}) or {}).items()}
    decoder = {str(k): (_scalar(v) if np.ndim(v) == 0 else np.asarray(v)) for k, v in dict(t.get("decoder", {}) or {}).items()}
    theta = t.get("inverse_dispersion")
    return SimulationTruth(
        kind=str(_scalar(t["kind"])),
        perturbations=perts,
        masks=masks,
        embeddings=emb,
        combinations=_strings(t["combinations"]),
        heldout_combinations=_strings(t.get("heldout_combinations", [])),
        program_sets=programs,
        unit_of_program={k: int(k.rsplit("U", 1)[1]) for k in programs},
        seed=int(_scalar(t["seed"])),
        params={str(k): _scalar(v) for k, v in dict(t.get("params", {}) or {}).items()},
        decoder=decoder,
        inverse_dispersion=None if theta is None else np.asarray(theta, dtype=np.float32),
    )


def combination_shift(truth: SimulationTruth, label: str) -> np.ndarray:
    """The true latent shift (K,) of a condition label.

    ``"control"`` (or ctrl / non-targeting / NT / DMSO) → 0; ``"A"`` → e_A; ``"A+B"`` → e_A + e_B
    in any member order; ``"A:0.5+B"`` scales A's shift by the dosage 0.5.
    """
    idx = {p: i for i, p in enumerate(truth.perturbations.tolist())}
    out = np.zeros(truth.n_latent, dtype=np.float32)
    text = str(label).strip()
    if text.lower() in _CONTROL_WORDS:
        return out
    for part in text.split("+"):
        name, _, dose = part.strip().partition(":")
        if name.lower() in _CONTROL_WORDS:
            continue
        if name not in idx:
            raise SamsError(f"{name!r} (in {label!r}) is not a simulated perturbation. Known: {', '.join(list(idx)[:8])}, ...")
        try:
            d = float(dose) if dose else 1.0
        except ValueError:
            raise SamsError(f"Dosage {dose!r} in {label!r} is not a number. Write NAME:DOSE, e.g. KLF1:0.5.") from None
        out += np.float32(d) * truth.embeddings[idx[name]]
    return out


def truth_masks_for(truth: SimulationTruth, names: Sequence[str]) -> np.ndarray:
    """True mask rows (int8) in the order of ``names`` (e.g. a model's perturbation list)."""
    idx = {p: i for i, p in enumerate(truth.perturbations.tolist())}
    missing = [n for n in names if n not in idx]
    if missing:
        raise SamsError(f"Perturbations not in the simulation: {', '.join(map(str, missing[:5]))}.")
    return truth.masks[[idx[n] for n in names]]


def true_proportions(truth: SimulationTruth, z: np.ndarray) -> np.ndarray:
    """The decoder's expected gene proportions (n × G, rows sum to 1) for latent states ``z`` (n × K).

    Genes are in the simulated ``var_names`` order; multiply by a library size for mean counts.
    """
    if not truth.decoder:
        raise SamsError("This simulation truth carries no decoder parameters.")
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    if z.shape[1] != truth.n_latent:
        raise SamsError(f"z has {z.shape[1]} columns but the simulation has {truth.n_latent} latent units.")
    return _softmax_rows(_decode_logits(truth.decoder, z))


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m sams_core simulate",
        description=(
            "Simulate a single-cell perturbation screen with a known answer key (masks, effects, "
            "true latents, gene programs) and write it as .h5ad. Counts are in X and "
            "layers['counts'], labels in obs['perturbation'], the truth in uns['sams_truth']."
        ),
    )
    ap.add_argument("--kind", choices=["sams", "svae"], default="sams",
                    help="sams: sparse masks, additive two-perturbation combinations and one gene program per "
                         "latent unit (SAMS-VAE paper); svae: one perturbation per cell, no combinations, "
                         "dense injective decoder (sVAE+ paper). Default sams.")
    ap.add_argument("--perturbations", type=int, default=None, help="number of single perturbations T (default 30 for sams, 20 for svae)")
    ap.add_argument("--latent", type=int, default=10, help="number of latent units K (default 10)")
    ap.add_argument("--genes", type=int, default=200, help="number of genes G (default 200)")
    ap.add_argument("--combinations", type=int, default=40, help="number of two-perturbation combinations, sams only (default 40)")
    ap.add_argument("--cells", type=int, default=None, help="cells per perturbation (default 100 for sams, 200 for svae)")
    ap.add_argument("--combination-cells", type=int, default=None, help="cells per combination, sams only (default: --cells)")
    ap.add_argument("--controls", type=int, default=None, help="control cells (default: 2 × --cells for sams, --cells for svae)")
    ap.add_argument("--min-targets", type=int, default=1, help="fewest latent units a perturbation acts on (default 1)")
    ap.add_argument("--max-targets", type=int, default=3, help="most latent units a perturbation acts on (default 3)")
    ap.add_argument("--effect-mean", type=float, default=5.0, help="mean size of an effect on a targeted unit, sign random (default 5)")
    ap.add_argument("--effect-sd", type=float, default=0.5, help="standard deviation of effect sizes (default 0.5)")
    ap.add_argument("--library", type=float, default=None, help="mean library size in UMIs per cell (default 2500 × √(genes/200))")
    ap.add_argument("--library-sd", type=float, default=0.35, help="standard deviation of log library size (default 0.35)")
    ap.add_argument("--dispersion", type=float, default=5.0, help="median negative-binomial inverse dispersion θ of the genes; lower is noisier (default 5)")
    ap.add_argument("--dispersion-sd", type=float, default=0.5, help="spread of log θ across genes (default 0.5)")
    ap.add_argument("--background-fraction", type=float, default=0.1, help="share of genes in no gene program, sams only (default 0.1)")
    ap.add_argument("--heldout-fraction", type=float, default=0.25, help="share of combinations suggested as held out, sams only (default 0.25)")
    ap.add_argument("--batches", type=int, default=2, help="levels of the no-effect covariate obs['batch'] (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same file (default 0)")
    ap.add_argument("--out", required=True, metavar="FILE.h5ad", help="output .h5ad file (its folder must exist)")
    return ap


def simulate_main(argv: list[str] | None = None) -> int:
    """``python -m sams_core simulate ...``: write a simulated screen to an .h5ad file.

    Prints a one-line summary on stdout and returns 0; a bad option prints ``error: ...`` on
    stderr and returns 2.
    """
    args = _parser().parse_args(argv)
    try:
        out = Path(args.out)
        if not out.parent.exists():
            raise SamsError(f"The folder {str(out.parent)!r} does not exist. Create it or choose another --out.")
        t0 = time.perf_counter()
        common = dict(
            n_latent=args.latent, n_genes=args.genes, n_control=args.controls,
            targets_per_perturbation=(args.min_targets, args.max_targets), effect_mean=args.effect_mean,
            effect_sd=args.effect_sd, seed=args.seed, library_mean=args.library, library_sd=args.library_sd,
            dispersion=args.dispersion, dispersion_sd=args.dispersion_sd, n_batches=args.batches,
        )
        if args.kind == "sams":
            a = simulate_sams_screen(
                n_perturbations=30 if args.perturbations is None else args.perturbations,
                n_combinations=args.combinations,
                cells_per_perturbation=100 if args.cells is None else args.cells,
                cells_per_combination=args.combination_cells, heldout_fraction=args.heldout_fraction,
                background_fraction=args.background_fraction, **common,
            )
        else:
            a = simulate_svae_screen(
                n_perturbations=20 if args.perturbations is None else args.perturbations,
                cells_per_perturbation=200 if args.cells is None else args.cells, **common,
            )
        a.write_h5ad(out)
    except SamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tr = truth_from_adata(a)
    zeros = 1.0 - a.X.nnz / max(1, a.n_obs * a.n_vars)
    print(
        f"wrote {out}: {args.kind} screen, {a.n_obs} cells × {a.n_vars} genes, {tr.n_perturbations} perturbations, "
        f"{len(tr.combinations)} combinations, K={tr.n_latent}, {zeros:.0%} zeros, median library "
        f"{np.median(a.obs['library_size']):.0f}, seed {tr.seed} ({time.perf_counter() - t0:.1f} s)"
    )
    return 0
