"""What a model predicts for combinations: effects, which pair to measure next, distances.

:func:`predict_effect` gives the per-gene effect of any combination (with dosages) as log2 fold
changes against control on the ATE scale of DESIGN §3, from posterior samples of the globals
(mean and credible interval), with its singles and their interaction; :func:`compare_with_data`
sets it beside the sum of its singles, the additive-in-data baseline and the observed effect.
:func:`rank_unmeasured_pairs` ranks the pairs not yet measured; :func:`perturbation_distances`
compares perturbations by their masks or latent shifts. Combinations are named as in
:mod:`sams_core.labels` ("A+B", "A:0.5+B", a member list or ``{name: dosage}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.spatial.distance import pdist, squareform

from sams_core.errors import SamsError
from sams_core.evaluation.baselines import additive_baseline
from sams_core.evaluation.metrics import model_ate_draws
from sams_core.io.bundle import ModelBundle
from sams_core.labels import (
    Combination,
    as_dosages,
    canonical_label,
    combination_label,
    dosage_rows,
    split_label,
)

__all__ = [
    "EffectPrediction",
    "compare_with_data",
    "perturbation_distances",
    "predict_effect",
    "rank_unmeasured_pairs",
]


@dataclass
class EffectPrediction:
    """Predicted per-gene effect of one combination, its singles and their interaction."""

    label: str  # canonical for unit dosages ("GATA1+KLF1"), else with dosages ("KLF1:0.5")
    dosages: dict[str, float]  # member → dosage
    genes: list[str]
    mean: np.ndarray  # [G] posterior mean log2 fold change
    lower: np.ndarray  # [G] credible interval
    upper: np.ndarray
    latent_shift: np.ndarray  # [K] expected latent shift
    singles: dict[str, np.ndarray]  # member → its own predicted effect (at its dosage)
    interaction: np.ndarray | None  # [G] combination minus the sum of its singles (None for one member)
    level: float

    @property
    def interaction_score(self) -> float:
        """Size of the interaction relative to the combination's effect (0 = purely additive)."""
        if self.interaction is None:
            return 0.0
        denom = float(np.linalg.norm(self.mean))
        return float(np.linalg.norm(self.interaction) / denom) if denom > 0 else 0.0

    @property
    def effect_norm(self) -> float:
        """Euclidean norm of the mean effect over genes (how much the combination moves expression)."""
        return float(np.linalg.norm(self.mean))

    @property
    def mean_interval_width(self) -> float:
        """Width of the credible interval, averaged over genes (the prediction's uncertainty)."""
        return float((self.upper - self.lower).mean())

    @property
    def n_genes_excluding_zero(self) -> int:
        """Genes whose credible interval lies wholly above or below 0."""
        return int(((self.lower > 0) | (self.upper < 0)).sum())

    @property
    def unit_dosages(self) -> bool:
        """Whether every member is at dosage 1 (a condition a screen can hold)."""
        return all(v == 1.0 for v in self.dosages.values())

    @property
    def sum_of_singles(self) -> np.ndarray:
        """[G] the sum of the members' own predicted effects (the additive expectation)."""
        return np.sum(list(self.singles.values()), axis=0)

    def table(self) -> pd.DataFrame:
        """One row per gene: effect, interval, interaction, and each single's effect."""
        t = pd.DataFrame({"gene": self.genes, "effect": self.mean, "lower": self.lower, "upper": self.upper})
        if self.interaction is not None:
            t["interaction"] = self.interaction
        for name, eff in self.singles.items():
            t[f"single_{name}"] = eff
        return t


def predict_effect(
    bundle: ModelBundle,
    combo: Combination,
    n_globals: int = 100,
    n_per_global: int = 10,
    level: float = 0.9,
    seed: int = 0,
    sample_counts: bool = False,
    covariate_level: str | None = None,
) -> EffectPrediction:
    """Predicted effect of ``combo`` (a label "A+B", a member list, or {name: dosage}).

    ``covariate_level``: a level of the model's primary covariate (e.g. a cell type, see
    ``bundle.covariates``) to predict in; None predicts at the training shares of the levels
    (pooled; the only choice for a model without covariates).

    The combination and each of its members are predicted with the same draws of the globals,
    so the interaction (combination minus the sum of its singles) carries no Monte-Carlo
    difference between them. ``sample_counts`` draws counts from the likelihood before the
    ATE transform (slower; the default transforms the expected expression).
    """
    if not 0 < level < 1:
        raise SamsError(f"Credible level must be between 0 and 1, got {level}.")
    members = as_dosages(combo, bundle.perturbations)
    if not members:
        raise SamsError("Pick at least one perturbation: the control has no effect to predict.")
    rows = [members] + ([{m: v} for m, v in members.items()] if len(members) > 1 else [])
    d = dosage_rows(rows, bundle.perturbations)
    k = bundle.level_index(covariate_level)
    draws = model_ate_draws(bundle.model, d, bundle.is_counts, n_globals, n_per_global, seed, sample_counts, covariate_level=k)
    q = (1 - level) / 2
    main = draws[:, 0]
    singles = {m: draws[:, i + 1].mean(0) for i, m in enumerate(members)} if len(members) > 1 else {next(iter(members)): main.mean(0)}
    interaction = None
    if len(members) > 1:
        interaction = (main - draws[:, 1:].sum(1)).mean(0)
    with torch.no_grad():
        dev = bundle.model.input_mean.device
        c = bundle.model.covariate_row(k).unsqueeze(0) if bundle.model.n_covariates else None
        shift = bundle.model.latent_shift(torch.as_tensor(d[:1], device=dev), c)[0].cpu().numpy()
    return EffectPrediction(
        label=combination_label(members, bundle.perturbations),
        dosages=dict(members),
        genes=bundle.genes,
        mean=main.mean(0),
        lower=np.quantile(main, q, axis=0),
        upper=np.quantile(main, 1 - q, axis=0),
        latent_shift=shift,
        singles=singles,
        interaction=interaction,
        level=level,
    )


