"""Models and data baselines scored side by side on the same held-out conditions.

Besides the effect scores of :mod:`sams_core.evaluation.metrics`, a distributional score: the
energy distance between held-out cells and cells drawn from a predictor, in a PCA of the data.
Predictors of cells are plain callables (:data:`CellSampler`), so a model, a baseline or a
simulator's true model (the oracle, ``sams_core.simulate.sample_condition``) are scored alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.spatial.distance import cdist

from sams_core.data.screen import PerturbationData
from sams_core.data.splits import TEST
from sams_core.errors import SamsError
from sams_core.evaluation.baselines import additive_baseline, diversity_check
from sams_core.evaluation.metrics import (
    ate_transform,
    data_ate,
    data_ate_by_level,
    effect_scores,
    iwelbo,
    model_ate,
    sample_conditions,
    seeded,
    split_conditions,
)
from sams_core.evaluation.truth import mask_scores
from sams_core.io.bundle import ModelBundle
from sams_core.models.base import PerturbationModel
from sams_core.simulate import SimulationTruth

#: A predictor of cells: (condition label, library sizes (n,), seed) → n cells of raw expression
#: (counts, or values for Gaussian data), one per library size; None when it cannot predict the
#: condition.
CellSampler = Callable[[str, np.ndarray, int], "np.ndarray | None"]


# ---------------------------------------------------------------------------------------------
# distributional distance
def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Energy distance between two samples of points (rows): 2E|A-B| - E|A-A'| - E|B-B'|.

    The plug-in (V-statistic) estimate, with each sample's distances to itself included: two
    samples of one distribution score about E|A-A'|·(1/n_a + 1/n_b) > 0, so compare a score with
    the sampling floor of the same sizes (:meth:`HeldoutCells.floor`), not with 0.
    """
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(2 * cdist(a, b).mean() - cdist(a, a).mean() - cdist(b, b).mean())


def transformed_cells(data: PerturbationData, cells: np.ndarray) -> np.ndarray:
    """Expression of ``cells`` on the ATE scale (dense)."""
    return np.asarray(ate_transform(data.dense(cells).astype(np.float64), data.library[cells].astype(np.float64), data.is_counts))


def transform_like_data(raw: np.ndarray, is_counts: bool) -> np.ndarray:
    """Raw expression (cells × genes) on the ATE scale exactly as the data is transformed: counts
    are normalised by each cell's own total (its library size, as ``from_anndata`` computes it)."""
    raw = np.asarray(raw, dtype=np.float64)
    if not is_counts:
        return raw
    return np.asarray(ate_transform(raw, np.maximum(raw.sum(1), 1.0), True))


