"""Predicted effects of any combination, their interaction, and data-only baselines.

Effects are log2 fold changes against control on the ATE scale of DESIGN §3, from posterior
samples of the globals (mean and credible interval). Baselines need no model: no change, the
additive-in-data sum of observed single effects, and the observed effect where measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from sams_core.bundle import ModelBundle
from sams_core.data import PerturbationData, dosage_rows, split_label
from sams_core.errors import SamsError
from sams_core.evaluate import cosine_matrix, model_ate_draws

Combination = str | Mapping[str, float] | Sequence[str]


def _as_dict(combo: Combination) -> dict[str, float]:
    if isinstance(combo, str):
        return {m: 1.0 for m in split_label(combo)}
    if isinstance(combo, Mapping):
        return {str(k): float(v) for k, v in combo.items() if float(v) != 0.0}
    return {str(m): 1.0 for m in combo}


def combination_label(combo: Combination) -> str:
    """A readable label: "A+B", with dosages other than 1 as "A:0.5"."""
    d = _as_dict(combo)
    if not d:
        return "control"
    return "+".join(k if v == 1.0 else f"{k}:{v:g}" for k, v in d.items())


@dataclass
class EffectPrediction:
    """Predicted per-gene effect of one combination, its singles and their interaction."""

    label: str
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
) -> EffectPrediction:
    """Predicted effect of ``combo`` (a label "A+B", a member list, or {name: dosage}).

    The combination and each of its members are predicted with the same draws of the globals,
    so the interaction (combination minus the sum of its singles) carries no Monte-Carlo
    difference between them. ``sample_counts`` draws counts from the likelihood before the
    ATE transform (slower; the default transforms the expected expression).
    """
    if not 0 < level < 1:
        raise SamsError(f"Credible level must be between 0 and 1, got {level}.")
    members = _as_dict(combo)
    if not members:
        raise SamsError("Pick at least one perturbation: the control has no effect to predict.")
    rows = [members] + ([{m: v} for m, v in members.items()] if len(members) > 1 else [])
    d = dosage_rows(rows, bundle.perturbations)
    draws = model_ate_draws(bundle.model, d, bundle.is_counts, n_globals, n_per_global, seed, sample_counts)
    q = (1 - level) / 2
    main = draws[:, 0]
    singles = {m: draws[:, i + 1].mean(0) for i, m in enumerate(members)} if len(members) > 1 else {next(iter(members)): main.mean(0)}
    interaction = None
    if len(members) > 1:
        interaction = (main - draws[:, 1:].sum(1)).mean(0)
    with torch.no_grad():
        dev = bundle.model.input_mean.device
        shift = bundle.model.latent_shift(torch.as_tensor(d[:1], device=dev))[0].cpu().numpy()
    return EffectPrediction(
        label=combination_label(members),
        genes=bundle.genes,
        mean=main.mean(0),
        lower=np.quantile(main, q, axis=0),
        upper=np.quantile(main, 1 - q, axis=0),
        latent_shift=shift,
        singles=singles,
        interaction=interaction,
        level=level,
    )


# ---------------------------------------------------------------------------------------------
# baselines from data alone
def observed_effects(data: PerturbationData, cells: np.ndarray | None = None) -> pd.DataFrame:
    """Observed effect (data ATE) of every measured condition; rows = condition labels."""
    from sams_core.evaluate import data_ate

    return data_ate(data, cells)


def additive_baseline(observed: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Additive-in-data prediction of combinations: the sum of the members' observed effects.

    (Observed A + observed B − control, on the log fold-change scale.) A combination with a
    member that was never measured alone gets a row of NaN.
    """
    out = []
    for lab in labels:
        members = split_label(lab)
        if all(m in observed.index for m in members) and members:
            out.append(observed.loc[members].sum(0).to_numpy())
        else:
            out.append(np.full(observed.shape[1], np.nan))
    return pd.DataFrame(np.vstack(out) if out else np.zeros((0, observed.shape[1])), index=list(labels), columns=observed.columns)


def mean_baseline(observed: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """No-change prediction: every condition looks like control (effect 0 for every gene)."""
    return pd.DataFrame(0.0, index=list(labels), columns=observed.columns)


def diversity_check(predicted: pd.DataFrame, threshold: float = 0.95) -> dict[str, float | bool]:
    """Flags a predictor whose effects are nearly the same for every perturbation (mode collapse).

    Returns the mean pairwise cosine similarity of the predicted effect vectors and
    ``collapsed`` = that similarity ≥ ``threshold``.
    """
    p = predicted.dropna().to_numpy(dtype=np.float64)
    if p.shape[0] < 2:
        return {"mean_pairwise_cosine": float("nan"), "collapsed": False}
    c = cosine_matrix(p, p)
    off = c[~np.eye(c.shape[0], dtype=bool)]
    m = float(off.mean())
    return {"mean_pairwise_cosine": m, "collapsed": bool(m >= threshold)}
