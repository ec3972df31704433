"""Evaluation protocol of DESIGN §3: held-out IWELBO, treatment effects and their scores.

Scores are pure functions of arrays (observed vs predicted effects), so that they rate
predictions from any source (a model, a baseline); the model-facing functions produce those
arrays from a trained model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from sams_core.data.batches import DeviceData, condition_ids
from sams_core.data.screen import PerturbationData
from sams_core.data.splits import TEST, TRAIN
from sams_core.errors import SamsError
from sams_core.labels import dosage_rows
from sams_core.models.base import PerturbationModel

LIBRARY_SCALE = 1e4


TOP_DE = 20


# ---------------------------------------------------------------------------------------------
# the ATE scale
def ate_transform(x: np.ndarray | torch.Tensor, library: np.ndarray | torch.Tensor | float, is_counts: bool):
    """Expression on the treatment-effect scale: log2(1 + 1e4·x/library) for counts, else x."""
    if not is_counts:
        return x
    if isinstance(x, torch.Tensor):
        lib = library if isinstance(library, (float, int)) else library.unsqueeze(-1)
        return torch.log2(1 + LIBRARY_SCALE * x / lib)
    lib = library if np.isscalar(library) else np.asarray(library)[:, None]
    return np.log2(1 + LIBRARY_SCALE * np.asarray(x) / lib)


def expected_ate(model: PerturbationModel, out: torch.Tensor, is_counts: bool) -> torch.Tensor:
    """Expected expression of decoder outputs ``out`` at library size 1e4 on the ATE scale:
    ``ate_transform(model.likelihood.mean(out, 1e4), 1e4, is_counts)``. For counts (softmax means)
    it is computed in place as log2(1 + 1e4·softmax(out)), the same value in a third of the time."""
    if is_counts and model.likelihood.kind in ("nb", "poisson"):
        return torch.softmax(out.float(), dim=-1).mul_(LIBRARY_SCALE).log1p_().mul_(1.0 / math.log(2.0))
    return ate_transform(model.likelihood.mean(out, LIBRARY_SCALE), LIBRARY_SCALE, is_counts)


def condition_means(data: PerturbationData, cells: np.ndarray | None = None) -> pd.DataFrame:
    """Mean expression on the ATE scale of each condition (rows) over ``cells`` (all when None).

    Sparse counts are transformed on their stored entries only (log2(1 + 0) = 0) and summed per
    condition with one sparse product per block of cells, so the cost follows the non-zeros."""
    idx = np.arange(data.n_cells) if cells is None else np.asarray(cells)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    labels = data.labels[idx].astype(str)
    uniq, code = np.unique(labels, return_inverse=True)
    sums = np.zeros((len(uniq), data.n_genes), dtype=np.float64)
    chunk = 20000
    for s in range(0, idx.size, chunk):
        part = idx[s : s + chunk]
        lib = data.library[part].astype(np.float64)
        X = data.X[part]
        if sp.issparse(X):
            X = sp.csr_matrix(X, dtype=np.float64)
            if data.is_counts:
                X = sp.csr_matrix(sp.diags(LIBRARY_SCALE / lib) @ X)
                X.data = np.log2(1 + X.data)
        else:
            X = ate_transform(np.asarray(X, dtype=np.float64), lib, data.is_counts)
        onehot = sp.csr_matrix((np.ones(part.size), (code[s : s + chunk], np.arange(part.size))), shape=(len(uniq), part.size))
        sums += np.asarray((onehot @ X).todense() if sp.issparse(X) else onehot @ X)
    counts = np.bincount(code, minlength=len(uniq)).astype(np.float64)
    return pd.DataFrame(sums / counts[:, None], index=[str(u) for u in uniq], columns=data.genes)


def _pooled_ate(data: PerturbationData, cells: np.ndarray | None, ctrl_idx: np.ndarray) -> pd.DataFrame:
    """Mean of each condition's ``cells`` minus the mean of the controls ``ctrl_idx``."""
    means = condition_means(data, cells)
    if ctrl_idx.size == 0:
        raise SamsError("No control cells to compare against. The data needs control cells.")
    ctrl = condition_means(data, ctrl_idx).loc["control"]
    means = means.drop(index="control", errors="ignore")
    return means - ctrl


