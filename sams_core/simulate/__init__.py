"""Simulated screens with their answer keys (masks, effects, latents, gene programs).

May import: labels (the label grammar), errors, settings.

Three simulators, numpy-only and deterministic for a seed (``np.random.default_rng(seed)``),
one module each, with the shared parts in ``common``:

- :func:`simulate_sams_screen` (``sams``) follows SAMS-VAE's generative story (Bereket &
  Karaletsos 2023): every single perturbation moves a sparse set of latent units, a
  combination's latent shift is the sum of its members' shifts, and each latent unit drives its
  own program of genes (counts);
- :func:`simulate_reference_screen` (``reference``) is built like the simulator published with
  SAMS-VAE: Bernoulli(2/15) masks over K = 15 units, a dense bias-free 4 × 50 LeakyReLU decoder
  with orthogonal weights and Gaussian noise at 20 % of the variance (real values, not counts),
  plus controls and additive pairs;
- :func:`simulate_svae_screen` (``svae``) follows sVAE+ (Lopez et al. 2023): one perturbation per
  cell, z ~ N(m_a ⊙ μ_a, I), an injective leaky-ReLU decoder, no combinations (counts).

Each returns an :class:`anndata.AnnData` that loads through the data contract
(``sams_core.data.screen``), with the answer key in ``uns["sams_truth"]``:

==========================  ==============================================================
``X``                        counts (``scipy.sparse.csr_matrix`` float32 holding integers;
                             also in ``layers["counts"]``), or for ``reference`` dense
                             float32 real values (read with a Gaussian likelihood)
``obs["perturbation"]``      ``"control"``, a single (``"KLF1"``) or a pair (``"GATA1+KLF1"``,
                             members in the order of the singles list)
``obs["library_size"]``      total counts of the cell (count kinds only)
``obs["batch"]``             a covariate with no effect (``batch1``, ``batch2``, ...)
``var["program"]``           latent unit driving the gene (-1: background gene, dense decoders)
``obsm["X_true_basal"]``     basal state z_b (N × K float32)
``obsm["X_true_latent"]``    z = z_b + shift (N × K float32)
``uns["sams_truth"]``        masks, effects, combinations, held-out suggestion, gene
                             programs, decoder and noise parameters, seed and parameters
==========================  ==============================================================

Perturbations carry real human gene symbols (taken from a fixed list, then sorted so that the
singles list, the mask rows and the data loader's perturbation order are the same); genes carry
obviously synthetic names (``P03_G012``: gene 12 of the program of unit 3; ``BG_G004``: a
background gene; ``SV_G0042`` in sVAE screens, ``RF_G042`` in reference screens) so nobody
mistakes them for real genes. :func:`truth_from_adata` reads the answer key back, also after an
``.h5ad`` round trip; :func:`sample_condition` draws fresh cells from the true model (an oracle).
"""

from __future__ import annotations

from sams_core.simulate.cli import SIMULATORS, simulate_main
from sams_core.simulate.common import (
    PERTURBATION_SYMBOLS,
    SimulationTruth,
    perturbation_names,
)
from sams_core.simulate.reference import simulate_reference_screen
from sams_core.simulate.sams import simulate_sams_screen
from sams_core.simulate.svae import simulate_svae_screen
from sams_core.simulate.truth import (
    combination_shift,
    sample_condition,
    sample_expression,
    true_mean,
    true_proportions,
    truth_from_adata,
    truth_masks_for,
)

__all__ = [
    "PERTURBATION_SYMBOLS",
    "SIMULATORS",
    "SimulationTruth",
    "combination_shift",
    "perturbation_names",
    "sample_condition",
    "sample_expression",
    "simulate_main",
    "simulate_reference_screen",
    "simulate_sams_screen",
    "simulate_svae_screen",
    "true_mean",
    "true_proportions",
    "truth_from_adata",
    "truth_masks_for",
]
