"""sVAE+ (Lopez et al., CLeaR 2023): sparse mechanism shift with one label per cell.

Each condition a (a single perturbation, or a combination taken as a label of its own) has a
learned shift μ_a ∈ R^K and mask probabilities π_a,k with a Beta(1, β) prior (β > 1 favours
sparse masks); masks m_a,k ~ Bernoulli(π_a,k) are sampled straight-through; the latent is
z ~ N(m_a ⊙ μ_a, I) (controls: N(0, I)); the encoder sees expression only. It cannot compose
unseen combinations; held-out conditions are fitted by :func:`fit_new_conditions` with the
decoder frozen (the paper's out-of-domain protocol).

Defaults are the published model's form: Beta(1, β) with β = 10 and no change of the latent basis.
Turning the basis to the sparsest rotation (``align_at``, as SAMS-VAE's schedule does) or a
sparser prior (β = 60) are tuned variants, named in the model's label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.nn import functional as F

from sams_core.errors import SamsError
from sams_core.models.base import (
    Batch,
    LossOutput,
    PerturbationModel,
    ScreenCells,
    check_align_at,
    distinct_dosage_rows,
    mlp,
    mlp_forward,
)
from sams_core.models.distributions import (
    kl_normal_std_normal,
    mean_and_log_std,
    relaxed_bernoulli_st,
    reparam_normal_log_prob,
    std_normal_log_prob,
)
from sams_core.models.rotation import rotate_input, rotate_mean_head, sparsest_rotation


class SVAEPlus(PerturbationModel):
    """sVAE+ over a vocabulary of conditions given as dosage rows (``cond_dosages``)."""

    family = "svae_plus"

    def __init__(
        self,
        n_genes: int,
        n_perturbations: int,
        *,
        n_conditions: int = 1,
        beta: float = 10.0,
        temperature: float = 1.0,
        align_at: float | None = None,
        **common: Any,
    ):
        check_align_at(align_at)
        if beta <= 0:
            raise SamsError(f"beta must be positive, got {beta}. Pass β > 1 for sparse masks (default 10).")
        super().__init__(
            n_genes, n_perturbations,
            n_conditions=n_conditions, beta=beta, temperature=temperature, align_at=align_at, **common,
        )
        self.align_at = align_at
        self.aligned = False  # whether the basis was turned by align_units during training
        self.phase = "final" if align_at is None else "warmup"
        self.beta = beta
        self.temperature = temperature
        self.n_conditions = n_conditions
        K = self.n_latent
        self.encoder = mlp(n_genes, self.n_hidden, 2 * K, self.n_layers)
        self.decoder = mlp(K, self.n_hidden, n_genes, self.n_layers)
        self.shift = nn.Parameter(0.1 * torch.randn(n_conditions, K))
        self.pi_logits = nn.Parameter(torch.zeros(n_conditions, K))
        # dosage row of each condition, to map rows → conditions; filled from the data
        self.register_buffer("cond_dosages", torch.zeros(n_conditions, n_perturbations))
        self.register_buffer("cond_counts", torch.ones(n_conditions))
        # covariates (scVI style): the one-hot levels enter the first layer of encoder and decoder
        self.encoder_cov = self.covariate_layer(self.n_hidden)
        self.decoder_cov = self.covariate_layer(self.n_hidden)

    @torch.no_grad()
    def set_conditions(self, cond_dosages: torch.Tensor, cond_counts: torch.Tensor) -> None:
        """Store each condition's dosage row and its number of training cells."""
        self.cond_dosages.copy_(cond_dosages)
        self.cond_counts.copy_(cond_counts.clamp_min(1.0))

    # ---- the condition vocabulary, from the training cells ------------------------------
    @classmethod
    def vocabulary(cls, labels: Sequence[str] | np.ndarray) -> list[str]:
        """Every condition of the training cells but the controls, sorted: one label each."""
        return sorted({str(lab) for lab in labels if lab != "control"})

    @classmethod
    def data_hparams(cls, data: ScreenCells, train_idx: np.ndarray) -> dict[str, Any]:
        """``n_conditions``: the size of the vocabulary (at least 1)."""
        return {"n_conditions": max(1, len(cls.vocabulary(data.labels[train_idx])))}

    def prepare_for_data(self, data: ScreenCells, train_idx: np.ndarray) -> None:
        """Store the vocabulary's dosage rows and training cells per condition."""
        conds = self.vocabulary(data.labels[train_idx])
        if not conds:
            return
        rows = np.stack([data.dosage_row(c) for c in conds])
        labs = data.labels[train_idx].astype(str)
        cnt = np.array([(labs == c).sum() for c in conds], dtype=np.float32)
        self.set_conditions(torch.as_tensor(rows), torch.as_tensor(cnt))

    def condition_ids(self, dosages: sp.csr_matrix | np.ndarray) -> np.ndarray:
        """Each dosage row's index in the vocabulary, -1 for controls and unknown conditions.

        ``dosages``: a screen's per-cell CSR matrix (or dense rows). Each distinct row is looked up
        once (:func:`distinct_dosage_rows`), not each cell."""
        v_inv, v_keys = distinct_dosage_rows(self.cond_dosages.detach().cpu().numpy())
        lookup = {v_keys[j]: i for i, j in enumerate(v_inv.tolist())}
        inverse, keys = distinct_dosage_rows(dosages)
        ids = np.array([lookup.get(k, -1) for k in keys], dtype=np.int64)
        return ids[inverse]

    def condition_index(self, d: torch.Tensor) -> torch.Tensor:
        """Index of each dosage row's condition, -1 for controls; raises for unknown rows."""
        eq = (d.unsqueeze(1) == self.cond_dosages.unsqueeze(0)).all(-1)  # [R, A]
        idx = torch.where(eq.any(-1), eq.float().argmax(-1), torch.full_like(eq[:, 0], -1, dtype=torch.long))
        unknown = (idx < 0) & (d != 0).any(-1)
        if bool(unknown.any()):
            raise SamsError(
                "sVAE+ predicts only the conditions it was trained on (each combination is a label of its "
                "own); this request includes an unseen one. Use SAMS-VAE or CPA-VAE to compose new "
                "combinations, or fit the new condition with fit_new_conditions()."
            )
        return idx

    # ---- globals ---------------------------------------------------------------------
    def _masks(self, n: int) -> torch.Tensor:
        m, _ = relaxed_bernoulli_st(self.pi_logits, self.temperature, (n,))
        return m

    def _prior_mean(self, cond: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Prior latent mean per particle [P, B, K] from condition ids and shift tables [P, A, K]."""
        safe = cond.clamp_min(0)
        mean = table[:, safe]  # [P,B,K]
        return mean * (cond >= 0).unsqueeze(-1).to(mean.dtype)

    def sample_globals(self, n: int) -> dict[str, torch.Tensor]:
        m = self._masks(n)
        return {"shift_table": m * self.shift, "masks": m}

    def mean_globals(self) -> dict[str, torch.Tensor]:
        m = (torch.sigmoid(self.pi_logits) >= 0.5).float()
        return {"shift_table": (m * self.shift).unsqueeze(0), "masks": m.unsqueeze(0)}

    def mask_probs(self) -> torch.Tensor:
        return torch.sigmoid(self.pi_logits)

    def log_beta_prior(self) -> torch.Tensor:
        """log Beta(π_a,k; 1, β) summed over units, per condition [A]."""
        log_1m_pi = F.logsigmoid(-self.pi_logits)
        return ((self.beta - 1.0) * log_1m_pi).sum(-1) + self.n_latent * math.log(self.beta)

    def latent_shift(self, d: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        idx = self.condition_index(d)
        table = (torch.sigmoid(self.pi_logits) * self.shift).unsqueeze(0)
        return self._prior_mean(idx, table)[0]

    # ---- identifiability of the latent basis ------------------------------------------
    def end_epoch(self, epoch: int, total_epochs: int) -> bool:
        """After ``align_at`` × the budget, turn the latent basis to the one in which the
        conditions' shifts are sparsest (see :meth:`SAMSVAE.align_units`); True when done."""
        if self.phase != "warmup" or epoch < max(1, round(self.align_at * total_epochs)) or epoch >= total_epochs:
            return False
        self.align_units()
        self.aligned = True
        self.phase = "final"
        return True

    @property
    def schedule_phase(self) -> str:
        return self.phase

    def training_state(self) -> dict[str, Any]:
        """The schedule's phase, whether the basis was aligned, and the training cells per condition."""
        return {
            **super().training_state(),
            "phase": self.phase,
            "aligned": self.aligned,
            "n_condition": [float(v) for v in self.cond_counts.detach().cpu().tolist()],
        }

    def restore_training_state(self, state: dict[str, Any]) -> None:
        if state.get("phase") in ("warmup", "final"):
            self.phase = state["phase"]
        self.aligned = bool(state.get("aligned", self.aligned))

    def global_counts(self, dosages: sp.csr_matrix | np.ndarray, cond: np.ndarray) -> dict[str, torch.Tensor]:
        """sVAE+ charges a condition's prior to its cells: the cells of each condition."""
        c = np.asarray(cond)
        counts = np.bincount(c[c >= 0], minlength=self.n_conditions)[: self.n_conditions].astype(np.float32)
        return {"cond_counts": torch.as_tensor(counts).clamp_min(1.0)}

    @torch.no_grad()
    def align_units(self, mask_logit: float = 0.0) -> torch.Tensor:
        """Re-express the model in the orthogonal basis in which the expected shifts π ⊙ μ are
        sparsest in L1: the prior N(m ⊙ μ, I) and the networks describe the same cells in any
        rotated basis, only the sparsity prior tells them apart. Masks restart at
        ``mask_logit``. Returns the rotation."""

        table = torch.sigmoid(self.pi_logits) * self.shift
        R = sparsest_rotation(table.detach().cpu()).to(self.shift.device)
        rotate_input(self.decoder[0], R)
        rotate_mean_head(self.encoder[-1], R)
        self.shift.copy_(table @ R)
        self.pi_logits.fill_(float(mask_logit))
        return R

    # ---- local -----------------------------------------------------------------------
    def decode(self, z: torch.Tensor, d: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
        return mlp_forward(self.decoder, z, self.covariate_input(self.decoder_cov, c))

    def _encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return mean_and_log_std(mlp_forward(self.encoder, self.encoder_input(x), self.covariate_input(self.encoder_cov, c)))

    def loss(self, batch: Batch, n_particles: int = 5) -> LossOutput:
        P = n_particles
        c = self.covariates_of(batch)
        mean, log_std = self._encode(batch.x, c)
        table = self._masks(P) * self.shift  # [P,A,K]
        prior_mean = self._prior_mean(batch.cond, table)  # [P,B,K]
        z = mean + torch.exp(log_std) * torch.randn(P, *mean.shape, device=mean.device)
        out = self.decode(z, None, c)
        log_px = self.likelihood.varying(batch.x, out, torch.log(batch.library)).mean(0) + self.likelihood.constant(batch.x)
        kl_z = kl_normal_std_normal(mean, log_std, prior_mean).sum(-1).mean(0)
        has = batch.cond >= 0
        w = has.float() / self.cond_counts[batch.cond.clamp_min(0)]
        glob = self.log_beta_prior()[batch.cond.clamp_min(0)] * w
        elbo = log_px - kl_z + glob
        return LossOutput(
            -elbo.mean(),
            {"log_px": log_px.mean().detach(), "kl_z": kl_z.mean().detach(), "kl_global": -glob.mean().detach(),
             "neg_elbo": -elbo.mean().detach()},
        )

    def log_weights(self, batch: Batch, globals_: dict[str, torch.Tensor]) -> torch.Tensor:
        table = globals_["shift_table"]
        S = table.shape[0]
        c = self.covariates_of(batch)
        mean, log_std = self._encode(batch.x, c)
        eps = torch.randn(S, *mean.shape, device=mean.device)
        z = mean + torch.exp(log_std) * eps
        out = self.decode(z, None, c)
        log_px = self.likelihood.log_prob(batch.x, out, torch.log(batch.library))
        prior_mean = self._prior_mean(batch.cond, table)
        log_pz = std_normal_log_prob(z - prior_mean).sum(-1)
        log_qz = reparam_normal_log_prob(eps, log_std).sum(-1)
        return log_px + log_pz - log_qz

    def predict(
        self, d: torch.Tensor, globals_: dict[str, torch.Tensor], n_per_global: int = 1, c: torch.Tensor | None = None,
    ) -> torch.Tensor:
        idx = self.condition_index(d)
        table = globals_["shift_table"]
        prior_mean = self._prior_mean(idx, table)  # [S,R,K]
        if n_per_global > 1:
            prior_mean = prior_mean.repeat_interleave(n_per_global, dim=0)
        basal = torch.randn(prior_mean.shape[0], 1, prior_mean.shape[-1], device=prior_mean.device, dtype=prior_mean.dtype)
        return self.decode(prior_mean + basal, None, self.prediction_covariates(c, d.shape[0]))  # paired across rows

    def latent(self, batch: Batch) -> dict[str, torch.Tensor]:
        mean, _ = self._encode(batch.x, self.covariates_of(batch))
        table = (torch.sigmoid(self.pi_logits) * self.shift).unsqueeze(0)
        shift = self._prior_mean(batch.cond, table)[0]
        return {"basal": mean - shift, "full": mean}
