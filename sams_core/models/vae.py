"""Plain VAE: no perturbation input at all; the latent-recovery baseline.

Its predictions ignore the dosage rows (every condition looks like the population it was
trained on), which is what a model without perturbation knowledge can say.
"""

from __future__ import annotations

from typing import Any

import torch

from sams_core.models.base import Batch
from sams_core.models.conditional_vae import ConditionalVAE
from sams_core.models.distributions import mean_and_log_std


class VAE(ConditionalVAE):
    """z ~ N(0, I); x ~ likelihood(decoder(z)); q(z | x)."""

    family = "vae"

    def __init__(self, n_genes: int, n_perturbations: int, **common: Any):
        super().__init__(n_genes, 0, **common)
        # keep the data's perturbation count for the interface; the networks see none
        self.hparams["n_perturbations"] = n_perturbations
        self.n_perturbations = n_perturbations
        self.register_buffer("pert_counts", torch.ones(n_perturbations))

    def _strip(self, d: torch.Tensor) -> torch.Tensor:
        return d[..., :0]

    def decode(self, z: torch.Tensor, d: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.forward_from(self._project_z(z, c))

    def _encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder.project_a(self.encoder_input(batch.x))
        extra = self.covariate_input(self.encoder_cov, self.covariates_of(batch))
        if extra is not None:
            h = h + extra
        return mean_and_log_std(self.encoder.forward_from(h))

    def loss(self, batch: Batch, n_particles: int = 5):
        return super().loss(Batch(batch.x, self._strip(batch.d), batch.library, batch.cond, batch.c), n_particles)