def compare_with_data(prediction: EffectPrediction, observed: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per gene: the predicted effect beside what it can be checked against.

    Columns: ``gene``, ``predicted``, ``sum of predicted singles``; ``additive in data`` (the sum
    of the members' observed effects, :func:`~sams_core.evaluation.baselines.additive_baseline`)
    when the combination is at unit dosages and every member was measured alone; ``observed``
    when the combination itself was measured. ``observed`` is the table of
    :func:`~sams_core.evaluation.baselines.observed_effects` (rows = condition labels).
    """
    t = pd.DataFrame({"gene": prediction.genes, "predicted": prediction.mean, "sum of predicted singles": prediction.sum_of_singles})
    if observed is None:
        return t
    if prediction.unit_dosages and len(prediction.dosages) > 1:
        add = additive_baseline(observed, [prediction.label]).iloc[0].to_numpy()
        if np.isfinite(add).any():
            t["additive in data"] = add
    if prediction.label in observed.index:
        t["observed"] = observed.loc[prediction.label].to_numpy()
    return t


# ---------------------------------------------------------------------------------------------
# which combination to measure next
def rank_unmeasured_pairs(
    bundle: ModelBundle,
    measured: Sequence[str],
    n_globals: int = 50,
    n_per_global: int = 4,
    seed: int = 0,
    chunk: int = 64,
) -> pd.DataFrame:
    """Unmeasured pairs of measured singles ranked by predicted interaction and uncertainty.

    ``measured`` lists the condition labels with cells. For every pair of measured singles that
    is not itself measured: the interaction score (norm of combination minus the sum of its
    singles, relative to the combination's norm), the mean width of the 90 % interval of the
    combination's effect (uncertainty), and their ranks (1 = strongest / most uncertain).
    """
    meas = {canonical_label(split_label(m), bundle.perturbations) for m in map(str, measured)}
    singles = [p for p in bundle.perturbations if p in meas]
    pairs = [(a, b) for i, a in enumerate(singles) for b in singles[i + 1 :] if canonical_label((a, b), bundle.perturbations) not in meas]
    cols = ["pair", "interaction_score", "uncertainty", "effect_norm", "rank_interaction", "rank_uncertainty"]
    if not pairs:
        return pd.DataFrame(columns=cols)
    single_rows = dosage_rows(singles, bundle.perturbations)
    sdraw = model_ate_draws(bundle.model, single_rows, bundle.is_counts, n_globals, n_per_global, seed)  # [S, n_singles, G]
    pos = {s: i for i, s in enumerate(singles)}
    out = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        d = dosage_rows([[a, b] for a, b in part], bundle.perturbations)
        draws = model_ate_draws(bundle.model, d, bundle.is_counts, n_globals, n_per_global, seed)
        for r, (a, b) in enumerate(part):
            eff = draws[:, r]
            inter = (eff - sdraw[:, pos[a]] - sdraw[:, pos[b]]).mean(0)
            mean = eff.mean(0)
            norm = float(np.linalg.norm(mean))
            width = float((np.quantile(eff, 0.95, axis=0) - np.quantile(eff, 0.05, axis=0)).mean())
            out.append({"pair": canonical_label((a, b), bundle.perturbations), "interaction_score": float(np.linalg.norm(inter)) / norm if norm > 0 else 0.0, "uncertainty": width, "effect_norm": norm})
    t = pd.DataFrame(out)
    t["rank_interaction"] = t["interaction_score"].rank(ascending=False, method="min").astype(int)
    t["rank_uncertainty"] = t["uncertainty"].rank(ascending=False, method="min").astype(int)
    return t.sort_values(["rank_interaction", "rank_uncertainty"]).reset_index(drop=True)[cols]


# ---------------------------------------------------------------------------------------------
# perturbation similarity
def perturbation_distances(bundle: ModelBundle, by: str = "mask") -> pd.DataFrame:
    """Distances between the model's mask rows: Jaccard-like on mask probabilities (``mask``) or
    Euclidean between expected latent shifts (``shift``)."""
    names = bundle.mask_rows
    model = bundle.model
    with torch.no_grad():
        if by == "mask":
            p = model.mask_probs()
            if p is None:
                raise SamsError(f"{bundle.label} has no masks; compare perturbations by='shift' instead.")
            x = p.cpu().numpy()
            dist = squareform(pdist(x, lambda u, v: 1 - np.minimum(u, v).sum() / max(np.maximum(u, v).sum(), 1e-12)))
        elif by == "shift":
            if model.composes:
                x = model.latent_shift(torch.eye(len(bundle.perturbations), device=model.input_mean.device)).cpu().numpy()
            else:
                x = (model.mask_probs() * model.shift).cpu().numpy()
            dist = squareform(pdist(x))
        else:
            raise SamsError(f"Unknown distance {by!r}: use 'mask' or 'shift'.")
    return pd.DataFrame(dist, index=names, columns=names)