@dataclass
class HeldoutCells:
    """Held-out cells of each condition in a PCA of the data: the reference of the energy distance.

    Attributes:
        conditions: the held-out conditions.
        observed: condition → its held-out cells (at most ``n_cells``) in PCA coordinates.
        control_library: library sizes of the observed control cells (predicted cells are drawn
            at sizes sampled from these).
        is_counts: whether the data are counts (else Gaussian values, no library).
        pca: the fitted ``sklearn.decomposition.PCA`` (on the ATE scale).
    """

    conditions: list[str]
    observed: dict[str, np.ndarray]
    control_library: np.ndarray
    is_counts: bool
    pca: Any

    @classmethod
    def build(cls, data: PerturbationData, split: np.ndarray, n_cells: int = 300, n_pcs: int = 20, seed: int = 0,
              conditions: list[str] | None = None, n_fit_cells: int = 5000) -> HeldoutCells:
        """Held-out cells of every test condition of ``split`` (or of ``conditions``, some of them;
        a seeded subsample of ``n_cells`` each) projected on a PCA fitted on up to ``n_fit_cells``
        cells of the data."""
        from sklearn.decomposition import (
            PCA,  # heavy third-party import, only when comparing
        )

        rng = np.random.default_rng(seed)
        test = np.flatnonzero(split == TEST)
        conds = split_conditions(data, split, TEST) if conditions is None else list(conditions)
        if not conds:
            raise SamsError("The split has no held-out conditions to compare on. Use a held-out split.")
        fit_cells = np.sort(rng.choice(data.n_cells, min(data.n_cells, n_fit_cells), replace=False))
        pca = PCA(n_components=min(n_pcs, data.n_genes, len(fit_cells)), random_state=seed).fit(transformed_cells(data, fit_cells))
        observed = {}
        for c in conds:
            idx = test[data.labels[test] == c]
            idx = idx if idx.size <= n_cells else np.sort(rng.choice(idx, n_cells, replace=False))
            observed[c] = pca.transform(transformed_cells(data, idx))
        return cls(conds, observed, data.library[data.control_mask].astype(np.float64), data.is_counts, pca)

    def project(self, raw: np.ndarray) -> np.ndarray:
        """Raw expression → ATE scale (:func:`transform_like_data`) → PCA coordinates."""
        return self.pca.transform(transform_like_data(raw, self.is_counts))

    def libraries(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` library sizes drawn (with replacement) from the observed controls (ones for Gaussian data)."""
        if not self.is_counts or self.control_library.size == 0:
            return np.ones(n)
        return rng.choice(self.control_library, n, replace=True)

    def energy(self, cells_of: Callable[[str], np.ndarray | None]) -> float:
        """Mean over conditions of the energy distance between held-out cells and ``cells_of(c)``
        (cells in PCA coordinates; conditions where it gives None are left out)."""
        ed = []
        for c in self.conditions:
            pred = cells_of(c)
            if pred is not None:
                ed.append(energy_distance(self.observed[c], pred))
        return float(np.mean(ed)) if ed else float("nan")

    def energy_of_sampler(self, sampler: CellSampler, seed: int = 0) -> float:
        """:meth:`energy` of a predictor of raw cells: per condition as many cells as were
        observed, at library sizes sampled from the observed controls, transformed like the data."""
        rng = np.random.default_rng(seed)

        def cells_of(c: str) -> np.ndarray | None:
            raw = sampler(c, self.libraries(len(self.observed[c]), rng), int(rng.integers(2**31)))
            return None if raw is None else self.project(raw)

        return self.energy(cells_of)

    def energy_of_model(self, model: PerturbationModel, data: PerturbationData, seed: int = 0, chunk: int = 8) -> float:
        """:meth:`energy_of_sampler` of a model's posterior-predictive cells, drawn for ``chunk``
        conditions at a time with shared draws of the globals and basal states
        (:func:`predicted_cells_of_rows`); conditions the model cannot predict are left out."""
        rng = np.random.default_rng(seed)
        libs = {c: self.libraries(len(self.observed[c]), rng) for c in self.conditions}
        cells: dict[str, np.ndarray | None] = {}
        for s in range(0, len(self.conditions), chunk):
            part = self.conditions[s : s + chunk]
            n = max(len(libs[c]) for c in part)
            lib = np.stack([np.resize(libs[c], n) for c in part])  # [R, n]; each row's own cells come first
            rows = np.stack([data.dosage_row(c) for c in part])
            try:
                raw = predicted_cells_of_rows(model, rows, lib, data.is_counts, seed + s)
                got = {c: raw[r, : len(libs[c])] for r, c in enumerate(part)}
            except SamsError:  # a condition the model cannot predict (sVAE+): one at a time
                got = {}
                for r, c in enumerate(part):
                    try:
                        got[c] = predicted_cells_of_rows(model, rows[r : r + 1], lib[r : r + 1, : len(libs[c])],
                                                         data.is_counts, seed + s + r)[0]
                    except SamsError:
                        got[c] = None
            cells.update({c: None if x is None else self.project(x) for c, x in got.items()})
        return self.energy(cells.get)

    def floor(self, seed: int = 0) -> float:
        """The sampling floor: mean over conditions of the energy distance between two random
        halves of the held-out cells. A perfect predictor (as many cells as observed) scores
        about half of it, since each of its samples is twice as large."""
        rng = np.random.default_rng(seed)
        ed = []
        for c in self.conditions:
            x = self.observed[c][rng.permutation(len(self.observed[c]))]
            if len(x) >= 4:
                ed.append(energy_distance(x[: len(x) // 2], x[len(x) // 2 :]))
        return float(np.mean(ed)) if ed else float("nan")


def predicted_cells(model: PerturbationModel, d_row: np.ndarray, library: np.ndarray, is_counts: bool, seed: int = 0) -> np.ndarray:
    """Posterior-predictive cells of one dosage row, one per entry of ``library``: raw expression
    (counts drawn at those library sizes, or Gaussian values), globals from the guide and z_b
    from the prior. Put them on the ATE scale with :func:`transform_like_data`."""
    return predicted_cells_of_rows(model, np.asarray(d_row)[None], np.asarray(library)[None], is_counts, seed)[0]


@torch.no_grad()
def predicted_cells_of_rows(model: PerturbationModel, d_rows: np.ndarray, library: np.ndarray, is_counts: bool,
                            seed: int = 0) -> np.ndarray:
    """Posterior-predictive cells of several dosage rows [R, T] at library sizes ``library``
    [R, n]: raw expression [R, n, G]. Cell j of every row shares the j-th draw of the globals and
    of the basal state (paired draws), so within a row the cells are independent draws, as in
    :func:`predicted_cells`. Raises :class:`SamsError` when the model cannot predict a row."""
    device = model.input_mean.device
    model.eval()
    with seeded(device, seed):
        n = library.shape[1]
        g = model.sample_globals(n)
        out = model.predict(torch.as_tensor(np.asarray(d_rows, dtype=np.float32), device=device), g, 1)  # [n, R, G]
        if is_counts:
            x = model.likelihood.sample(out, torch.as_tensor(np.asarray(library, dtype=np.float32).T, device=device))
        else:
            x = model.likelihood.sample(out, 1.0)
        return x.permute(1, 0, 2).cpu().numpy().astype(np.float64)


def model_sampler(model: PerturbationModel, data: PerturbationData) -> CellSampler:
    """The :data:`CellSampler` of a model (None for conditions it cannot predict)."""

    def sample(label: str, library: np.ndarray, seed: int) -> np.ndarray | None:
        try:
            return predicted_cells(model, data.dosage_row(label), library, data.is_counts, seed)
        except SamsError:
            return None

    return sample


# ---------------------------------------------------------------------------------------------
# scores against a simulation's answer key
def bundle_mask_scores(bundle: ModelBundle, truth: SimulationTruth, threshold: float = 0.5) -> dict[str, float]:
    """Mask precision / recall / F1 of a model against the simulated truth (after matching units).

    The model's mask rows that are simulated singles are scored (all rows for SAMS-VAE; the
    single-perturbation conditions for sVAE+). NaN for families without masks or with no such row.
    """
    nan = {"mask_precision": float("nan"), "mask_recall": float("nan"), "mask_f1": float("nan")}
    probs = bundle.mask_probabilities()
    if probs is None:
        return nan
    known = set(truth.perturbations.tolist())
    rows = [i for i, r in enumerate(bundle.mask_rows) if r in known]
    if not rows:
        return nan
    true = np.asarray(truth.masks)[[truth.perturbations.tolist().index(bundle.mask_rows[i]) for i in rows]]
    s = mask_scores(true, probs[rows], threshold)
    return {"mask_precision": s["precision"], "mask_recall": s["recall"], "mask_f1": s["f1"]}


def add_truth_scores(table: pd.DataFrame, bundles: Mapping[str, ModelBundle], truth: SimulationTruth) -> pd.DataFrame:
    """``table`` (a :func:`compare_on_heldout` table) with mask precision / recall / F1 against the
    simulated truth for each model row (NaN for baselines and models without masks)."""
    out = table.copy()
    scores = [bundle_mask_scores(bundles[n], truth) if n in bundles else {} for n in out["name"]]
    for key in ("mask_precision", "mask_recall", "mask_f1"):
        out[key] = [s.get(key, float("nan")) for s in scores]
    return out


# ---------------------------------------------------------------------------------------------
# one table for models and baselines
#: What the dashboard's Compare page scores (a seeded subsample, so that a comparison takes
#: seconds on a screen of any size): at most 50 held-out conditions, 100 held-out cells of each
#: for the energy distance in a PCA fitted on 2,000 cells, 100 posterior-predictive cells per
#: condition for the ATE, and the IWELBO over at most 300 held-out cells with 20 importance
#: samples. ``compare_on_heldout``'s own defaults score everything (the protocol of DESIGN §3,
#: used by ``bench/science.py``).
QUICK_COMPARE: dict[str, int] = {"max_conditions": 50, "n_cells": 100, "n_ate_samples": 100, "max_iwelbo_cells": 300,
                                 "n_iwelbo_samples": 20, "n_fit_cells": 2000}


def heldout_conditions(data: PerturbationData, split: np.ndarray, max_conditions: int | None = None, seed: int = 0) -> list[str]:
    """The held-out conditions of ``split``, or a seeded sample of ``max_conditions`` of them (sorted)."""
    return sample_conditions(split_conditions(data, split, TEST), max_conditions, seed)


def compare_on_heldout(
    bundles: Mapping[str, ModelBundle],
    data: PerturbationData,
    split: np.ndarray,
    n_cells: int = 300,
    n_pcs: int = 20,
    n_ate_samples: int = 1000,
    seed: int = 0,
    truth: SimulationTruth | None = None,
    max_conditions: int | None = None,
    max_iwelbo_cells: int | None = None,
    n_iwelbo_samples: int = 100,
    cache: MutableMapping[tuple, dict[str, Any]] | None = None,
    n_fit_cells: int = 5000,
) -> pd.DataFrame:
    """Models (``{name: ModelBundle}``) and data-only baselines scored on the held-out conditions.

    One row per baseline (no change; additive in data: the sum of the members' observed effects
    on the cells outside the test set) and per model. Columns: the :func:`effect_scores` of the
    held-out conditions' observed effects (their test cells against all controls) — ATE r / R²
    (all and top-20 DE genes), cosine, cosine rank, calibration slope and intercept (all and
    top-20) —; ``energy_distance`` between held-out cells and predicted cells in a PCA of the data
    (mean over conditions; model cells drawn at library sizes of observed controls and transformed
    like the data) and ``energy_floor``, the half-vs-half sampling floor of the held-out cells;
    held-out ``iwelbo`` for models; ``collapsed`` from the diversity check; with ``truth`` (a
    simulated screen's answer key) also mask precision / recall / F1 (:func:`add_truth_scores`).

    Everything is scored by default. ``max_conditions`` scores a seeded sample of the held-out
    conditions, ``max_iwelbo_cells`` the IWELBO on a seeded sample of their test cells with
    ``n_iwelbo_samples`` importance samples, and ``n_fit_cells`` the cells the PCA is fitted on
    (:data:`QUICK_COMPARE` is the dashboard's choice).
    ``cache`` (a dict kept between calls on the same screen and split) keeps each model's row by
    its weights' checksum and these settings, and the held-out cells and baseline rows by the
    settings, so adding a model to a comparison scores only it.
    """
    settings = (tuple(heldout_conditions(data, split, max_conditions, seed)), n_cells, n_pcs, n_ate_samples, seed,
                max_iwelbo_cells, n_iwelbo_samples, n_fit_cells)
    ref_key = ("held-out cells and baselines", *settings)
    if cache is not None and ref_key in cache:  # the data side does not change when a model is added
        base = cache[ref_key]
    else:
        base = _heldout_reference(data, split, list(settings[0]), n_cells, n_pcs, seed, max_iwelbo_cells, n_fit_cells)
        if cache is not None:
            cache[ref_key] = base
    ref, obs, floor, iw_cells = base["ref"], base["observed"], base["floor"], base["iwelbo_cells"]
    conds = ref.conditions

    def row(name: str, kind: str, pred: pd.DataFrame, energy: float) -> dict[str, Any]:
        return {"name": name, "kind": kind, **effect_scores(obs, pred), "energy_distance": energy,
                "energy_floor": floor, "collapsed": bool(diversity_check(pred)["collapsed"])}

    rows = [row(name, "baseline", pred, energy) for name, (pred, energy) in base["baselines"].items()]
    for name, bundle in bundles.items():
        key = (bundle.checksum(), *settings)
        if cache is not None and key in cache:
            rows.append({**cache[key], "name": name})
            continue
        model = bundle.model
        pred = model_ate(model, conds, data.perturbations, data.is_counts, n_ate_samples, seed)
        pred.columns = data.genes
        r = row(name, "model", pred, ref.energy_of_model(model, data, seed))
        r["iwelbo"] = float(iwelbo(model, data, iw_cells, n_iwelbo_samples, seed).mean())
        if cache is not None:
            cache[key] = dict(r)
        rows.append(r)
    table = pd.DataFrame(rows)
    return add_truth_scores(table, bundles, truth) if truth is not None else table


def _heldout_reference(data: PerturbationData, split: np.ndarray, conditions: list[str], n_cells: int, n_pcs: int,
                       seed: int, max_iwelbo_cells: int | None, n_fit_cells: int) -> dict[str, Any]:
    """What :func:`compare_on_heldout` scores every model against: the held-out cells (PCA), their
    observed effects, the energy floor, the IWELBO cells and the two baselines' predictions and
    energy distances."""
    ref = HeldoutCells.build(data, split, n_cells, n_pcs, seed, conditions=conditions, n_fit_cells=n_fit_cells)
    conds = ref.conditions
    wanted = set(conds)
    test = np.flatnonzero(split == TEST)
    test = test[np.isin(data.labels[test].astype(str), list(wanted))]
    ctrl = np.flatnonzero(data.control_mask)
    obs = data_ate(data, test, ctrl).loc[conds]
    members = {m for c in conds for m in c.split("+")}
    outside = np.flatnonzero((split != TEST) & ~data.control_mask)
    outside = outside[np.isin(data.labels[outside].astype(str), list(members))]  # the singles the additive baseline sums
    seen = data_ate(data, outside, ctrl) if outside.size else pd.DataFrame(columns=data.genes)
    rng = np.random.default_rng(seed)
    ctrl_idx = ctrl if ctrl.size <= n_cells else np.sort(rng.choice(ctrl, n_cells, replace=False))
    ctrl_t = transformed_cells(data, ctrl_idx)
    iw_cells = test if max_iwelbo_cells is None or test.size <= max_iwelbo_cells else np.sort(
        np.random.default_rng(seed).choice(test, max_iwelbo_cells, replace=False))
    zero = pd.DataFrame(0.0, index=conds, columns=data.genes)
    add = additive_baseline(seen, conds)
    add_energy = ref.energy(lambda c: None if add.loc[c].isna().any() else ref.pca.transform(ctrl_t + add.loc[c].to_numpy()))
    baselines = {"no change": (zero, ref.energy(lambda c: ref.pca.transform(ctrl_t))), "additive in data": (add, add_energy)}
    return {"ref": ref, "observed": obs, "floor": ref.floor(seed), "iwelbo_cells": iw_cells, "baselines": baselines}


# ---------------------------------------------------------------------------------------------
# per covariate level, and how far a score can be trusted
#: Scores over fewer conditions than this are flagged unreliable (one pair's R² can be −393).
MIN_RELIABLE_CONDITIONS = 3


def flag_unreliable(table: pd.DataFrame, min_conditions: int = MIN_RELIABLE_CONDITIONS) -> pd.DataFrame:
    """``table`` with a ``reliable`` column: False on rows whose scores were computed over fewer
    than ``min_conditions`` conditions (``n_conditions``), True elsewhere (also without the column)."""
    out = table.copy()
    n = pd.to_numeric(out["n_conditions"], errors="coerce") if "n_conditions" in out else pd.Series(np.nan, index=out.index)
    reliable = ~(n < min_conditions)
    if "reliable" in out:
        out = out.drop(columns="reliable")
    out.insert(out.columns.get_loc("n_conditions") + 1 if "n_conditions" in out else len(out.columns), "reliable", reliable)
    return out


def per_level_metrics(bundles: Mapping[str, ModelBundle], which: str = "test",
                      min_conditions: int = MIN_RELIABLE_CONDITIONS) -> pd.DataFrame:
    """Each model's scores per level of its primary covariate, as recorded at training
    (``manifest["metrics_per_level"][which]``: the ``which`` split's cells of each level against
    that level's controls, :func:`~sams_core.evaluation.metrics.evaluate_model`).

    One row per (model, level): ``name``, ``level``, then the recorded metrics (``n_conditions``,
    ``n_cells``, ``iwelbo``, ATE r / R², cosine, calibration, ...) and ``reliable``
    (:func:`flag_unreliable`). Models without per-level metrics (no covariates, or trained before
    they were recorded) have no rows; the table is empty when none has any.
    """
    rows = []
    for name, bundle in bundles.items():
        per = (bundle.manifest.get("metrics_per_level") or {}).get(which) or {}
        for level, scores in per.items():
            rows.append({"name": name, "level": str(level), **{k: v for k, v in scores.items() if isinstance(v, (int, float))}})
    if not rows:
        return pd.DataFrame(columns=["name", "level", "n_conditions", "reliable"])
    out = flag_unreliable(pd.DataFrame(rows), min_conditions)
    first = [c for c in ("name", "level", "n_conditions", "reliable", "n_cells") if c in out]
    return out[first + [c for c in out.columns if c not in first]]


def per_level_baselines(data: PerturbationData, split: np.ndarray, min_conditions: int = MIN_RELIABLE_CONDITIONS) -> pd.DataFrame:
    """The data-only baselines per level of the primary covariate, scored like
    :func:`per_level_metrics` rows: each level's held-out (test) cells against that level's
    controls; "no change" predicts 0, "additive in data" sums the members' observed effects at
    the same level on cells outside the test set (a condition whose members were not measured
    alone at that level outside the test set is left out, so on a cell-type transfer split it
    often has no conditions). Columns ``name``, ``kind`` ("baseline"), ``level``,
    ``n_conditions``, ``reliable``, ``n_cells`` and the effect scores; empty without covariates."""
    if not data.covariates:
        return pd.DataFrame(columns=["name", "kind", "level", "n_conditions", "reliable"])
    test = np.flatnonzero((split == TEST) & ~data.control_mask)
    outside = np.flatnonzero((split != TEST) & ~data.control_mask)
    observed = data_ate_by_level(data, test)
    seen = data_ate_by_level(data, outside) if outside.size else {}
    lv = data.level_of_cells()
    rows = []
    for level, obs in observed.items():
        n_cells = int(np.sum(lv[test] == level))
        zero = pd.DataFrame(0.0, index=obs.index, columns=obs.columns)
        add = additive_baseline(seen.get(level, pd.DataFrame(columns=obs.columns)), list(obs.index))
        for name, pred in (("no change", zero), ("additive in data", add)):
            rows.append({"name": name, "kind": "baseline", "level": str(level), "n_cells": n_cells, **effect_scores(obs, pred)})
    if not rows:
        return pd.DataFrame(columns=["name", "kind", "level", "n_conditions", "reliable"])
    out = flag_unreliable(pd.DataFrame(rows), min_conditions)
    first = ["name", "kind", "level", "n_conditions", "reliable", "n_cells"]
    return out[first + [c for c in out.columns if c not in first]]
