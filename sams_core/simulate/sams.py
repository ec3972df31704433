"""The SAMS-style simulator: sparse masks, additive pairs, one gene program per latent unit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sams_core.errors import SamsError
from sams_core.simulate.common import (
    CountNoise,
    Design,
    PairDesign,
    check_targets,
    draw_cells,
    draw_effects,
    draw_masks,
    need_float,
    need_int,
    perturbation_names,
    sample_counts,
    str_array,
    to_adata,
    truth_record,
)

if TYPE_CHECKING:
    import anndata as ad

#: Slope of the linear part of the SAMS decoder's smooth leaky map (keeps it strictly monotone).
SAMS_LEAK = 0.25


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
) -> ad.AnnData:
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
        AnnData following the contract in the package docstring; cells are ordered controls,
        singles, combinations.
    """
    n_single = need_int("cells_per_perturbation", cells_per_perturbation, 1)
    d = Design.checked(n_perturbations, n_latent, n_genes, n_single, 2 * n_single if n_control is None else n_control,
                       effect_mean, effect_sd, seed, n_batches)
    T, K, G = d.n_perturbations, d.n_latent, d.n_genes
    pairs = PairDesign.checked(n_combinations, cells_per_combination, heldout_fraction, d)
    lo, hi = check_targets(targets_per_perturbation, K)
    noise = CountNoise.checked(library_mean, library_sd, dispersion, dispersion_sd)
    background_fraction = need_float("background_fraction", background_fraction, 0.0, 1.0)
    n_bg = round(background_fraction * G)
    if G - n_bg < K:
        raise SamsError(
            f"Only {G - n_bg} of {G} genes are left for {K} gene programs (one gene per unit at least). "
            "Raise n_genes or lower background_fraction."
        )

    rng = np.random.default_rng(d.seed)
    names = sorted(perturbation_names(T))  # the singles list: sorted like the data loader's
    masks = draw_masks(rng, T, K, (lo, hi))
    emb = draw_effects(rng, masks, d.effect_mean, d.effect_sd)
    cells = draw_cells(rng, names, emb, d, pairs)

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
        "leak": SAMS_LEAK,
    }
    theta, library = noise.draw(rng, G, len(cells.labels))
    X = sample_counts(rng, cells.z, decoder, library, theta)

    params = {**d.params(), **pairs.params(), "min_targets": lo, "max_targets": hi, **noise.params(G),
              "background_fraction": background_fraction}
    truth = truth_record("sams", names, masks, emb, cells, decoder, d.seed, params, inverse_dispersion=theta.astype(np.float32))
    truth["programs"] = {f"PROGRAM_U{k:02d}": str_array([genes[g] for g in np.flatnonzero(program_of_gene == k)]) for k in range(K)}
    return to_adata(X, cells.labels, genes, program_of_gene, cells.z_b, cells.z, rng, d.n_batches, truth)
