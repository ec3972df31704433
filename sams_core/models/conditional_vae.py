"""Conditional VAE baseline: decoder input [z, d], encoder q(z | x, d), no global latents."""

from __future__ import annotations

from typing import Any

import torch

from sams_core.models.base import Batch, LossOutput, PerturbationModel, SplitInputMLP
from sams_core.models.distributions import (
    kl_normal_std_normal,
    mean_and_log_std,
    reparam_normal_log_prob,
    std_normal_log_prob,
)


class ConditionalVAE(PerturbationModel):
    """z ~ N(0, I); x ~ likelihood(decoder([z, d])). Perturbations enter only through the decoder."""

    family = "conditional_vae"

    def __init__(self, n_genes: int, n_perturbations: int, **common: Any):
        super().__init__(n_genes, n_perturbations, **common)
        K, H, L = self.n_latent, self.n_hidden, self.n_layers
        self.encoder = SplitInputMLP(n_genes, n_perturbations, H, 2 * K, L)
        self.decoder = SplitInputMLP(K, n_perturbations, H, n_genes, L)
        # covariates (scVI style): the one-hot levels enter the first layer of encoder and decoder
        self.encoder_cov = self.covariate_layer(H)
        self.decoder_cov = self.covariate_layer(H)

    def _project_z(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = self.decoder.project_a(z)
        extra = self.covariate_input(self.decoder_cov, c)
        return h if extra is None else h + extra

    def decode(self, z: torch.Tensor, d: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
        if d is None:
            d = torch.zeros(*z.shape[:-1], self.n_perturbations, device=z.device)
        return self.decoder.forward_from(self._project_z(z, c), d)

    def _encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder.project_a(self.encoder_input(batch.x))
        extra = self.covariate_input(self.encoder_cov, self.covariates_of(batch))
        if extra is not None:
            h = h + extra
        return mean_and_log_std(self.encoder.forward_from(h, batch.d))

    def loss(self, batch: Batch, n_particles: int = 5) -> LossOutput:
        mean, log_std = self._encode(batch)
        z = mean + torch.exp(log_std) * torch.randn(n_particles, *mean.shape, device=mean.device)
        out = self.decoder.forward_from(self._project_z(z, self.covariates_of(batch)), batch.d)
        log_px = self.likelihood.varying(batch.x, out, torch.log(batch.library)).mean(0) + self.likelihood.constant(batch.x)
        kl_z = kl_normal_std_normal(mean, log_std).sum(-1)
        elbo = log_px - kl_z
        return LossOutput(-elbo.mean(), {"log_px": log_px.mean().detach(), "kl_z": kl_z.mean().detach(),
                                         "kl_global": torch.zeros((), device=mean.device), "neg_elbo": -elbo.mean().detach()})

    def log_weights(self, batch: Batch, globals_: dict[str, torch.Tensor]) -> torch.Tensor:
        mean, log_std = self._encode(batch)
        S = self.n_prior_draws(globals_)
        eps = torch.randn(S, *mean.shape, device=mean.device)
        z = mean + torch.exp(log_std) * eps
        out = self.decode(z, batch.d.expand(S, *batch.d.shape), self.covariates_of(batch))
        log_px = self.likelihood.log_prob(batch.x, out, torch.log(batch.library))
        log_qz = reparam_normal_log_prob(eps, log_std).sum(-1)
        return log_px + std_normal_log_prob(z).sum(-1) - log_qz

    def predict(
        self, d: torch.Tensor, globals_: dict[str, torch.Tensor], n_per_global: int = 1, c: torch.Tensor | None = None,
    ) -> torch.Tensor:
        S = n_per_global * self.n_prior_draws(globals_)
        z = torch.randn(S, 1, self.n_latent, device=d.device).expand(S, d.shape[0], self.n_latent)  # paired across rows
        return self.decode(z, d.expand(S, *d.shape), self.prediction_covariates(c, d.shape[0]))

    def latent(self, batch: Batch) -> dict[str, torch.Tensor]:
        mean, _ = self._encode(batch)
        return {"basal": mean, "full": mean}
