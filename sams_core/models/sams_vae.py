"""SAMS-VAE (Bereket & Karaletsos, NeurIPS 2023): sparse additive mechanism shift VAE.

Generative model (DESIGN §2): basal state z_b ~ N(0, I_K); per perturbation t a global
embedding e_t ~ N(0, s² I) and mask m_t,k ~ Bernoulli(α); z = z_b + Σ_t d_t (m_t ⊙ e_t);
x ~ likelihood(decoder(z)). The shift of a combination is the sum of its members' shifts.

Guide: q(M) independent Bernoulli logits, sampled straight-through; q(E) free Normals
(``guide="mean-field"``) or an MLP of [m_t, onehot(t)] (``guide="correlated"``, q(E | M));
q(z_b | x, shift) an encoder on standardised expression and the sampled shift.

Training schedule (DESIGN §2, "defaults are the papers' models"): the likelihood does not identify
the latent basis, so after ``align_at`` × the budget the basis is turned to the rotation in which
the perturbation shifts are sparsest (:meth:`SAMSVAE.align_units`), where the masks restart at
probability sigmoid(``align_mask_logit``) = 0.82 and the embeddings keep every expected shift;
for the next ``sparsify_for`` × the budget the prior terms (all global terms, or with
``sparsify_terms="masks"`` the masks' alone) may carry a temporary weight ``sparsify_weight``
that prunes the masks in the new basis; the last phase ("final") trains the objective whose
prior weight is ``global_weight`` — 1, the paper's ELBO, by default, so the delivered masks,
embeddings and intervals are the SAMS-VAE posterior. ``global_weight`` ≠ 1 is a *tempered*
posterior and the model's label says so. The schedule runs through :meth:`SAMSVAE.end_epoch`;
where it stands (:meth:`SAMSVAE.training_state`) is saved in bundles.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from sams_core.errors import SamsError
from sams_core.models.base import (
    Batch,
    LossOutput,
    PerturbationModel,
    SplitInputMLP,
    check_align_at,
    mlp,
    mlp_forward,
)
from sams_core.models.distributions import (
    kl_normal_std_normal,
    mean_and_log_std,
    normal_log_prob,
    relaxed_bernoulli_st,
    reparam_normal_log_prob,
    std_normal_log_prob,
)
from sams_core.models.registry import get as family_spec
from sams_core.models.rotation import rotate_input, rotate_mean_head, sparsest_rotation

GUIDES: tuple[str, ...] = family_spec("sams_vae").option("guide").choices or ()
SPARSIFY_TERMS: tuple[str, ...] = family_spec("sams_vae").option("sparsify_terms").choices or ()


class SAMSVAE(PerturbationModel):
    """SAMS-VAE with a mean-field or correlated guide over the global embeddings and masks."""

    family = "sams_vae"

    def __init__(
        self,
        n_genes: int,
        n_perturbations: int,
        *,
        guide: str = "mean-field",
        mask_prior: float = 0.01, embedding_prior_scale: float = 1.0,  # priors: P(m = 1) and the scale of e
        embed_hidden: int = 400, embed_layers: int = 2,  # the correlated guide's network
        temperature: float = 1.0, mask_init_logit: float = 0.0,  # the relaxed masks
        # the schedule (module docstring): prior weight of the final objective (1 = the paper's
        # ELBO), before the alignment, and for ``sparsify_for`` × the budget after it
        global_weight: float = 1.0, warmup_global_weight: float = 1.0,
        sparsify_weight: float = 30.0, sparsify_for: float = 0.5, sparsify_terms: str = "all",
        # a per-(perturbation, level of the primary covariate) offset on the embedding (option)
        covariate_shift: bool = False,
        # when to align; the masks' logit after it (1.5: probability 0.82, expected shifts kept)
        align_at: float | None = 0.25, align_mask_logit: float = 1.5,
        **common: Any,
    ):
        if guide not in GUIDES:
            raise SamsError(f"Unknown guide {guide!r}. Choose one of: {', '.join(GUIDES)}.")
        super().__init__(
            n_genes, n_perturbations, guide=guide,
            mask_prior=mask_prior, embedding_prior_scale=embedding_prior_scale,
            embed_hidden=embed_hidden, embed_layers=embed_layers,
            temperature=temperature, mask_init_logit=mask_init_logit,
            global_weight=global_weight, align_at=align_at,
            warmup_global_weight=warmup_global_weight, align_mask_logit=align_mask_logit,
            sparsify_weight=sparsify_weight, sparsify_for=sparsify_for, sparsify_terms=sparsify_terms,
            covariate_shift=covariate_shift,
            **common,
        )
        if covariate_shift:
            if not self.covariate_sizes:
                raise SamsError(
                    "covariate_shift lets a perturbation's shift depend on the covariate level, but this model has no "
                    "covariates. Read the screen with a covariate (covariate_keys=['cell_type']) or leave covariate_shift off."
                )
        check_align_at(align_at)
        if sparsify_terms not in SPARSIFY_TERMS:
            raise SamsError(f"sparsify_terms must be one of {', '.join(SPARSIFY_TERMS)}, got {sparsify_terms!r}.")
        if not 0.0 <= sparsify_for < 1.0:
            raise SamsError(f"sparsify_for must be a fraction of the training budget in [0, 1), got {sparsify_for!r}.")
        self.guide = guide
        self.use_masks = self.has_masks
        self.temperature = temperature
        self.global_weight = global_weight
        self.align_at = align_at
        self.warmup_global_weight = warmup_global_weight
        self.align_mask_logit = align_mask_logit
        self.sparsify_weight = sparsify_weight
        self.sparsify_for = sparsify_for
        self.sparsify_terms = sparsify_terms
        # where the schedule stands: "warmup" (before the alignment), "sparsify", "final"
        self.phase = "final" if (align_at is None or align_at == 0.0 or not self.has_masks) else "warmup"
        self.aligned = False  # whether the basis was turned by align_units during training
        self.final_from_epoch: int | None = None  # epoch after which the sparsify phase ends
        self.log_alpha = math.log(mask_prior)
        self.log_1m_alpha = math.log1p(-mask_prior)
        self.log_s = math.log(embedding_prior_scale)
        K, T, n_hidden, n_layers = self.n_latent, n_perturbations, self.n_hidden, self.n_layers
        # q(z_b | x, shift): since z = z_b + shift, the posterior of z_b is that of z moved by the
        # shift; the network reads x once per cell and the sampled shift enters the output
        # linearly (initialised to subtract it), so particles share all of the per-cell work.
        self.encoder = mlp(n_genes, n_hidden, 2 * K, n_layers)
        self.encoder_shift = nn.Linear(K, 2 * K, bias=False)
        with torch.no_grad():
            self.encoder_shift.weight.zero_()
            self.encoder_shift.weight[:K].copy_(-torch.eye(K))
        self.decoder = mlp(K, n_hidden, n_genes, n_layers)
        if self.use_masks:
            self.mask_logits = nn.Parameter(torch.full((T, K), float(mask_init_logit)))
        if guide == "mean-field":
            self.e_mean = nn.Parameter(0.1 * torch.randn(T, K))
            self.e_log_std = nn.Parameter(torch.full((T, K), -2.0))
        else:
            # q(e_t | m_t) = N(f(m_t, onehot t)): first layer split as W_m m_t + (row t of W_t)
            self.e_net = SplitInputMLP(T, K, embed_hidden, 2 * K, embed_layers)
        # covariates (scVI style): the one-hot levels enter the first layer of encoder and decoder
        self.encoder_cov = self.covariate_layer(n_hidden)
        self.decoder_cov = self.covariate_layer(n_hidden)
        if covariate_shift:
            # δ_{t,l}: z = z_b + Σ_t d_t m_t ⊙ (e_t + δ_{t,l}) for a cell of level l of the primary
            # covariate; a point estimate with prior N(0, s² I), charged like the global terms
            self.shift_offset = nn.Parameter(torch.zeros(T, self.covariate_sizes[0], K))

    # ---- globals ---------------------------------------------------------------------
    def _embedding_params(self, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.guide == "mean-field":
            return self.e_mean, self.e_log_std
        T = self.n_perturbations
        onehot_proj = self.e_net.proj_a.weight.t() + self.e_net.proj_a.bias  # [T, H]
        if m is None:
            m = torch.sigmoid(self.mask_logits) if self.use_masks else torch.ones(T, self.n_latent, device=onehot_proj.device)
        return mean_and_log_std(self.e_net.forward_from(onehot_proj, m))

    def _globals_with_log_ratio(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` shift tables [n, T, K], the per-perturbation log p - log q of all globals and of
        the masks alone [n, T], and the sampled masks."""
        T, K = self.n_perturbations, self.n_latent
        dev = self.input_mean.device
        mask_ratio = torch.zeros(n, T, device=dev)
        if self.use_masks:
            m, log_q_m = relaxed_bernoulli_st(self.mask_logits, self.temperature, (n,))
            log_p_m = m * self.log_alpha + (1 - m) * self.log_1m_alpha
            mask_ratio = (log_p_m - log_q_m).sum(-1)
        else:
            m = None
        mean, log_std = self._embedding_params(m)
        eps = torch.randn(n, T, K, device=dev)
        e = mean + torch.exp(log_std) * eps
        log_q_e = reparam_normal_log_prob(eps, log_std).sum(-1)
        log_p_e = normal_log_prob(e, torch.zeros((), device=dev), torch.full((), self.log_s, device=dev)).sum(-1)
        log_ratio = mask_ratio + log_p_e - log_q_e
        table = m * e if m is not None else e
        return table, log_ratio, mask_ratio, m if m is not None else torch.ones_like(e)

    def sample_globals(self, n: int) -> dict[str, torch.Tensor]:
        table, _, _, m = self._globals_with_log_ratio(n)
        return {"shift_table": table, "masks": m}

    def mean_globals(self) -> dict[str, torch.Tensor]:
        if self.use_masks:
            m = (torch.sigmoid(self.mask_logits) >= 0.5).float()
        else:
            m = None
        mean, _ = self._embedding_params(m)
        table = m * mean if m is not None else mean
        return {"shift_table": table.unsqueeze(0), "masks": (m if m is not None else torch.ones_like(mean)).unsqueeze(0)}

    def mask_probs(self) -> torch.Tensor | None:
        if not self.use_masks:
            return None
        return torch.sigmoid(self.mask_logits)

    def embedding_means(self) -> torch.Tensor:
        """Guide mean of each perturbation's embedding e_t [T, K] (given its most likely mask)."""
        m = (torch.sigmoid(self.mask_logits) >= 0.5).float() if self.use_masks else None
        return self._embedding_params(m)[0]

    #: Monte-Carlo draws of the masks for the correlated guide's expected shift (fixed seed)
    SHIFT_MC_DRAWS: ClassVar[int] = 256

    def expected_shift_table(self) -> torch.Tensor:
        """E_q[m_t ⊙ e_t] per perturbation [T, K].

        Mean-field: p ⊙ E[e] exactly. Correlated guide: E[e_t | m_t] depends on the whole mask
        vector m_t, so the expectation E_m[m ⊙ μ(m)] is taken by Monte Carlo over m ~ q(M)
        (``SHIFT_MC_DRAWS`` draws from a fixed seed: the same table at every call).
        """
        if not self.use_masks:
            return self._embedding_params(None)[0]
        p = torch.sigmoid(self.mask_logits)
        if self.guide == "mean-field":
            return p * self.e_mean
        gen = torch.Generator().manual_seed(0)
        u = torch.rand(self.SHIFT_MC_DRAWS, *p.shape, generator=gen).to(p.device)
        m = (u < p).to(p.dtype)  # [S, T, K] hard draws of q(M)
        mean, _ = self._embedding_params(m)
        return (m * mean).mean(0)

    def latent_shift(self, d: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Expected latent shift E_q[Σ_t d_t m_t e_t] of dosage rows ``d`` [R, T] (with
        ``covariate_shift``, plus E[m_t] ⊙ δ_{t,l} at the covariates ``c``; pooled when None)."""
        shift = d @ self.expected_shift_table()
        if hasattr(self, "shift_offset"):
            c = self.prediction_covariates(c, d.shape[0])
            p = torch.sigmoid(self.mask_logits) if self.use_masks else None
            shift = shift + self._level_shift(d, c, p)
        return shift

    # ---- identifiability of the latent basis ------------------------------------------
    @torch.no_grad()
    def rotate_units(self, rotation: torch.Tensor, mask_logit: float | None = None) -> None:
        """Express the model in the latent basis z' = z R (R orthogonal [K, K]).

        The basal prior N(0, I) is unchanged by a rotation, the encoder's mean output and the
        decoder's input are rotated with it, so the networks describe the same cells. Masks do not
        rotate, so their logits are set to ``mask_logit`` (kept as they are when None, exact only
        when R permutes units); the mean-field embedding means become the rotated expected shifts
        E[m ⊙ e] divided by the masks' new probability, so every perturbation's expected shift is
        kept (the correlated guide's embedding net is rotated as it is).
        """
        K = self.n_latent
        R = rotation.to(self.input_mean.device, torch.float32)
        if R.shape != (K, K) or not torch.allclose(R.T @ R, torch.eye(K, device=R.device), atol=1e-4):
            raise ValueError(f"rotation must be an orthogonal {K} x {K} matrix")
        table = torch.eye(self.n_perturbations, device=R.device) @ self.expected_shift_table()  # [T, K], shared part
        rotate_input(self.decoder[0], R)
        rotate_mean_head(self.encoder[-1], R)
        A = self.encoder_shift.weight  # [2K, K]: mean rows map shift → mean, then log-std rows
        A[:K] = R.T @ A[:K] @ R
        A[K:] = A[K:] @ R
        if hasattr(self, "shift_offset"):
            self.shift_offset.copy_(self.shift_offset @ R)
        if self.guide == "mean-field":
            # E[m ⊙ e] = p ⊙ e: with the masks restarting at probability p, embeddings of 1/p × the
            # rotated expected shifts keep every perturbation's expected shift where it was
            keep = 1.0 + math.exp(-float(mask_logit)) if self.use_masks and mask_logit is not None else 1.0  # 1 / sigmoid
            self.e_mean.copy_(table @ R * keep)
            self.e_log_std.fill_(-2.0)
        else:
            rotate_mean_head(self.e_net.rest[-1], R)
        if self.use_masks and mask_logit is not None:
            self.mask_logits.fill_(float(mask_logit))

    @property
    def current_global_weight(self) -> float:
        """Weight of the global prior terms now: ``warmup_global_weight`` before the alignment,
        ``sparsify_weight`` in the sparsify phase, ``global_weight`` in the final phase."""
        return {"warmup": self.warmup_global_weight, "sparsify": self.sparsify_weight}.get(self.phase, self.global_weight)

    @property
    def schedule_phase(self) -> str:
        return self.phase

    def end_epoch(self, epoch: int, total_epochs: int) -> bool:
        """Training schedule (module docstring): after ``align_at`` × the budget, align the
        latent basis (:meth:`align_units`) and enter the sparsify phase (or the final one when
        ``sparsify_for`` is 0); after ``sparsify_for`` × the budget more, enter the final phase.
        True when parameters were re-expressed (the optimiser's running statistics no longer
        apply); a change of phase alone returns False (see :attr:`schedule_phase`)."""
        if self.phase == "sparsify" and self.final_from_epoch is not None and epoch >= self.final_from_epoch:
            self.phase = "final"
            return False
        if self.phase != "warmup" or epoch < max(1, round(self.align_at * total_epochs)):
            return False
        if epoch >= total_epochs:  # no training left to adapt to a new basis
            return False
        self.align_units()
        self.aligned = True
        n_sparsify = round(self.sparsify_for * total_epochs)
        if n_sparsify > 0 and epoch + n_sparsify < total_epochs:
            self.phase, self.final_from_epoch = "sparsify", epoch + n_sparsify
        else:
            self.phase = "final"
        return True

    def training_state(self) -> dict[str, Any]:
        """Where the schedule stands: phase, the prior weight in force, whether the basis was
        aligned, the epoch the final phase starts, and N_t (training cells per perturbation)."""
        return {
            **super().training_state(),
            "phase": self.phase,
            "global_weight_in_force": self.current_global_weight,
            "aligned": self.aligned,
            "final_from_epoch": self.final_from_epoch,
        }

    def restore_training_state(self, state: dict[str, Any]) -> None:
        super().restore_training_state(state)
        if state.get("phase") in ("warmup", "sparsify", "final"):
            self.phase = state["phase"]
        self.aligned = bool(state.get("aligned", self.aligned))
        self.final_from_epoch = state.get("final_from_epoch")

    @torch.no_grad()
    def align_units(self, mask_logit: float | None = None) -> torch.Tensor:
        """Turn the latent basis to the one in which the perturbations' shifts are sparsest.

        The likelihood does not identify the basis (a rotated basal prior is the same prior); only
        the mask prior prefers the basis in which each perturbation moves few units, and it is too
        weak a force for gradient descent to turn a basis learned with dense masks. This takes the
        step directly: the rotation in which the expected shift table (perturbations × units) is
        sparsest (:func:`sams_core.models.rotation.sparsest_rotation`), applied with
        :meth:`rotate_units`; masks restart at ``mask_logit`` (default: the model's
        ``align_mask_logit``) in the new basis. Returns the rotation.
        """

        table = torch.eye(self.n_perturbations, device=self.input_mean.device) @ self.expected_shift_table()
        R = sparsest_rotation(table.detach().cpu())
        self.rotate_units(R, self.align_mask_logit if mask_logit is None else mask_logit)
        return R

    # ---- local -----------------------------------------------------------------------
    def decode(self, z: torch.Tensor, d: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
        return mlp_forward(self.decoder, z, self.covariate_input(self.decoder_cov, c))

    def _encode(self, x: torch.Tensor, shift: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of q(z_b | x, c, shift); ``shift`` may carry particle dimensions."""
        extra = self.covariate_input(self.encoder_cov, c)
        return mean_and_log_std(mlp_forward(self.encoder, self.encoder_input(x), extra) + self.encoder_shift(shift))

    def _level_shift(self, d: torch.Tensor, c: torch.Tensor | None, m: torch.Tensor | None) -> torch.Tensor | None:
        """Σ_t d_t m_t ⊙ δ_{t,l} for each row's level l (``covariate_shift``; None without it).
        ``c`` one-hot (or level shares) [R, Σ levels]; ``m`` masks [P, T, K] (None: no masks)."""
        if not hasattr(self, "shift_offset") or c is None:
            return None
        out = None
        for lvl in range(self.covariate_sizes[0]):
            offset = self.shift_offset[:, lvl]  # [T, K]
            if m is not None:
                offset = m * offset
            part = torch.matmul(d * c[:, lvl : lvl + 1], offset)
            out = part if out is None else out + part
        return out

    def _offset_log_prior(self, d: torch.Tensor) -> torch.Tensor | None:
        """log N(δ_t; 0, s² I) per cell, charged as the global terms are (1/N_t); None without δ."""
        if not hasattr(self, "shift_offset"):
            return None
        lp = normal_log_prob(
            self.shift_offset, torch.zeros((), device=d.device), torch.full((), self.log_s, device=d.device)
        ).sum((-1, -2))  # [T]
        return self.global_weights(d) @ lp

    def loss(self, batch: Batch, n_particles: int = 5) -> LossOutput:
        P = n_particles
        c = self.covariates_of(batch)
        table, log_ratio, mask_ratio, m = self._globals_with_log_ratio(P)  # [P,T,K], [P,T], [P,T]
        shift = torch.matmul(batch.d, table)  # [P,B,K]
        level = self._level_shift(batch.d, c, m if self.use_masks else None)
        if level is not None:
            shift = shift + level
        mean, log_std = self._encode(batch.x, shift, c)
        z_b = mean + torch.exp(log_std) * torch.randn_like(mean)
        out = self.decode(z_b + shift, None, c)  # [P,B,G]
        log_lib = torch.log(batch.library)
        log_px = self.likelihood.varying(batch.x, out, log_lib).mean(0) + self.likelihood.constant(batch.x)
        kl_z = kl_normal_std_normal(mean, log_std).sum(-1).mean(0)  # [B]
        weights = self.global_weights(batch.d).t()
        glob = (log_ratio @ weights).mean(0)  # [B]
        offset_prior = self._offset_log_prior(batch.d)
        if offset_prior is not None:
            glob = glob + offset_prior
        elbo = log_px - kl_z + glob  # the paper's ELBO, whatever the schedule's weight
        # the schedule's weight: on every global term, or in the sparsify phase on the masks' alone
        weighted = (mask_ratio @ weights).mean(0) if self.phase == "sparsify" and self.sparsify_terms == "masks" else glob
        objective = elbo + (self.current_global_weight - 1.0) * weighted
        return LossOutput(
            loss=-objective.mean(),
            terms={
                "log_px": log_px.mean().detach(),
                "kl_z": kl_z.mean().detach(),
                "kl_global": -glob.mean().detach(),
                "neg_elbo": -elbo.mean().detach(),
            },
        )

    def log_weights(self, batch: Batch, globals_: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.covariates_of(batch)
        table = globals_["shift_table"]  # [S,T,K]
        shift = torch.matmul(batch.d, table)  # [S,B,K]
        level = self._level_shift(batch.d, c, globals_["masks"] if self.use_masks else None)
        if level is not None:
            shift = shift + level
        mean, log_std = self._encode(batch.x, shift, c)
        eps = torch.randn_like(mean)
        z_b = mean + torch.exp(log_std) * eps
        out = self.decode(z_b + shift, None, c)
        log_px = self.likelihood.log_prob(batch.x, out, torch.log(batch.library))
        log_pz = std_normal_log_prob(z_b).sum(-1)
        log_qz = reparam_normal_log_prob(eps, log_std).sum(-1)
        return log_px + log_pz - log_qz

    def predict(
        self, d: torch.Tensor, globals_: dict[str, torch.Tensor], n_per_global: int = 1, c: torch.Tensor | None = None,
    ) -> torch.Tensor:
        table = globals_["shift_table"]  # [S,T,K]
        shift = torch.matmul(d, table)  # [S,R,K]
        c = self.prediction_covariates(c, d.shape[0])
        level = self._level_shift(d, c, globals_["masks"] if self.use_masks else None)
        if level is not None:
            shift = shift + level
        if n_per_global > 1:
            shift = shift.repeat_interleave(n_per_global, dim=0)
        # one basal draw per cell shared by every dosage row (paired draws): a combination, its
        # members and the control differ by their shifts only, not by Monte-Carlo noise
        z = torch.randn(shift.shape[0], 1, shift.shape[-1], device=shift.device, dtype=shift.dtype) + shift
        return self.decode(z, None, c)

    def latent(self, batch: Batch) -> dict[str, torch.Tensor]:
        c = self.covariates_of(batch)
        shift = self.latent_shift(batch.d, c)
        mean, _ = self._encode(batch.x, shift, c)
        return {"basal": mean, "full": mean + shift}