def _as_positions(cells: np.ndarray | None, n: int) -> np.ndarray:
    idx = np.arange(n) if cells is None else np.asarray(cells)
    return np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)


def data_ate_by_level(
    data: PerturbationData, cells: np.ndarray | None = None, control_cells: np.ndarray | None = None,
) -> dict[str, pd.DataFrame]:
    """Observed ATE per level of the primary covariate: level → table (rows: the conditions with
    cells at that level, columns: genes), each against the controls of the same level.

    A level without controls among ``control_cells`` (default: all controls) is compared with
    all of them instead, and its table's ``attrs["notes"]`` says so. Empty without covariates.
    """
    if not data.covariates:
        return {}
    idx = _as_positions(cells, data.n_cells)
    ctrl_all = np.flatnonzero(data.control_mask) if control_cells is None else _as_positions(control_cells, data.n_cells)
    lv = data.level_of_cells()
    out: dict[str, pd.DataFrame] = {}
    for level in data.levels:
        mine = idx[(lv[idx] == level) & (data.labels[idx] != "control")]
        if mine.size == 0:
            continue
        ctrl = ctrl_all[lv[ctrl_all] == level]
        note = None
        if ctrl.size == 0:
            ctrl = ctrl_all
            note = (
                f"{data.primary_covariate} = {level} has no control cells: its effects are taken against the "
                "controls of all levels."
            )
        t = _pooled_ate(data, mine, ctrl)
        t.attrs["notes"] = [note] if note else []
        out[level] = t
    return out


def data_ate(
    data: PerturbationData,
    cells: np.ndarray | None = None,
    control_cells: np.ndarray | None = None,
    level: str | None = None,
    match_covariates: bool = True,
) -> pd.DataFrame:
    """Observed average treatment effect per condition (rows) and gene: mean minus control mean.

    Controls come from ``control_cells`` (default: all control cells of the data). On a screen
    with covariates (``data.covariates``) each perturbed cell is compared with the controls of
    its own level of the primary covariate (:func:`data_ate_by_level`): ``level`` gives that
    level's table; otherwise a condition's effect is the mean of its per-level effects weighted
    by its cells at each level. A level without controls falls back to all controls, and
    ``attrs["notes"]`` of the table says so. ``match_covariates=False`` (or a screen without
    covariates) compares every cell with all the controls.
    """
    ctrl_idx = np.flatnonzero(data.control_mask) if control_cells is None else _as_positions(control_cells, data.n_cells)
    if not data.covariates or not match_covariates:
        if level is not None:
            raise SamsError(f"The data has no covariate levels to pick {level!r} from. Read it with covariate_keys=[...].")
        return _pooled_ate(data, cells, ctrl_idx)
    if level is not None and level not in data.levels:
        raise SamsError(
            f"{level!r} is not a level of {data.primary_covariate} (levels: {', '.join(data.levels)}). Pick one of them."
        )
    per = data_ate_by_level(data, cells, ctrl_idx)
    if ctrl_idx.size == 0:
        raise SamsError("No control cells to compare against. The data needs control cells.")
    notes = [n for t in per.values() for n in t.attrs.get("notes", [])]
    if level is not None:
        t = per.get(level, pd.DataFrame(columns=data.genes, dtype=np.float64))
        t.attrs["notes"] = notes if level in per else []
        return t
    idx = _as_positions(cells, data.n_cells)
    idx = idx[data.labels[idx] != "control"]
    lv = data.level_of_cells()
    labels = sorted({str(x) for x in data.labels[idx]})
    total = pd.DataFrame(0.0, index=labels, columns=data.genes)
    weight = pd.Series(0.0, index=labels)
    for level_name, t in per.items():
        sel = idx[lv[idx] == level_name]
        n = pd.Series(data.labels[sel].astype(str)).value_counts()
        n = n.reindex(t.index).fillna(0.0)
        total.loc[t.index] += t.mul(n, axis=0).to_numpy()
        weight.loc[t.index] += n.to_numpy()
    out = total.div(weight, axis=0)
    out.attrs["notes"] = notes
    return out


