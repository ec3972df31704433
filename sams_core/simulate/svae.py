"""The sVAE+-style simulator: one perturbation per cell, an injective dense decoder, no combinations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sams_core.errors import SamsError
from sams_core.simulate.common import (
    NO_PAIRS,
    CountNoise,
    Design,
    check_targets,
    draw_cells,
    draw_effects,
    draw_masks,
    perturbation_names,
    sample_counts,
    to_adata,
    truth_record,
)

if TYPE_CHECKING:
    import anndata as ad

#: Negative slope of the sVAE decoder's leaky ReLU.
SVAE_LEAK = 0.2


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
) -> ad.AnnData:
    """Simulate an sVAE+-style screen (Lopez et al. 2023): one perturbation per cell, no combinations.

    Each perturbation a acts on ``targets_per_perturbation`` distinct latent units with shift
    μ_a = ±N(``effect_mean``, ``effect_sd``²) there (0 elsewhere); a cell of a has
    z ~ N(m_a ⊙ μ_a, I_K) (controls: N(0, I_K)). The decoder is an injective leaky-ReLU network
    K → 2K → G: the first layer has orthonormal columns (full column rank), the leaky ReLU
    (negative slope 0.2) is a bijection, and the output layer has full column rank with columns
    orthogonal to the all-ones vector, so the softmax over genes stays injective. Counts are
    NB(library × softmax, θ_g) with log-normal library sizes, as in
    :func:`sams_core.simulate.simulate_sams_screen`.

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
            :func:`sams_core.simulate.simulate_sams_screen`.

    Returns:
        AnnData following the package's contract; ``var["program"]`` is -1 for every gene (the
        decoder is dense) and the truth has no combinations and no programs.
    """
    n_single = cells_per_perturbation
    d = Design.checked(n_perturbations, n_latent, n_genes, n_single, n_single if n_control is None else n_control,
                       effect_mean, effect_sd, seed, n_batches)
    T, K, G = d.n_perturbations, d.n_latent, d.n_genes
    lo, hi = check_targets(targets_per_perturbation, K)
    noise = CountNoise.checked(library_mean, library_sd, dispersion, dispersion_sd)
    if G < 2 * K + 1:
        raise SamsError(
            f"n_genes must be at least 2 × n_latent + 1 = {2 * K + 1} for an injective decoder "
            f"(got n_genes={G}, n_latent={K}). Raise n_genes or lower n_latent."
        )

    rng = np.random.default_rng(d.seed)
    names = sorted(perturbation_names(T))
    masks = draw_masks(rng, T, K, (lo, hi))
    emb = draw_effects(rng, masks, d.effect_mean, d.effect_sd)
    cells = draw_cells(rng, names, emb, d, NO_PAIRS)

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
        "leak": SVAE_LEAK,
    }
    theta, library = noise.draw(rng, G, len(cells.labels))
    X = sample_counts(rng, cells.z, decoder, library, theta)
    genes = [f"SV_G{g:04d}" for g in range(G)]
    params = {**d.params(), "min_targets": lo, "max_targets": hi, **noise.params(G)}
    truth = truth_record("svae", names, masks, emb, cells, decoder, d.seed, params, inverse_dispersion=theta.astype(np.float32))
    return to_adata(X, cells.labels, genes, np.full(G, -1, dtype=np.int64), cells.z_b, cells.z, rng, d.n_batches, truth)
