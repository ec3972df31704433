"""The reference simulator: built like the one published with SAMS-VAE (Bereket & Karaletsos 2023),
plus controls and pairs.

Its decoder is dense (every gene depends on every latent unit), so, unlike the SAMS-style
simulator, the gene programs do not pin the latent basis: only the sparsity of the masks does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sams_core.simulate.common import (
    Design,
    PairDesign,
    decode,
    draw_cells,
    need_float,
    need_int,
    orthogonal,
    perturbation_names,
    to_adata,
    truth_record,
)

if TYPE_CHECKING:
    import anndata as ad

#: Negative slope of the reference decoder's LeakyReLU.
REFERENCE_LEAK = 0.2


def simulate_reference_screen(
    n_perturbations: int = 100,
    n_latent: int = 15,
    n_genes: int = 100,
    n_combinations: int = 30,
    cells_per_perturbation: int = 700,
    n_control: int | None = None,
    mask_probability: float | None = None,
    effect_mean: float = 5.0,
    effect_sd: float = 0.5,
    noise_fraction: float = 0.2,
    hidden_layers: int = 4,
    hidden_width: int = 50,
    heldout_fraction: float = 0.25,
    seed: int = 0,
    cells_per_combination: int | None = None,
    n_batches: int = 2,
) -> ad.AnnData:
    """Simulate a screen built like the published SAMS-VAE simulator, with controls and pairs.

    Generative story (T singles, K latent units, G genes), as published:

    - masks m_t,k ~ Bernoulli(``mask_probability``) independently (default 2/K, i.e. 2/15 at
      K = 15: two targets on average; a perturbation may have none, a unit may be untargeted);
      effects e_t,k = ±N(``effect_mean``, ``effect_sd``²) with a random sign; shift m_t ⊙ e_t;
    - each cell: z_b ~ N(0, I_K), z = z_b + the shift of its condition (controls: 0);
    - decoder: ``hidden_layers`` bias-free linear layers of ``hidden_width`` units with
      LeakyReLU(0.2) between them and a bias-free output layer, every weight matrix orthogonal
      (like ``torch.nn.init.orthogonal_``); each gene's output is divided by its standard
      deviation over all simulated cells;
    - values: x = decoder(z) + Gaussian noise whose variance is ``noise_fraction`` of each gene's
      total variance (noise variance = f/(1 − f) × the variance of the decoder output).

    Added to the published design: ``n_control`` control cells and ``n_combinations`` pairs of
    singles whose latent shift is the sum of their members' shifts (a ``heldout_fraction`` of them
    suggested as held out), and the no-effect covariate ``obs["batch"]``.

    The values are real numbers, not counts (the published simulator is Gaussian): ``X`` is a
    dense float32 matrix with no ``layers["counts"]`` and no ``obs["library_size"]``, so the data
    contract (``sams_core.data.screen.from_anndata``) reads it with a Gaussian likelihood and the
    treatment effects are differences of means of the values themselves.

    Args:
        n_perturbations: number of single perturbations T (published: 100).
        n_latent: number of latent units K (published: 15).
        n_genes: number of genes G (published: 100).
        n_combinations: number of two-perturbation combinations (≤ T(T−1)/2).
        cells_per_perturbation: cells of each single (published: 700 = 500 train + 100 val + 100 test).
        n_control: control cells (default ``cells_per_perturbation``).
        mask_probability: prior probability that a perturbation acts on a unit (default 2/K).
        effect_mean, effect_sd: size of an effect on a targeted unit.
        noise_fraction: share of each gene's variance that is noise, in [0, 1).
        hidden_layers, hidden_width: depth and width of the decoder (published: 4 × 50).
        heldout_fraction: share of combinations listed in ``heldout_combinations``.
        seed: random seed; the same seed gives the same screen.
        cells_per_combination: cells of each combination (default ``cells_per_perturbation``).
        n_batches: levels of the no-effect covariate ``obs["batch"]``.

    Returns:
        AnnData following the package's contract (real-valued ``X``, see above); ``var["program"]``
        is -1 for every gene (the decoder is dense); genes are named ``RF_G000`` ...
    """
    n_single = need_int("cells_per_perturbation", cells_per_perturbation, 1)
    d = Design.checked(n_perturbations, n_latent, n_genes, n_single, n_single if n_control is None else n_control,
                       effect_mean, effect_sd, seed, n_batches)
    T, K, G = d.n_perturbations, d.n_latent, d.n_genes
    pairs = PairDesign.checked(n_combinations, cells_per_combination, heldout_fraction, d)
    p_mask = need_float("mask_probability", 2.0 / K if mask_probability is None else mask_probability, 0.0, 1.0)
    noise_fraction = need_float("noise_fraction", noise_fraction, 0.0, 0.99)
    n_layers = need_int("hidden_layers", hidden_layers, 0)
    width = need_int("hidden_width", hidden_width, 1)

    rng = np.random.default_rng(d.seed)
    names = sorted(perturbation_names(T))
    masks = (rng.random((T, K)) < p_mask).astype(np.int8)
    size = rng.normal(d.effect_mean, d.effect_sd, (T, K))
    sign = rng.choice(np.array([-1.0, 1.0]), (T, K))
    emb = (masks * size * sign).astype(np.float32)
    cells = draw_cells(rng, names, emb, d, pairs)

    dims = [K] + [width] * n_layers + [G]
    decoder: dict = {"kind": "dense", "n_layers": n_layers + 1, "leak": REFERENCE_LEAK, "scale": np.ones(G, np.float32)}
    for i in range(n_layers + 1):
        decoder[f"W{i + 1}"] = orthogonal(rng, dims[i + 1], dims[i]).astype(np.float32)
    raw = decode(decoder, cells.z)  # with scale 1: the unscaled output
    sd = raw.std(0)
    decoder["scale"] = np.where(sd > 0, sd, 1.0).astype(np.float32)
    mean = raw / decoder["scale"].astype(np.float64)  # = decode(decoder, z) with the scale
    var = mean.var(0)
    noise_var = noise_fraction * var / (1.0 - noise_fraction)
    noise_sd = np.sqrt(np.where(noise_var > 0, noise_var, 1.0)).astype(np.float32)
    X = (mean + noise_sd * rng.normal(size=mean.shape)).astype(np.float32)
    genes = [f"RF_G{g:03d}" for g in range(G)]
    params = {**d.params(), **pairs.params(), "mask_probability": p_mask, "noise_fraction": noise_fraction,
              "hidden_layers": n_layers, "hidden_width": width, "likelihood": "gaussian"}
    truth = truth_record("reference", names, masks, emb, cells, decoder, d.seed, params, noise_sd=noise_sd)
    return to_adata(X, cells.labels, genes, np.full(G, -1, dtype=np.int64), cells.z_b, cells.z, rng, d.n_batches, truth)
