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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.spatial.distance import pdist, squareform

from sams_core.errors import SamsError
from sams_core.evaluation.baselines import additive_baseline
from sams_core.evaluation.metrics import expected_ate, model_ate_draws, seeded
from sams_core.io.bundle import ModelBundle
from sams_core.labels import (
    Combination,
    as_dosages,
    canonical_label,
    combination_label,
    dosage_rows,
    perturbation_order,
    split_label,
)

__all__ = [
    "MAX_PAIRS",
    "REFINE_TOP",
    "EffectPrediction",
    "candidate_pairs",
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
#: Candidate pairs scored by the first (decoding) pass unless the caller asks for more; above
#: it, pairs are first chosen by how much their members' latent shifts overlap (no decoding).
MAX_PAIRS = 5000
#: Pairs re-scored with full posterior draws (interval, uncertainty) unless asked for more.
REFINE_TOP = 50

#: ``progress(message, fraction)`` told about a long computation.
Progress = Callable[[str, float], None]

RANK_COLUMNS = ["pair", "interaction_score", "uncertainty", "effect_norm", "refined", "rank_interaction", "rank_uncertainty"]


def _pair_scores(mean_pair: torch.Tensor, mean_a: torch.Tensor, mean_b: torch.Tensor, mean_ctrl: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(interaction score, effect norm) of pairs from ATE-scale means [r, G] of each pair, its
    members and the control (:func:`rank_unmeasured_pairs`)."""
    norm = torch.linalg.vector_norm(mean_pair - mean_ctrl, dim=-1)
    inter = torch.linalg.vector_norm(mean_pair - mean_a - mean_b + mean_ctrl, dim=-1)
    score = torch.where(norm > 0, inter / norm.clamp_min(1e-12), torch.zeros_like(norm))
    return score.cpu().numpy().astype(np.float64), norm.cpu().numpy().astype(np.float64)


@torch.no_grad()
def _first_pass(model, pairs: np.ndarray, n_perts: int, n_basal: int, seed: int, is_counts: bool, chunk: int,
                progress: Progress | None, lo: float, hi: float) -> dict[str, np.ndarray]:
    """Interaction score and effect norm of ``pairs`` ([P, 2] perturbation positions) at the
    expected latent shifts, every condition decoded at the same ``n_basal`` basal latents z_b ~ N(0, I):
    the control and each member once, the pairs ``chunk`` at a time (a few matrix products)."""
    dev = model.input_mean.device
    with seeded(dev, seed):
        z_b = torch.randn(n_basal, 1, model.n_latent, device=dev)
    eye = torch.eye(n_perts, device=dev)

    def ate_mean(d: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:  # [R, T], [R, K] → [R, G]
        c = model.prediction_covariates(None, d.shape[0])
        out = model.decode(z_b + shift, d.expand(n_basal, *d.shape), c)
        return expected_ate(model, out, is_counts).mean(0)

    members = np.unique(pairs)
    ctrl_d = torch.zeros(1, n_perts, device=dev)
    shift0 = model.latent_shift(ctrl_d)
    single_shift = model.latent_shift(eye[members])  # [M, K]
    where = np.full(n_perts, -1)
    where[members] = np.arange(members.size)
    mean_ctrl = ate_mean(ctrl_d, shift0)
    mean_single = torch.cat([ate_mean(eye[members[s : s + chunk]], single_shift[s : s + chunk]) for s in range(0, members.size, chunk)])
    # composing families' shifts add over members (checked on the first block; else asked per block)
    additive = None
    n = len(pairs)
    res = {"interaction_score": np.zeros(n), "effect_norm": np.zeros(n), "uncertainty": np.full(n, np.nan)}
    for start in range(0, n, chunk):
        part = pairs[start : start + chunk]
        ia, ib = where[part[:, 0]], where[part[:, 1]]
        d = eye[part[:, 0]] + eye[part[:, 1]]
        shift = single_shift[ia] + single_shift[ib] - shift0
        if additive is None:
            additive = bool(torch.allclose(shift, model.latent_shift(d), atol=1e-5, rtol=1e-4))
        if not additive:
            shift = model.latent_shift(d)
        score, norm = _pair_scores(ate_mean(d, shift), mean_single[ia], mean_single[ib], mean_ctrl)
        res["interaction_score"][start : start + len(part)] = score
        res["effect_norm"][start : start + len(part)] = norm
        if progress:
            progress(f"scored {min(start + chunk, n):,} of {n:,} pairs", lo + (hi - lo) * min(start + chunk, n) / n)
    return res


@torch.no_grad()
def _refine_pass(model, pairs: np.ndarray, n_perts: int, globals_: dict, n_per_global: int, seed: int, is_counts: bool,
                 progress: Progress | None, lo: float, hi: float) -> dict[str, np.ndarray]:
    """Interaction score, effect norm and interval width of ``pairs`` with posterior draws of the
    globals: every condition (control, each member once, each pair) is predicted alone under the
    same seed, so all of them see the same global and basal draws (paired Monte Carlo)."""
    dev = model.input_mean.device
    eye = np.eye(n_perts, dtype=np.float32)

    def draws(d_row: np.ndarray) -> torch.Tensor:  # one condition → [n_globals, G], each draw averaged over its cells
        with seeded(dev, seed):
            out = model.predict(torch.as_tensor(d_row[None], device=dev), globals_, n_per_global)[:, 0]
        v = expected_ate(model, out, is_counts)
        return v.reshape(-1, n_per_global, v.shape[-1]).mean(1)

    ctrl = draws(np.zeros(n_perts, np.float32))
    mean_ctrl = ctrl.mean(0)
    members = np.unique(pairs)
    total = members.size + len(pairs)
    single = {}
    for i, m in enumerate(members):
        single[int(m)] = draws(eye[m]).mean(0)
        if progress:
            progress(f"refining: member {i + 1} of {members.size}", lo + (hi - lo) * (i + 1) / total)
    n = len(pairs)
    res = {"interaction_score": np.zeros(n), "effect_norm": np.zeros(n), "uncertainty": np.zeros(n)}
    qs = torch.tensor([0.05, 0.95], device=dev)
    for i, (a, b) in enumerate(pairs):
        v = draws(eye[a] + eye[b])
        score, norm = _pair_scores(v.mean(0, keepdim=True), single[int(a)][None], single[int(b)][None], mean_ctrl)
        res["interaction_score"][i], res["effect_norm"][i] = score[0], norm[0]
        if v.shape[0] > 1:
            q = torch.quantile(v - ctrl, qs, dim=0)
            res["uncertainty"][i] = float((q[1] - q[0]).mean())
        else:
            res["uncertainty"][i] = np.nan
        if progress:
            progress(f"refining: pair {i + 1} of {n}", lo + (hi - lo) * (members.size + i + 1) / total)
    return res


def candidate_pairs(bundle: ModelBundle, measured: Sequence[str]) -> tuple[list[str], int]:
    """The measured singles (in the model's order) and how many unmeasured pairs they make."""
    order = perturbation_order(bundle.perturbations)
    meas = {canonical_label(split_label(m), order) for m in map(str, measured)}
    singles = [p for p in bundle.perturbations if p in meas]
    have = set(singles)
    n_measured_pairs = sum(1 for m in meas if m.count("+") == 1 and all(x in have for x in m.split("+")))
    return singles, len(singles) * (len(singles) - 1) // 2 - n_measured_pairs


def rank_unmeasured_pairs(
    bundle: ModelBundle,
    measured: Sequence[str],
    n_globals: int = 50,
    n_per_global: int = 4,
    seed: int = 0,
    chunk: int = 512,
    max_pairs: int | None = MAX_PAIRS,
    refine: int | None = REFINE_TOP,
    first_pass_draws: int = 4,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Unmeasured pairs of measured singles ranked by predicted interaction, then uncertainty.

    ``measured`` lists the condition labels with cells. Every pair of measured singles that is
    not itself measured is a candidate, scored in up to three passes, each with *paired* draws
    (a pair, its two members and the control see the same global and basal draws, so that
    neither a pair's interaction nor the order of two pairs is Monte-Carlo noise):

    1. above ``max_pairs`` candidates (None: no cap), the ``max_pairs`` pairs whose members'
       expected latent shifts overlap most (Σ_k |s_a,k|·|s_b,k|, no decoding) go on;
    2. a first pass scores each at the expected latent shifts (``model.latent_shift``), decoded
       at ``first_pass_draws`` basal latents z_b ~ N(0, I) shared by every pair, member and the
       control (the control and each member are decoded once, the pairs ``chunk`` at a time):
       interaction score ‖pair − a − b + control‖ / ‖pair − control‖ (ATE scale, expected
       expression) and effect norm ‖pair − control‖;
    3. the ``refine`` pairs with the largest first-pass interaction (None: all) are scored again
       with ``n_globals`` × ``n_per_global`` posterior draws, as :func:`predict_effect` scores one
       combination: interaction, effect norm, and the mean width of the 90 % interval of the
       pair's effect (``uncertainty``).

    Columns: ``pair``, ``interaction_score``, ``uncertainty`` (NaN when not refined),
    ``effect_norm``, ``refined``, ``rank_interaction`` (refined pairs first, by their refined
    score; then the others by their first-pass score) and ``rank_uncertainty`` (among the
    refined pairs). ``progress(message, fraction)`` is told how far it is.
    """
    singles, _ = candidate_pairs(bundle, measured)
    order = perturbation_order(bundle.perturbations)
    meas = {canonical_label(split_label(m), order) for m in map(str, measured)}
    idx = np.array([order[p] for p in singles], dtype=np.int64)
    if idx.size < 2:
        return pd.DataFrame(columns=RANK_COLUMNS)
    ii, jj = np.triu_indices(idx.size, k=1)
    pairs = np.stack([idx[ii], idx[jj]], axis=1)
    if any("+" in m for m in meas):
        names = np.array(bundle.perturbations, dtype=object)
        is_measured = np.fromiter((canonical_label((a, b), order) in meas for a, b in zip(names[pairs[:, 0]], names[pairs[:, 1]])), bool, len(pairs))
        pairs = pairs[~is_measured]
    if len(pairs) == 0:
        return pd.DataFrame(columns=RANK_COLUMNS)
    model = bundle.model
    if not model.composes:
        raise SamsError(f"{bundle.label} predicts only the conditions it was trained on, so it cannot rank unmeasured pairs. "
                        "Rank them with a SAMS-VAE (or another family that composes combinations).")
    dev = model.input_mean.device
    model.eval()
    if max_pairs is not None and len(pairs) > max_pairs:
        if progress:
            progress(f"choosing {max_pairs:,} of {len(pairs):,} pairs by overlapping latent shifts", 0.02)
        with torch.no_grad():
            shifts = model.latent_shift(torch.eye(len(bundle.perturbations), device=dev)).abs().cpu().numpy()
        overlap = np.einsum("pk,pk->p", shifts[pairs[:, 0]], shifts[pairs[:, 1]])
        pairs = pairs[np.sort(np.argpartition(-overlap, max_pairs - 1)[:max_pairs])]
    with torch.no_grad(), seeded(dev, seed):
        draw_g = model.sample_globals(n_globals)
    n_ref = len(pairs) if refine is None else min(refine, len(pairs))
    split_at = 0.6 if n_ref else 1.0
    first = _first_pass(model, pairs, len(bundle.perturbations), first_pass_draws, seed, bundle.is_counts, chunk,
                        progress, 0.05, split_at)
    t = pd.DataFrame(first)
    t.insert(0, "pair", [canonical_label((bundle.perturbations[a], bundle.perturbations[b]), order) for a, b in pairs])
    t["refined"] = False
    if n_ref:
        top = np.argsort(-t["interaction_score"].to_numpy(), kind="stable")[:n_ref]
        again = _refine_pass(model, pairs[top], len(bundle.perturbations), draw_g, n_per_global, seed + 1, bundle.is_counts,
                             progress, split_at, 1.0)
        for k, v in again.items():
            t.loc[t.index[top], k] = v
        t.loc[t.index[top], "refined"] = True
    t = t.sort_values(["refined", "interaction_score"], ascending=[False, False], kind="stable").reset_index(drop=True)
    t["rank_interaction"] = np.arange(1, len(t) + 1)
    ref = t["refined"].to_numpy()
    ru = pd.Series(pd.NA, index=t.index, dtype="Int64")
    ru[ref] = t.loc[ref, "uncertainty"].rank(ascending=False, method="min").astype(int)
    t["rank_uncertainty"] = ru
    if progress:
        progress(f"ranked {len(t):,} pairs ({int(ref.sum())} refined)", 1.0)
    return t[RANK_COLUMNS]


# ---------------------------------------------------------------------------------------------
# perturbation similarity
def _mask_distances(p: np.ndarray, block: int = 256) -> np.ndarray:
    """1 − Σ min(p_a, p_b) / Σ max(p_a, p_b) between all rows of ``p``, in blocks of rows (2,000
    perturbations in about a second, where a per-pair function took minutes)."""
    n = p.shape[0]
    out = np.zeros((n, n))
    for s in range(0, n, block):
        a = p[s : s + block, None, :]
        out[s : s + block] = 1.0 - np.minimum(a, p[None]).sum(-1) / np.maximum(np.maximum(a, p[None]).sum(-1), 1e-12)
    np.fill_diagonal(out, 0.0)
    return out


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
            dist = _mask_distances(p.cpu().numpy().astype(np.float64))
        elif by == "shift":
            if model.composes:
                x = model.latent_shift(torch.eye(len(bundle.perturbations), device=model.input_mean.device)).cpu().numpy()
            else:
                x = (model.mask_probs() * model.shift).cpu().numpy()
            dist = squareform(pdist(x))
        else:
            raise SamsError(f"Unknown distance {by!r}: use 'mask' or 'shift'.")
    return pd.DataFrame(dist, index=names, columns=names)
