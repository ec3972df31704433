"""CPA-VAE: SAMS-VAE without masks (z = z_b + D E), the additive-shift baseline of the SAMS paper."""

from __future__ import annotations

from typing import Any

from sams_core.models.sams_vae import SAMSVAE


class CPAVAE(SAMSVAE):
    """Every perturbation shifts every latent unit by its global embedding e_t ~ N(0, s² I)."""

    family = "cpa_vae"

    def __init__(self, n_genes: int, n_perturbations: int, **kw: Any):
        kw.pop("mask_prior", None)
        # no masks, so no basis to align: the prior terms keep the paper's weight throughout
        kw.setdefault("global_weight", 1.0)
        kw.setdefault("align_at", None)
        kw.setdefault("sparsify_weight", 1.0)
        kw.setdefault("sparsify_for", 0.0)
        super().__init__(n_genes, n_perturbations, **kw)
