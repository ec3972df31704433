"""The interface every model family implements, and the network pieces they share.

A model is a plain ``torch.nn.Module`` built from a dictionary of hyper-parameters
(``model.hparams``), so that a bundle can rebuild it without pickling. Every family answers:

- :meth:`PerturbationModel.loss` — negative ELBO per cell for a mini-batch, with its terms
  (also ``model(batch, n_particles)``, so that DistributedDataParallel can wrap the model);
- :meth:`PerturbationModel.sample_globals` — draws of the global latents from the guide;
- :meth:`PerturbationModel.predict` — posterior-predictive decoder output for dosage rows;
- :meth:`PerturbationModel.log_weights` — importance weights for the held-out IWELBO;
- :meth:`PerturbationModel.latent` — posterior latent means of cells;
- :meth:`PerturbationModel.mask_probs` — mask probabilities where the family has masks.

A family's constructor takes ``n_genes``, ``n_perturbations`` and its own options as keywords and
passes the hyper-parameters every family shares (``n_latent``, ``likelihood``, ``n_hidden``,
``n_layers``) on to :class:`PerturbationModel`, which records them all in ``hparams``.

What a family is (label, options, capabilities) is declared once in
:mod:`sams_core.models.registry`; a model reads its capabilities from there (:attr:`spec`). Hooks
with a do-nothing default let a family set itself up from the training cells without the trainer
knowing it: :meth:`~PerturbationModel.data_hparams`, :meth:`~PerturbationModel.prepare_for_data`,
:meth:`~PerturbationModel.vocabulary` and :meth:`~PerturbationModel.condition_ids`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from sams_core.errors import SamsError
from sams_core.models import registry
from sams_core.models.distributions import Likelihood
from sams_core.models.registry import FamilySpec


@dataclass
class Batch:
    """A mini-batch on the model's device: expression, dosage rows, library sizes, condition ids,
    and the cells' one-hot covariates.

    ``cond`` indexes the model's condition vocabulary (sVAE+); -1 marks controls or unknown
    conditions. ``c`` is [B, Σ levels] (see :meth:`sams_core.data.screen.PerturbationData.covariate_onehot`);
    None or [B, 0] for a screen without covariates.
    """

    x: torch.Tensor
    d: torch.Tensor
    library: torch.Tensor
    cond: torch.Tensor
    c: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


@dataclass
class LossOutput:
    """Negative ELBO per cell (to minimise) and its terms (per-cell means, detached)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