# ---------------------------------------------------------------------------------------------
# model-side effects
@contextlib.contextmanager
def seeded(device: torch.device, seed: int):
    """Run the block with its own seeded random stream, leaving the caller's untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def model_ate_draws(
    model: PerturbationModel,
    d_rows: np.ndarray,
    is_counts: bool,
    n_globals: int = 100,
    n_per_global: int = 20,
    seed: int = 0,
    sample_counts: bool = True,
    covariate_level: int | None = None,
) -> np.ndarray:
    """Predicted treatment effects per draw of the globals: array [n_globals, R, G].

    For each draw of the globals from the guide, ``n_per_global`` cells per dosage row get z_b
    from the prior and library size 1e4 (families without globals: groups of cells play the role
    of the draws); their expression (sampled counts, or expected values
    when ``sample_counts`` is False) goes through the ATE transform, is averaged, and the control
    row computed with the same globals is subtracted. The mean over draws is the model ATE;
    quantiles over draws give credible intervals.

    ``covariate_level`` (index of a level of the primary covariate) predicts treated and control
    cells at that level; None predicts them at the training shares of the levels (pooled). A model
    without covariates takes no level.
    """
    device = model.input_mean.device
    model.eval()
    with seeded(device, seed):
        d = torch.as_tensor(np.vstack([np.zeros((1, d_rows.shape[1]), dtype=np.float32), d_rows]), device=device)
        globals_ = model.sample_globals(n_globals)
        if model.n_covariates:
            c = model.covariate_row(covariate_level)
            out = model.predict(d, globals_, n_per_global, c)  # [n_globals * n_per_global, R+1, G]
        else:
            model.covariate_row(covariate_level)  # refuses a level for a model without covariates
            out = model.predict(d, globals_, n_per_global)
        if sample_counts and is_counts:
            x = model.likelihood.sample(out, LIBRARY_SCALE)
        else:
            x = model.likelihood.mean(out, LIBRARY_SCALE)
        v = ate_transform(x, LIBRARY_SCALE, is_counts)
        v = v.reshape(n_globals, n_per_global, *v.shape[1:]).mean(1)  # [n_globals, R+1, G]
        ate = v[:, 1:] - v[:, :1]
    return ate.cpu().numpy()


def model_ate(
    model: PerturbationModel,
    labels: Sequence[str],
    perturbations: Sequence[str],
    is_counts: bool,
    n_samples: int = 2000,
    seed: int = 0,
    chunk: int = 16,
    covariate_level: int | None = None,
) -> pd.DataFrame:
    """Predicted ATE (mean over posterior-predictive samples) for condition labels; rows = labels.

    ``n_samples`` cells per condition: 100 draws of the globals × n_samples/100 basal states.
    Conditions the model cannot predict (sVAE+ on unseen combinations) are rows of NaN.
    ``covariate_level``: index of the primary covariate's level to predict at (None: pooled),
    see :func:`model_ate_draws`.
    """
    model.covariate_row(covariate_level)  # a level the model cannot take is refused here, not turned into NaN
    n_globals = 100
    per = max(1, n_samples // n_globals)
    rows = []
    for s in range(0, len(labels), chunk):
        part = list(labels[s : s + chunk])
        d = dosage_rows(part, perturbations)
        try:
            draws = model_ate_draws(
                model, d, is_counts, n_globals=n_globals, n_per_global=per, seed=seed + s, covariate_level=covariate_level,
            )
            rows.append(draws.mean(0))
        except SamsError:
            one = []
            for r in range(len(part)):
                try:
                    one.append(model_ate_draws(
                        model, d[r : r + 1], is_counts, n_globals, per, seed + s + r, covariate_level=covariate_level,
                    ).mean(0)[0])
                except SamsError:
                    one.append(np.full(model.n_genes, np.nan))
            rows.append(np.stack(one))
    return pd.DataFrame(np.vstack(rows) if rows else np.zeros((0, model.n_genes)), index=list(labels))


# ---------------------------------------------------------------------------------------------
# IWELBO
@torch.no_grad()
def iwelbo(
    model: PerturbationModel,
    data: PerturbationData,
    cells: np.ndarray,
    n_samples: int = 100,
    seed: int = 0,
    max_elements: int = 2**25,
) -> np.ndarray:
    """Importance-weighted ELBO of each cell in ``cells`` (nats per cell, higher is better).

    The globals are drawn once from the guide (``n_samples`` draws) and shared by all cells;
    per cell the log-mean-exp over draws of log p(x | z) + log p(z_b) - log q(z_b | ·).
    """
    idx = np.asarray(cells)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    if idx.size == 0:
        return np.zeros(0)
    device = model.input_mean.device
    model.eval()
    with seeded(device, seed):
        globals_ = model.sample_globals(n_samples)
        dd = DeviceData(data, idx, device, condition_ids(model, data))
        bs = max(1, max_elements // (n_samples * max(data.n_genes, model.n_latent * 8)))
        out = []
        for b in dd.batches(bs):
            lw = model.log_weights(b, globals_)  # [S, B]
            out.append((torch.logsumexp(lw, 0) - math.log(lw.shape[0])).cpu())
    return torch.cat(out).numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# scores over (perturbation, gene) effects
def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _r2(obs: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(((obs - obs.mean()) ** 2).sum())
    return 1.0 - float(((obs - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


def top_de_mask(observed: np.ndarray, k: int = TOP_DE) -> np.ndarray:
    """Boolean mask of each row's ``k`` genes with the largest |observed effect|."""
    k = min(k, observed.shape[1])
    order = np.argsort(-np.abs(observed), axis=1)[:, :k]
    m = np.zeros_like(observed, dtype=bool)
    np.put_along_axis(m, order, True, axis=1)
    return m


