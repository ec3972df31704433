"""Simulated perturbation screens with a known answer key.

:func:`simulate_sams_screen` follows SAMS-VAE's generative story (sparse masks, additive
combinations, gene programs driven by latent units); :func:`simulate_svae_screen` follows sVAE+
(one perturbation per cell, z ~ N(m ⊙ μ, I), injective leaky-ReLU decoder). Both return AnnData
that loads through the normal data contract, with the truth in ``uns["sams_truth"]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sams_core.errors import SamsError

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
)


@dataclass
class SimulationTruth:
    """The answer key of a simulated screen."""

    kind: str
    perturbations: list[str]
    masks: np.ndarray  # [T, K] 0/1
    embeddings: np.ndarray  # [T, K] shift of each single (zero off-mask)
    combinations: list[str]
    heldout_combinations: list[str]
    program_sets: dict[str, list[str]]  # program name → genes
    unit_of_program: dict[str, int]
    seed: int
    params: dict[str, Any]

    @property
    def n_latent(self) -> int:
        return int(self.masks.shape[1])


def perturbation_names(n: int) -> list[str]:
    """``n`` human-readable perturbation names (real gene symbols, then PERTnnn)."""
    base = list(PERTURBATION_SYMBOLS[:n])
    return base + [f"PERT{i:03d}" for i in range(len(base), n)]


def _draw_masks(rng: np.random.Generator, T: int, K: int, targets: tuple[int, int]) -> np.ndarray:
    lo, hi = targets
    if lo < 1 or hi < lo or hi > K:
        raise SamsError(f"targets_per_perturbation must satisfy 1 ≤ low ≤ high ≤ n_latent, got {targets} with K={K}.")
    masks = np.zeros((T, K), dtype=np.int8)
    order = rng.permutation(K)
    for t in range(T):
        n = int(rng.integers(lo, hi + 1))
        first = order[t % K]  # cycle through units so each is targeted when T ≥ K
        others = rng.choice([k for k in range(K) if k != first], size=n - 1, replace=False) if n > 1 else []
        masks[t, [first, *others]] = 1
    return masks


def _draw_effects(rng: np.random.Generator, masks: np.ndarray, mean: float, sd: float) -> np.ndarray:
    size = rng.normal(mean, sd, masks.shape)
    sign = rng.choice([-1.0, 1.0], masks.shape)
    return (masks * size * sign).astype(np.float32)


def _nb_counts(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    rate = rng.gamma(theta[None, :], mu / theta[None, :])
    return rng.poisson(rate).astype(np.float32)


def _library(rng: np.random.Generator, n: int, median: float, sd: float) -> np.ndarray:
    return np.maximum(rng.lognormal(np.log(median), sd, n), 50.0)


def _to_adata(
    counts: np.ndarray,
    labels: list[str],
    genes: list[str],
    program_of_gene: np.ndarray,
    z_b: np.ndarray,
    z: np.ndarray,
    rng: np.random.Generator,
    truth: dict[str, Any],
):
    import anndata as ad

    X = sp.csr_matrix(counts)
    a = ad.AnnData(X=X)
    a.layers["counts"] = X.copy()
    a.obs_names = [f"cell{i:06d}" for i in range(len(labels))]
    a.var_names = genes
    a.obs["perturbation"] = pd.Categorical(labels)
    a.obs["library_size"] = np.asarray(counts.sum(1)).ravel()
    a.obs["batch"] = pd.Categorical(rng.choice(["batch1", "batch2"], len(labels)))
    a.var["program"] = program_of_gene.astype(np.int64)
    a.obsm["X_true_basal"] = z_b.astype(np.float32)
    a.obsm["X_true_latent"] = z.astype(np.float32)
    a.uns["sams_truth"] = truth
    return a


def simulate_sams_screen(
    n_perturbations: int = 30,
    n_latent: int = 10,
    n_genes: int = 200,
    n_combinations: int = 40,
    cells_per_perturbation: int = 100,
    cells_per_combination: int | None = None,
    n_control: int | None = None,
    targets_per_perturbation: tuple[int, int] = (1, 3),
    effect_mean: float = 5.0,
    effect_sd: float = 0.5,
    library_median: float = 2000.0,
    library_sd: float = 0.3,
    dispersion: float = 5.0,
    background_fraction: float = 0.1,
    heldout_fraction: float = 0.25,
    seed: int = 0,
):
    """A SAMS-style screen: sparse masks, additive combinations, programs of genes per unit.

    Each single perturbation t has 1-3 targeted units with effects ±N(``effect_mean``,
    ``effect_sd``²); a combination's latent shift is the sum of its members'; basal states are
    N(0, I). Genes are split into one program per latent unit (plus ``background_fraction``
    constant genes); a program gene's log expression is a gene-specific monotone nonlinear
    function of its unit, so the decoder is injective and each unit drives a known gene set.
    Counts are negative binomial (inverse dispersion ``dispersion``) around library size ×
    softmax proportions, with log-normal library sizes of median ``library_median``.
    """
    rng = np.random.default_rng(seed)
    T, K, G = n_perturbations, n_latent, n_genes
    if T < 1 or K < 1 or G < K:
        raise SamsError(f"Need at least one perturbation, one unit and n_genes ≥ n_latent (got T={T}, K={K}, G={G}).")
    max_pairs = T * (T - 1) // 2
    if n_combinations > max_pairs:
        raise SamsError(f"{n_combinations} combinations requested but {T} perturbations make only {max_pairs} pairs.")
    names = perturbation_names(T)
    masks = _draw_masks(rng, T, K, targets_per_perturbation)
    emb = _draw_effects(rng, masks, effect_mean, effect_sd)
    # combinations: distinct pairs of singles
    pairs = set()
    while len(pairs) < n_combinations:
        i, j = sorted(rng.choice(T, 2, replace=False).tolist())
        pairs.add((i, j))
    pairs_l = sorted(pairs)
    combos = ["+".join(sorted((names[i], names[j]))) for i, j in pairs_l]  # members sorted, as the data contract writes them
    n_held = int(round(heldout_fraction * len(combos)))
    heldout = sorted(rng.choice(combos, n_held, replace=False).tolist()) if n_held else []

    n_ctrl = cells_per_perturbation * 2 if n_control is None else n_control
    n_combo_cells = cells_per_perturbation if cells_per_combination is None else cells_per_combination
    labels = ["control"] * n_ctrl
    rows: list[np.ndarray] = [np.zeros((n_ctrl, T), np.float32)]
    for t in range(T):
        labels += [names[t]] * cells_per_perturbation
        r = np.zeros((cells_per_perturbation, T), np.float32)
        r[:, t] = 1
        rows.append(r)
    for (i, j), lab in zip(pairs_l, combos):
        labels += [lab] * n_combo_cells
        r = np.zeros((n_combo_cells, T), np.float32)
        r[:, [i, j]] = 1
        rows.append(r)
    D = np.vstack(rows)
    N = D.shape[0]
    z_b = rng.normal(size=(N, K)).astype(np.float32)
    z = z_b + D @ emb

    # gene programs: background genes, then K programs of (nearly) equal size
    n_bg = int(round(background_fraction * G))
    n_prog = G - n_bg
    program_of_gene = np.full(G, -1)
    program_of_gene[n_bg:] = np.arange(n_prog) % K
    program_of_gene = program_of_gene[rng.permutation(G)]
    genes = []
    counters = {k: 0 for k in range(-1, K)}
    for g in range(G):
        k = int(program_of_gene[g])
        counters[k] += 1
        genes.append(f"BG_G{counters[k]:03d}" if k < 0 else f"P{k:02d}_G{counters[k]:03d}")
    base = rng.normal(0.0, 1.5, G)  # baseline log expression: some genes high, many low
    slope = rng.uniform(0.25, 0.6, G) * rng.choice([-1.0, 1.0], G)
    offset = rng.normal(0.0, 1.0, G)
    logits = np.tile(base, (N, 1))
    prog = program_of_gene >= 0
    zz = z[:, program_of_gene[prog]]
    # softplus(z + b) is monotone in z: injective per gene, nonlinear across the range
    logits[:, prog] += slope[prog] * np.logaddexp(0.0, zz + offset[prog])
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    lib = _library(rng, N, library_median, library_sd)
    theta = np.full(G, float(dispersion))
    counts = _nb_counts(rng, p * lib[:, None], theta)
    programs = {f"PROGRAM_U{k:02d}": np.array([genes[g] for g in np.flatnonzero(program_of_gene == k)], dtype=str) for k in range(K)}
    truth = {
        "kind": "sams",
        "perturbations": np.array(names, dtype=str),
        "masks": masks,
        "embeddings": emb,
        "combinations": np.array(combos, dtype=str),
        "heldout_combinations": np.array(heldout, dtype=str),
        "programs": programs,
        "seed": int(seed),
        "params": {
            "n_perturbations": T, "n_latent": K, "n_genes": G, "n_combinations": n_combinations,
            "cells_per_perturbation": cells_per_perturbation, "cells_per_combination": n_combo_cells,
            "n_control": n_ctrl, "effect_mean": effect_mean, "effect_sd": effect_sd,
            "library_median": library_median, "library_sd": library_sd, "dispersion": dispersion,
            "background_fraction": background_fraction, "heldout_fraction": heldout_fraction,
        },
    }
    return _to_adata(counts, labels, genes, program_of_gene, z_b, z, rng, truth)


def simulate_svae_screen(
    n_perturbations: int = 20,
    n_latent: int = 10,
    n_genes: int = 200,
    cells_per_perturbation: int = 200,
    n_control: int | None = None,
    targets_per_perturbation: tuple[int, int] = (1, 3),
    effect_mean: float = 5.0,
    effect_sd: float = 0.5,
    library_median: float = 4000.0,
    library_sd: float = 0.3,
    dispersion: float = 5.0,
    seed: int = 0,
):
    """An sVAE-style screen: one perturbation per cell, z ~ N(m_a ⊙ μ_a, I), 1-3 targets each.

    The decoder is an injective leaky-ReLU network K → 2K → G with random full-rank weights;
    counts are negative binomial around a drawn library size × softmax proportions.
    """
    rng = np.random.default_rng(seed)
    T, K, G = n_perturbations, n_latent, n_genes
    if G < 2 * K:
        raise SamsError(f"n_genes must be at least 2 × n_latent for an injective decoder (got G={G}, K={K}).")
    names = perturbation_names(T)
    masks = _draw_masks(rng, T, K, targets_per_perturbation)
    emb = _draw_effects(rng, masks, effect_mean, effect_sd)
    n_ctrl = cells_per_perturbation if n_control is None else n_control
    labels = ["control"] * n_ctrl + [names[t] for t in range(T) for _ in range(cells_per_perturbation)]
    shift = np.vstack([np.zeros((n_ctrl, K), np.float32)] + [np.tile(emb[t], (cells_per_perturbation, 1)) for t in range(T)])
    N = shift.shape[0]
    z_b = rng.normal(size=(N, K)).astype(np.float32)
    z = z_b + shift
    W1 = np.linalg.qr(rng.normal(size=(2 * K, K)))[0] * 1.5  # orthonormal columns: full column rank
    h = z @ W1.T
    h = np.where(h > 0, h, 0.2 * h)
    W2 = rng.normal(0, 1.0 / np.sqrt(2 * K), size=(G, 2 * K))
    logits = h @ W2.T + rng.normal(0, 1.0, G)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    lib = _library(rng, N, library_median, library_sd)
    counts = _nb_counts(rng, p * lib[:, None], np.full(G, float(dispersion)))
    genes = [f"GENE{g:04d}" for g in range(G)]
    truth = {
        "kind": "svae",
        "perturbations": np.array(names, dtype=str),
        "masks": masks,
        "embeddings": emb,
        "combinations": np.array([], dtype=str),
        "heldout_combinations": np.array([], dtype=str),
        "programs": {},
        "seed": int(seed),
        "params": {
            "n_perturbations": T, "n_latent": K, "n_genes": G, "cells_per_perturbation": cells_per_perturbation,
            "n_control": n_ctrl, "effect_mean": effect_mean, "effect_sd": effect_sd,
            "library_median": library_median, "library_sd": library_sd, "dispersion": dispersion,
        },
    }
    return _to_adata(counts, labels, genes, np.full(G, -1), z_b, z, rng, truth)


def truth_from_adata(adata) -> SimulationTruth:
    """The answer key stored by a simulator (also after an .h5ad round trip)."""
    if "sams_truth" not in adata.uns:
        raise SamsError("This data has no simulation truth (uns['sams_truth']). Only simulated screens carry one.")
    t = adata.uns["sams_truth"]
    programs = {str(k): [str(g) for g in np.asarray(v).tolist()] for k, v in dict(t.get("programs", {})).items()}
    return SimulationTruth(
        kind=str(t["kind"]),
        perturbations=[str(p) for p in np.asarray(t["perturbations"]).tolist()],
        masks=np.asarray(t["masks"]).astype(np.int8),
        embeddings=np.asarray(t["embeddings"], dtype=np.float32),
        combinations=[str(c) for c in np.asarray(t["combinations"]).tolist()],
        heldout_combinations=[str(c) for c in np.asarray(t["heldout_combinations"]).tolist()],
        program_sets=programs,
        unit_of_program={k: int(k.rsplit("U", 1)[1]) for k in programs},
        seed=int(t["seed"]),
        params={str(k): (v.item() if hasattr(v, "item") else v) for k, v in dict(t.get("params", {})).items()},
    )


def combination_shift(truth: SimulationTruth, label: str) -> np.ndarray:
    """The true latent shift of a condition label ("control" → 0, "A+B" → e_A + e_B)."""
    from sams_core.data import split_label

    idx = {p: i for i, p in enumerate(truth.perturbations)}
    out = np.zeros(truth.n_latent, dtype=np.float32)
    for m in split_label(label):
        if m not in idx:
            raise SamsError(f"{m!r} is not a simulated perturbation.")
        out += truth.embeddings[idx[m]]
    return out


def truth_masks_for(truth: SimulationTruth, names: Sequence[str]) -> np.ndarray:
    """True mask rows in the order of ``names`` (e.g. a model's perturbation list)."""
    idx = {p: i for i, p in enumerate(truth.perturbations)}
    missing = [n for n in names if n not in idx]
    if missing:
        raise SamsError(f"Perturbations not in the simulation: {', '.join(missing[:5])}.")
    return truth.masks[[idx[n] for n in names]]


def simulate_main(argv: list[str] | None = None) -> int:
    """``python -m sams_core simulate``: write a simulated screen to an .h5ad file."""
    ap = argparse.ArgumentParser(prog="python -m sams_core simulate", description="Simulate a perturbation screen with ground truth (masks, effects, latents, gene programs) and write it as .h5ad.")
    ap.add_argument("--kind", choices=["sams", "svae"], default="sams", help="sams: masks, additive combinations and gene programs; svae: one perturbation per cell (Lopez et al.)")
    ap.add_argument("--perturbations", type=int, default=30, help="number of single perturbations T (default 30)")
    ap.add_argument("--latent", type=int, default=10, help="number of latent units K (default 10)")
    ap.add_argument("--genes", type=int, default=200, help="number of genes G (default 200)")
    ap.add_argument("--combinations", type=int, default=40, help="number of two-perturbation combinations (sams only, default 40)")
    ap.add_argument("--cells", type=int, default=100, help="cells per perturbation and per combination (default 100)")
    ap.add_argument("--controls", type=int, default=None, help="control cells (default: 2 × --cells for sams, --cells for svae)")
    ap.add_argument("--min-targets", type=int, default=1, help="fewest latent units a perturbation acts on (default 1)")
    ap.add_argument("--max-targets", type=int, default=3, help="most latent units a perturbation acts on (default 3)")
    ap.add_argument("--effect-mean", type=float, default=5.0, help="mean size of an effect on a targeted unit (default 5)")
    ap.add_argument("--effect-sd", type=float, default=0.5, help="spread of effect sizes (default 0.5)")
    ap.add_argument("--library", type=float, default=2000.0, help="median library size in UMIs (default 2000)")
    ap.add_argument("--dispersion", type=float, default=5.0, help="negative-binomial inverse dispersion (default 5; lower is noisier)")
    ap.add_argument("--heldout-fraction", type=float, default=0.25, help="fraction of combinations marked as suggested held-out (default 0.25)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--out", required=True, help="output .h5ad file")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    targets = (args.min_targets, args.max_targets)
    if args.kind == "sams":
        a = simulate_sams_screen(
            args.perturbations, args.latent, args.genes, args.combinations, args.cells, None, args.controls,
            targets, args.effect_mean, args.effect_sd, args.library, 0.3, args.dispersion,
            heldout_fraction=args.heldout_fraction, seed=args.seed,
        )
    else:
        a = simulate_svae_screen(
            args.perturbations, args.latent, args.genes, args.cells, args.controls, targets,
            args.effect_mean, args.effect_sd, args.library, 0.3, args.dispersion, args.seed,
        )
    a.write_h5ad(args.out)
    zeros = 1 - a.X.nnz / (a.n_obs * a.n_vars)
    print(f"wrote {args.out}: {a.n_obs} cells × {a.n_vars} genes, {zeros:.0%} zeros, "
          f"median library {np.median(a.obs['library_size']):.0f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0