def mlp(n_in: int, n_hidden: int, n_out: int, n_layers: int = 1) -> nn.Sequential:
    """A feed-forward net with ``n_layers`` hidden layers of width ``n_hidden`` (leaky ReLU)."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(n_layers):
        layers += [nn.Linear(width, n_hidden), nn.LeakyReLU(0.01)]
        width = n_hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def check_align_at(align_at: float | None) -> None:
    """Refuse an alignment point that is not a fraction of the training budget in [0, 1) or None."""
    if align_at is not None and not 0.0 <= align_at < 1.0:
        raise SamsError(
            f"align_at must be a fraction of the training budget in [0, 1) or None, got {align_at!r}. "
            "Pass e.g. 0.25, or None to keep the latent basis as trained."
        )


class SplitInputMLP(nn.Module):
    """An MLP on the concatenation [a, b] whose first layer is split as W_a a + W_b b.

    ``a`` (e.g. a cell's expression) can then be projected once and shared across particles
    while ``b`` (e.g. a sampled latent shift) varies per particle: the work on ``a`` is not
    repeated.
    """

    def __init__(self, n_a: int, n_b: int, n_hidden: int, n_out: int, n_layers: int = 1):
        super().__init__()
        if n_layers < 1:
            raise ValueError("n_layers must be at least 1")
        self.proj_a = nn.Linear(n_a, n_hidden)
        self.proj_b = nn.Linear(n_b, n_hidden, bias=False) if n_b > 0 else None
        rest: list[nn.Module] = [nn.LeakyReLU(0.01)]
        for _ in range(n_layers - 1):
            rest += [nn.Linear(n_hidden, n_hidden), nn.LeakyReLU(0.01)]
        rest.append(nn.Linear(n_hidden, n_out))
        self.rest = nn.Sequential(*rest)

    def project_a(self, a: torch.Tensor) -> torch.Tensor:
        return self.proj_a(a)

    def forward_from(self, ha: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """Finish the forward pass from a projected ``a`` (broadcasts over particle dims of b)."""
        h = ha if (b is None or self.proj_b is None) else ha + self.proj_b(b)
        return self.rest(h)

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_from(self.project_a(a), b)


def mlp_forward(net: nn.Sequential, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """``net(x)`` with ``extra`` added to the first layer's output (before its activation): how the
    covariates enter an :func:`mlp` (``extra`` broadcasts over particle dimensions of ``x``).
    Without ``extra`` it is exactly ``net(x)``."""
    if extra is None:
        return net(x)
    return net[1:](net[0](x) + extra)


def cells_per_perturbation(dosages: sp.spmatrix | sp.sparray | np.ndarray) -> np.ndarray:
    """N_t: the cells (rows) with a non-zero dosage of each perturbation (column), float32, from a
    screen's CSR dosage matrix (its stored non-zero entries, counted per column) or dense rows."""
    if sp.issparse(dosages):
        d = sp.csr_matrix(dosages)
        if not d.has_canonical_format:  # a column counted once per cell, whatever the storage
            d = d.copy()
            d.sum_duplicates()
        return np.bincount(d.indices[d.data != 0], minlength=d.shape[1]).astype(np.float32)
    return (np.asarray(dosages) != 0).sum(0).astype(np.float32)


def distinct_dosage_rows(dosages: sp.spmatrix | sp.sparray | np.ndarray) -> tuple[np.ndarray, list[bytes]]:
    """The distinct rows of a dosage matrix (a screen's CSR matrix or dense rows): each row's index
    among them, and one key per distinct row (its non-zero columns and float32 dosages as bytes;
    equal keys are equal rows, whether the rows came sparse or dense).

    Rows are grouped by their number of non-zero entries and each group's (columns, dosages)
    block goes through ``np.unique``: O(non-zeros · log cells), no Python work per cell."""
    d = sp.csr_matrix(dosages, dtype=np.float32, copy=True)
    d.sum_duplicates()
    d.eliminate_zeros()
    nnz = np.diff(d.indptr)
    inverse = np.empty(d.shape[0], dtype=np.int64)
    keys: list[bytes] = []
    for k in np.unique(nnz).tolist():
        rows = np.flatnonzero(nnz == k)
        if k == 0:
            inverse[rows] = len(keys)
            keys.append(b"")
            continue
        at = d.indptr[rows][:, None] + np.arange(k)
        block = np.concatenate([d.indices[at].astype(np.int64), d.data[at].view(np.int32).astype(np.int64)], axis=1)
        uniq, inv = np.unique(block, axis=0, return_inverse=True)
        inverse[rows] = len(keys) + inv.ravel()
        keys.extend(u.tobytes() for u in uniq)
    return inverse, keys


class ScreenCells(Protocol):
    """What a family may read from a screen to set itself up: each cell's condition label
    ("control", "A", "A+B") and the dosage row of a label
    (:class:`sams_core.data.screen.PerturbationData` has both)."""

    labels: np.ndarray

    def dosage_row(self, label: str) -> np.ndarray: ...


class PerturbationModel(nn.Module):
    """Common base: input standardisation, likelihood, data statistics and the interface."""

    family: ClassVar[str] = "base"  # the name the family is registered under

    def __init__(
        self,
        n_genes: int,
        n_perturbations: int,
        n_latent: int = 15,
        likelihood: str = "nb",
        n_hidden: int = 350,
        n_layers: int = 1,
        covariate_sizes: Sequence[int] = (),
        **hparams: Any,
    ):
        """The hyper-parameters every family shares (latent units, likelihood, width and depth of
        its networks, the number of levels of each covariate); a family's own ones in ``hparams``
        are recorded with them.

        With ``covariate_sizes`` (levels per covariate, e.g. ``[4]`` for four cell types) the
        encoder and decoder condition on the cells' one-hot covariates, scVI style: the one-hot
        vector enters the first layer of each network, so the latent state describes a cell
        within its covariate levels and perturbation shifts stay in the shared latent space.
        Without covariates the model has no covariate parameter at all (exactly as before)."""
        super().__init__()
        self.covariate_sizes = [int(v) for v in covariate_sizes]
        if any(v < 1 for v in self.covariate_sizes):
            raise SamsError(f"covariate_sizes must be positive level counts, got {self.covariate_sizes}.")
        self.n_covariates = int(sum(self.covariate_sizes))
        self.hparams: dict[str, Any] = {
            "n_genes": n_genes,
            "n_perturbations": n_perturbations,
            "n_latent": n_latent,
            "likelihood": likelihood,
            "n_hidden": n_hidden,
            "n_layers": n_layers,
            **({"covariate_sizes": list(self.covariate_sizes)} if self.covariate_sizes else {}),
            **hparams,
        }
        self.n_genes = n_genes
        self.n_perturbations = n_perturbations
        self.n_latent = n_latent
        self.n_hidden = n_hidden
        self.n_layers = n_layers
        self.likelihood = Likelihood(likelihood, n_genes)
        self.register_buffer("input_mean", torch.zeros(n_genes))
        self.register_buffer("input_std", torch.ones(n_genes))
        # cells per perturbation in the training split: global terms are charged 1/N_t per cell
        self.register_buffer("pert_counts", torch.ones(n_perturbations))
        if self.n_covariates:
            # share of training cells at each level (the covariate input of a pooled prediction)
            self.register_buffer("covariate_freq", torch.cat([torch.full((k,), 1.0 / k) for k in self.covariate_sizes]))

    # ---- covariates ------------------------------------------------------------------------
    def covariate_layer(self, n_out: int) -> nn.Linear | None:
        """A bias-free projection of the one-hot covariates into a first hidden layer of width
        ``n_out`` (None for a model without covariates: no parameter is created)."""
        return nn.Linear(self.n_covariates, n_out, bias=False) if self.n_covariates else None

    def covariates_of(self, batch: Batch) -> torch.Tensor | None:
        """The batch's one-hot covariates checked against the model (None without covariates)."""
        if not self.n_covariates:
            return None
        c = batch.c
        if c is None or c.shape[-1] != self.n_covariates:
            got = 0 if c is None else int(c.shape[-1])
            raise SamsError(
                f"This model conditions on covariates ({self.n_covariates} one-hot columns) but the cells carry {got}. "
                "Read the data with the model's covariates (pipeline.data_for_bundle does)."
            )
        return c

    @torch.no_grad()
    def set_covariate_stats(self, frequencies: torch.Tensor) -> None:
        """Store each level's share of the training cells (per covariate block; sums to 1 each)."""
        if self.n_covariates:
            self.covariate_freq.copy_(frequencies.to(self.covariate_freq))

    def covariate_row(self, level: int | None = None) -> torch.Tensor:
        """The covariate input of a prediction [Σ levels]: the primary covariate's one-hot ``level``
        (its index), the other covariates at their training shares; all at their training shares
        (a pooled prediction) when ``level`` is None. Empty for a model without covariates."""
        dev = self.input_mean.device
        if not self.n_covariates:
            if level is not None:
                raise SamsError("This model was trained without covariates; predict without a covariate level.")
            return torch.zeros(0, device=dev)
        row = self.covariate_freq.clone()
        if level is not None:
            k = self.covariate_sizes[0]
            if not 0 <= int(level) < k:
                raise SamsError(f"Covariate level index {level} out of range: the model knows {k} levels.")
            row[:k] = 0.0
            row[int(level)] = 1.0
        return row

    def covariate_input(self, layer: nn.Linear | None, c: torch.Tensor | None) -> torch.Tensor | None:
        """``layer(c)``, the covariates' contribution to a first hidden layer; ``c`` None means the
        training shares of the levels (pooled); None for a model without covariates."""
        if layer is None:
            return None
        return layer(self.covariate_freq if c is None else c)

    def prediction_covariates(self, c: torch.Tensor | None, n_rows: int) -> torch.Tensor | None:
        """Covariates [R, Σ levels] for ``n_rows`` predicted rows from ``c`` (a row [Σ levels],
        rows [R, Σ levels], or None: pooled); None for a model without covariates."""
        if not self.n_covariates:
            return None
        if c is None:
            c = self.covariate_row(None)
        c = c.to(self.input_mean.device, torch.float32)
        return c.expand(n_rows, -1) if c.dim() == 1 else c

    # ---- what the family is (declared once, in the registry) ---------------------------
    @property
    def spec(self) -> FamilySpec:
        """This family's registry entry: label, options, capabilities."""
        return registry.get(self.family)

    @property
    def has_masks(self) -> bool:
        """Whether the family learns which latent units each perturbation acts on."""
        return self.spec.capabilities.has_masks

    @property
    def composes(self) -> bool:
        """Whether the family predicts a combination it never saw from its members."""
        return self.spec.capabilities.composes_unseen_combinations

    # ---- hooks: family-specific setup from the training cells ---------------------------
    @classmethod
    def vocabulary(cls, labels: Sequence[str] | np.ndarray) -> list[str] | None:
        """The conditions a model of this family learns one by one, from the training cells'
        labels (sorted, controls left out); None for a family without a condition vocabulary."""
        return None

    @classmethod
    def data_hparams(cls, data: ScreenCells, train_idx: np.ndarray) -> dict[str, Any]:
        """Hyper-parameters the family takes from the training cells ``train_idx`` of ``data``
        (sizes of things learned per condition, say); none by default."""
        return {}

    def prepare_for_data(self, data: ScreenCells, train_idx: np.ndarray) -> None:
        """Family-specific setup from the training cells, after the model is built and its
        data statistics are set (:meth:`set_data_stats`); nothing by default."""

    def condition_ids(self, dosages: sp.csr_matrix | np.ndarray) -> np.ndarray:
        """Each dosage row's index in the model's condition vocabulary, -1 for none (controls,
        unknown conditions, or a family without a vocabulary). ``dosages`` is a screen's per-cell
        CSR matrix (:attr:`PerturbationData.dosages`) or dense rows."""
        return np.full(int(dosages.shape[0]), -1, dtype=np.int64)

    # ---- data statistics -------------------------------------------------------------
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised encoder input: log1p(counts) (or the log-normalised value), z-scored."""
        v = torch.log1p(x) if self.likelihood.kind != "gaussian" else x
        return (v - self.input_mean) / self.input_std

    @torch.no_grad()
    def set_data_stats(self, input_mean: torch.Tensor, input_std: torch.Tensor, pert_counts: torch.Tensor) -> None:
        """Store the training split's encoder-input statistics and cells per perturbation."""
        self.input_mean.copy_(input_mean)
        self.input_std.copy_(input_std.clamp_min(1e-3))
        self.pert_counts.copy_(pert_counts.clamp_min(1.0))

    def global_weights(self, d: torch.Tensor) -> torch.Tensor:
        """Weight of each perturbation's global term in each cell: 1/N_t if the cell got t."""
        return (d != 0).to(d.dtype) / self.pert_counts

    def global_parameter_names(self) -> set[str]:
        """Names of the parameters of per-perturbation global latents (trained at their own rate)."""
        return {n for n in ("mask_logits", "e_mean", "e_log_std", "shift", "pi_logits", "shift_offset") if hasattr(self, n)}

    def parameter_groups(self, lr: float, global_lr_scale: float = 1.0) -> list[dict[str, Any]]:
        """Optimiser parameter groups: networks at ``lr``, per-perturbation globals at ``lr × scale``.

        Each global parameter sees only the cells of its perturbation, a small fraction of every
        mini-batch, so it gets far fewer informative updates than the shared networks.
        """
        names = self.global_parameter_names()
        glob = [p for n, p in self.named_parameters() if n in names]
        rest = [p for n, p in self.named_parameters() if n not in names]
        groups = [{"params": rest, "lr": lr}]
        if glob:
            groups.append({"params": glob, "lr": lr * global_lr_scale})
        return groups

    # ---- interface ----------------------------------------------------------------------
    def forward(self, batch: Batch, n_particles: int = 5) -> LossOutput:
        """The loss of a mini-batch, as :meth:`loss`.

        ``nn.Module`` entry point so that ``DistributedDataParallel`` (which hooks ``__call__``)
        can wrap a model: ``ddp(batch, n_particles).loss.backward()`` all-reduces the gradients.
        """
        return self.loss(batch, n_particles)

    def end_epoch(self, epoch: int, total_epochs: int) -> bool:
        """Called by training after each epoch (1-based) of ``total_epochs``; True when the model
        re-expressed its parameters (the optimiser must start afresh). Nothing by default.

        A family with a training schedule also moves :attr:`schedule_phase` here; training keeps
        the best state of the last phase and says when an earlier phase had a better one."""
        return False

    @property
    def schedule_phase(self) -> str:
        """Name of the training schedule's phase the model is in ("final": the objective the
        delivered model is trained on; families without a schedule are always there)."""
        return "final"

    def training_state(self) -> dict[str, Any]:
        """What, beyond weights and hyper-parameters, fixes the training objective: the schedule's
        phase and the prior weight in force, and N_t, the training cells per perturbation (the
        1/N_t charge of global terms; also in the weights as ``pert_counts``). Saved in bundles."""
        return {
            "phase": self.schedule_phase,
            "global_weight_in_force": 1.0,
            "n_t": [float(v) for v in self.pert_counts.detach().cpu().tolist()],
        }

    def restore_training_state(self, state: dict[str, Any]) -> None:
        """Put the schedule back where :meth:`training_state` recorded it (a reloaded bundle then
        computes the same training objective). N_t comes back with the weights."""

    def global_counts(self, dosages: sp.csr_matrix | np.ndarray, cond: np.ndarray) -> dict[str, torch.Tensor]:
        """The count buffers that charge global terms (name → counts) for a set of cells given
        by their dosage rows (sparse or dense) and condition ids: N_t, the cells with each perturbation."""
        return {"pert_counts": torch.as_tensor(cells_per_perturbation(dosages)).clamp_min(1.0)}

    @contextlib.contextmanager
    def charged_to(self, dosages: sp.csr_matrix | np.ndarray, cond: np.ndarray) -> Iterator[None]:
        """Within the block, global terms are charged with the counts of these cells (e.g. the
        validation split's N_t when scoring validation cells), then the training counts return."""
        new = self.global_counts(dosages, cond)
        saved = {name: getattr(self, name).clone() for name in new}
        try:
            with torch.no_grad():
                for name, value in new.items():
                    getattr(self, name).copy_(value.to(getattr(self, name).device))
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    getattr(self, name).copy_(value)

    def loss(self, batch: Batch, n_particles: int = 5) -> LossOutput:
        raise NotImplementedError

    def sample_globals(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` draws of the global latents from the guide.

        Families without global latents return only a placeholder ``draws`` of length ``n`` so
        that the number of Monte-Carlo draws travels the same way for every family.
        """
        return {"draws": torch.zeros(n, device=self.input_mean.device)}

    def mean_globals(self) -> dict[str, torch.Tensor]:
        """A single representative value of the globals (guide means, most likely masks)."""
        return self.sample_globals(1)

    def predict(
        self, d: torch.Tensor, globals_: dict[str, torch.Tensor], n_per_global: int = 1, c: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder output [S, R, G] for dosage rows ``d`` [R, T] with z_b from the prior.

        S = (number of global draws) × ``n_per_global``; apply ``likelihood.mean`` to get
        expected expression. ``c``: the covariates to predict at, one row [Σ levels] for all rows
        or one per row (:meth:`covariate_row` makes one for a level); None: at the training
        shares of every level (pooled). Ignored by a model without covariates.
        """
        raise NotImplementedError

    def log_weights(self, batch: Batch, globals_: dict[str, torch.Tensor]) -> torch.Tensor:
        """Importance log-weights [S, B] of held-out cells, one per global draw in ``globals_``."""
        raise NotImplementedError

    def latent(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Posterior latent means of cells: ``basal`` (before the shift) and ``full``."""
        raise NotImplementedError

    def mask_probs(self) -> torch.Tensor | None:
        """Probability that each row (perturbation) acts on each latent unit; None without masks."""
        return None

    def latent_shift(self, d: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Expected latent shift of dosage rows ``d`` [R, T] → [R, K] (zero without one); ``c``
        the covariates (as in :meth:`predict`) where the shift depends on the level."""
        return torch.zeros(d.shape[0], self.n_latent, device=d.device)

    def decode(self, z: torch.Tensor, d: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder output for latents ``z`` (with dosage rows ``d`` where the family reads them, and
        covariates ``c``: None means the training shares of the levels)."""
        raise NotImplementedError

    def n_prior_draws(self, globals_: dict[str, torch.Tensor]) -> int:
        """How many global draws a globals dictionary holds."""
        return int(next(iter(globals_.values())).shape[0])