def cosine_matrix(pred: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Cosine similarity of every predicted row with every observed row [P, P]."""
    pn = pred / np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)
    on = obs / np.maximum(np.linalg.norm(obs, axis=1, keepdims=True), 1e-12)
    return pn @ on.T


def cosine_rank(pred: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """PerturBench's cosine rank, per observed effect (rows of ``obs``; ``pred`` in the same order).

    For observed effect i: the fraction of the other perturbations' *predictions* that are closer
    (by cosine) to observed effect i than its own prediction is, ties counting half. 0 = its own
    prediction is the closest of all predictions; 0.5 = chance, which is also what a predictor that
    gives every perturbation the same effect scores. (Ranking observed effects around each
    prediction instead is the transposed score, a different number.)
    """
    n = pred.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    c = cosine_matrix(pred, obs)  # c[j, i]: prediction j against observed effect i
    own = np.diag(c)
    off = ~np.eye(n, dtype=bool)
    closer = ((c > own[None, :]) & off).sum(0) + 0.5 * ((c == own[None, :]) & off).sum(0)
    return closer / (n - 1)


def calibration(obs: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line of predicted on observed effects.

    pred ≈ intercept + slope · obs over the given (perturbation, gene) pairs. Slope 1 is
    calibrated, below 1 the predictions are shrunk (a prediction = 0.5 × observed has slope 0.5),
    above 1 exaggerated; the intercept is a shift common to all effects. Because the observed
    effects carry sampling noise, a perfect predictor scores slightly below 1 where conditions have
    few cells (slope ≈ var(true) / var(observed)); with hundreds of cells per condition the
    dilution is negligible. NaN when the observed effects do not vary.
    """
    obs = np.asarray(obs, dtype=np.float64).ravel()
    pred = np.asarray(pred, dtype=np.float64).ravel()
    o = obs - obs.mean() if obs.size else obs
    ss = float((o * o).sum())
    if obs.size < 2 or ss <= 0:
        return float("nan"), float("nan")
    slope = float((o * (pred - pred.mean())).sum() / ss)
    return slope, float(pred.mean() - slope * obs.mean())


#: Keys of :func:`effect_scores`.
SCORE_KEYS: tuple[str, ...] = (
    "n_conditions", "ate_r", "ate_r2", "ate_r_top20", "ate_r2_top20", "cosine", "cosine_rank",
    "calibration_slope", "calibration_intercept", "calibration_slope_top20", "calibration_intercept_top20",
)


def effect_scores(observed: pd.DataFrame, predicted: pd.DataFrame, k: int = TOP_DE) -> dict[str, float]:
    """Scores of predicted against observed effects (rows: conditions, columns: genes).

    Pearson r and R² over all (perturbation, gene) pairs and over each row's top-``k`` DE genes
    (``_top20``), the mean cosine of the effect vectors, the mean cosine rank
    (:func:`cosine_rank`) and the calibration (:func:`calibration`: slope and intercept of
    predicted on observed effects) over all pairs and over the top-``k`` pairs. Rows of NaN
    (conditions a predictor cannot predict) are left out; ``n_conditions`` counts the rest.
    """
    common = [i for i in observed.index if i in predicted.index]
    obs = observed.loc[common].to_numpy(dtype=np.float64)
    pred = predicted.loc[common].to_numpy(dtype=np.float64)
    ok = ~np.isnan(pred).any(1)
    obs, pred = obs[ok], pred[ok]
    if obs.shape[0] == 0:
        return {"n_conditions": 0, **{key: float("nan") for key in SCORE_KEYS[1:]}}
    top = top_de_mask(obs, k)
    cos = np.diag(cosine_matrix(pred, obs))
    slope, intercept = calibration(obs, pred)
    slope_top, intercept_top = calibration(obs[top], pred[top])
    return {
        "n_conditions": int(obs.shape[0]),
        "ate_r": _pearson(obs.ravel(), pred.ravel()),
        "ate_r2": _r2(obs.ravel(), pred.ravel()),
        "ate_r_top20": _pearson(obs[top], pred[top]),
        "ate_r2_top20": _r2(obs[top], pred[top]),
        "cosine": float(np.mean(cos)),
        "cosine_rank": float(np.mean(cosine_rank(pred, obs))) if obs.shape[0] > 1 else float("nan"),
        "calibration_slope": slope,
        "calibration_intercept": intercept,
        "calibration_slope_top20": slope_top,
        "calibration_intercept_top20": intercept_top,
    }


# ---------------------------------------------------------------------------------------------
# the whole protocol for one model
@dataclass
class Evaluation:
    """Metrics per split (rows: train, test, ...) and the effect tables behind them.

    On a screen with covariates, ``metrics`` is pooled over the levels of the primary covariate
    and ``per_level`` has one row per (split, level) with the same columns; ``observed_by_level``
    and ``predicted_by_level`` hold the tables behind them, keyed ``(split, level)``; ``notes``
    says where a level had no controls of its own.
    """

    metrics: pd.DataFrame
    observed: dict[str, pd.DataFrame] = field(default_factory=dict)
    predicted: dict[str, pd.DataFrame] = field(default_factory=dict)
    per_level: pd.DataFrame = field(default_factory=pd.DataFrame)
    observed_by_level: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    predicted_by_level: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def split_conditions(data: PerturbationData, split: np.ndarray, which: str) -> list[str]:
    """Non-control conditions that have cells in split ``which``."""
    labs = data.labels[split == which].astype(str)
    return sorted({lab for lab in labs if lab != "control"})


def sample_conditions(conditions: Sequence[str], max_conditions: int | None, seed: int = 0) -> list[str]:
    """``conditions``, or a seeded sample of ``max_conditions`` of them (sorted); None keeps all."""
    conds = sorted(conditions)
    if max_conditions is not None and len(conds) > max_conditions:
        pick = np.random.default_rng(seed).choice(len(conds), max_conditions, replace=False)
        conds = sorted(conds[i] for i in pick)
    return conds


def _scored_conditions(data: PerturbationData, split: np.ndarray, which: str, max_conditions: int | None, seed: int,
                       ev: Evaluation) -> list[str]:
    """The conditions of split ``which`` whose effects an evaluation scores (a seeded sample of at
    most ``max_conditions``), with a note in ``ev`` when they are a sample."""
    every = split_conditions(data, split, which)
    conds = sample_conditions(every, max_conditions, seed)
    if len(conds) < len(every):
        ev.notes.append(f"The effect scores of the {which} split are over a seeded sample of {len(conds)} of its "
                        f"{len(every)} conditions (the quick evaluation); the full evaluation (train --full-eval) "
                        "scores all of them.")
    return conds


#: The evaluation ``train`` runs by default, under a minute at Norman scale on a CPU: the IWELBO
#: of a seeded sample of at most 1,000 cells per split with 20 importance samples, and the effect
#: scores of a seeded sample of at most 50 conditions per split with 200 posterior-predictive
#: cells each (:func:`evaluate_model`'s defaults).
QUICK_EVALUATION: dict[str, int | None] = {"n_iwelbo_samples": 20, "n_ate_samples": 200, "max_iwelbo_cells": 1000,
                                           "max_ate_conditions": 50}
#: The protocol of DESIGN §3 in full: every cell's IWELBO with 100 importance samples, every
#: condition with 2,000 posterior-predictive cells (``train --full-eval``; minutes on large screens).
FULL_EVALUATION: dict[str, int | None] = {"n_iwelbo_samples": 100, "n_ate_samples": 2000, "max_iwelbo_cells": None,
                                          "max_ate_conditions": None}


def evaluate_model(
    model: PerturbationModel,
    data: PerturbationData,
    split: np.ndarray,
    n_iwelbo_samples: int = 20,
    n_ate_samples: int = 200,
    max_iwelbo_cells: int | None = 1000,
    seed: int = 0,
    splits: Sequence[str] = (TRAIN, TEST),
    max_ate_conditions: int | None = 50,
) -> Evaluation:
    """Held-out IWELBO and effect scores of ``model`` per split (DESIGN §3).

    One row per split with the cells' mean IWELBO and :func:`effect_scores` of the split's
    conditions: ATE r / R² (all genes and top-20), cosine and cosine rank, and the calibration
    (slope and intercept of predicted on observed ATE, all genes and top-20).

    Observed effects of a split use its own cells of each condition against all control cells.
    ``max_iwelbo_cells`` subsamples (seeded) cells for the IWELBO of large splits (None: all),
    ``max_ate_conditions`` the conditions whose effects are scored (None: all; a note says so).
    The defaults are :data:`QUICK_EVALUATION` (fewer IWELBO cells and importance samples than
    the full protocol, so that ``train`` evaluates a Norman-scale model in about a minute on a
    CPU; a 20-sample IWELBO is a slightly lower bound than a 100-sample one);
    ``evaluate_model(..., **FULL_EVALUATION)`` is the full protocol.

    On a screen with covariates the effects are taken per level of the primary covariate
    (:func:`data_ate_by_level`: cells against the controls of their level; the model predicts at
    that level, or pooled when it has no covariates): :attr:`Evaluation.per_level` has a row per
    (split, level) with the level's cells' IWELBO and scores, and the pooled row of each split
    scores every condition's cell-weighted mean of its per-level effects, observed and predicted.
    """
    if split.shape[0] != data.n_cells:
        raise SamsError(f"The split has {split.shape[0]} entries for {data.n_cells} cells. Use the split made for this data.")
    rng = np.random.default_rng(seed)
    ctrl = np.flatnonzero(data.control_mask)
    rows = []
    ev = Evaluation(metrics=pd.DataFrame())
    if data.covariates:
        return _evaluate_by_level(model, data, split, n_iwelbo_samples, n_ate_samples, max_iwelbo_cells, seed, splits, ev,
                                  max_ate_conditions)
    for which in splits:
        cells = np.flatnonzero(split == which)
        if cells.size == 0:
            continue
        conds = _scored_conditions(data, split, which, max_ate_conditions, seed, ev)
        scored = cells[np.isin(data.labels[cells].astype(str), conds)]
        obs = data_ate(data, scored, ctrl) if conds else pd.DataFrame()
        pred = model_ate(model, conds, data.perturbations, data.is_counts, n_ate_samples, seed) if conds else pd.DataFrame()
        if len(conds):
            pred.columns = data.genes
        sub = cells if max_iwelbo_cells is None or cells.size <= max_iwelbo_cells else np.sort(rng.choice(cells, max_iwelbo_cells, replace=False))
        iw = iwelbo(model, data, sub, n_iwelbo_samples, seed)
        scores = effect_scores(obs, pred) if conds else {}
        rows.append({"split": which, "n_cells": int(cells.size), "iwelbo": float(iw.mean()), **scores})
        ev.observed[which] = obs
        ev.predicted[which] = pred
    ev.metrics = pd.DataFrame(rows).set_index("split") if rows else pd.DataFrame()
    return ev


def _evaluate_by_level(
    model: PerturbationModel,
    data: PerturbationData,
    split: np.ndarray,
    n_iwelbo_samples: int,
    n_ate_samples: int,
    max_iwelbo_cells: int | None,
    seed: int,
    splits: Sequence[str],
    ev: Evaluation,
    max_ate_conditions: int | None,
) -> Evaluation:
    """:func:`evaluate_model` on a screen with covariates: per level of the primary covariate and pooled."""
    rng = np.random.default_rng(seed)
    ctrl = np.flatnonzero(data.control_mask)
    lv = data.level_of_cells()
    conditions_level = model.n_covariates > 0
    rows, level_rows = [], []
    for which in splits:
        cells = np.flatnonzero(split == which)
        if cells.size == 0:
            continue
        conds = _scored_conditions(data, split, which, max_ate_conditions, seed, ev)
        treated = cells[np.isin(data.labels[cells].astype(str), conds)]
        per_obs = data_ate_by_level(data, treated, ctrl)
        pooled_pred: pd.DataFrame | None = None
        for level, obs in per_obs.items():
            ev.notes.extend(n for n in obs.attrs.get("notes", []) if n not in ev.notes)
            conds = list(obs.index)
            k = data.levels.index(level) if conditions_level else None
            pred = model_ate(model, conds, data.perturbations, data.is_counts, n_ate_samples, seed, covariate_level=k)
            pred.columns = data.genes
            ev.observed_by_level[(which, level)] = obs
            ev.predicted_by_level[(which, level)] = pred
            mine = cells[lv[cells] == level]
            sub = mine if max_iwelbo_cells is None or mine.size <= max_iwelbo_cells else np.sort(rng.choice(mine, max_iwelbo_cells, replace=False))
            iw = iwelbo(model, data, sub, n_iwelbo_samples, seed)
            level_rows.append({
                "split": which, "level": level, "n_cells": int(mine.size), "iwelbo": float(iw.mean()) if iw.size else float("nan"),
                **effect_scores(obs, pred),
            })
        # pooled: each condition's per-level effects weighted by its cells at each level
        obs_pooled = data_ate(data, treated, ctrl)
        if len(obs_pooled.index):
            total = pd.DataFrame(0.0, index=obs_pooled.index, columns=data.genes)
            weight = pd.Series(0.0, index=obs_pooled.index)
            for level, pred in ev.predicted_by_level.items():
                if level[0] != which:
                    continue
                sel = treated[lv[treated] == level[1]]
                n = pd.Series(data.labels[sel].astype(str)).value_counts().reindex(pred.index).fillna(0.0)
                total.loc[pred.index] += pred.mul(n, axis=0).to_numpy()
                weight.loc[pred.index] += n.to_numpy()
            pooled_pred = total.div(weight, axis=0)
        sub = cells if max_iwelbo_cells is None or cells.size <= max_iwelbo_cells else np.sort(rng.choice(cells, max_iwelbo_cells, replace=False))
        iw = iwelbo(model, data, sub, n_iwelbo_samples, seed)
        scores = effect_scores(obs_pooled, pooled_pred) if pooled_pred is not None else {}
        rows.append({"split": which, "n_cells": int(cells.size), "iwelbo": float(iw.mean()), **scores})
        ev.observed[which] = obs_pooled if len(obs_pooled.index) else pd.DataFrame()
        ev.predicted[which] = pooled_pred if pooled_pred is not None else pd.DataFrame()
    ev.metrics = pd.DataFrame(rows).set_index("split") if rows else pd.DataFrame()
    ev.per_level = pd.DataFrame(level_rows).set_index(["split", "level"]) if level_rows else pd.DataFrame()
    return ev
