"""Scores against a simulation's answer key: masks, latents and targets after matching units.

A model's latent units are identified only up to a permutation (and, for latents, a scale and
sign), so inferred units are first matched one-to-one to true units with the Hungarian
assignment (:func:`scipy.optimize.linear_sum_assignment`). Inferred units left over when the
model has more units than the truth stay unmatched: their mask positives count as false
positives. All functions are pure numpy/scipy and take arrays from any source.

A matching is an int array of length K_true: ``matching[k]`` is the inferred unit matched to
true unit k, or -1 when there is none (the model has fewer units). ``inferred[:, matching]``
therefore puts the matched inferred units in the order of the true ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from sams_core.errors import SamsError

__all__ = ["latent_mcc", "mask_scores", "match_units", "target_recovery"]


def _matrix(x: Any, what: str, name: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise SamsError(f"{what}: {name} must be a numeric array.") from None
    if a.ndim != 2:
        raise SamsError(f"{what}: {name} must be 2-D (rows × units), got shape {a.shape}.")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise SamsError(f"{what}: {name} is empty (shape {a.shape}).")
    if not np.isfinite(a).all():
        raise SamsError(f"{what}: {name} has NaN or infinite values. Pass finite numbers.")
    return a


def _same_rows(true: np.ndarray, inferred: np.ndarray, what: str, rows: str) -> None:
    if true.shape[0] != inferred.shape[0]:
        raise SamsError(
            f"{what}: the truth has {true.shape[0]} {rows} but the inferred array {inferred.shape[0]} "
            f"(shapes {true.shape} and {inferred.shape}). Pass the same {rows} in the same order."
        )


def _binary_truth(x: Any, what: str) -> np.ndarray:
    t = _matrix(x, what, "true_masks")
    if not np.isin(t, (0.0, 1.0)).all():
        raise SamsError(f"{what}: true_masks must hold only 0 and 1.")
    return t > 0


def _probabilities(x: Any, what: str) -> np.ndarray:
    p = _matrix(x, what, "inferred_probs")
    if p.min() < 0.0 or p.max() > 1.0:
        raise SamsError(
            f"{what}: inferred_probs must lie in [0, 1] (got {p.min():.3g} to {p.max():.3g}). "
            "Pass mask probabilities, e.g. sigmoid(logits), not logits."
        )
    return p


def _threshold(threshold: float, what: str) -> float:
    try:
        th = float(threshold)
    except (TypeError, ValueError):
        raise SamsError(f"{what}: threshold must be a number, got {threshold!r}.") from None
    if not 0.0 < th <= 1.0:
        raise SamsError(f"{what}: threshold must be in (0, 1], got {threshold!r}.")
    return th


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation between the columns of a (n × p) and b (n × q); 0 for constant columns."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    sa, sb = np.sqrt((a**2).sum(0)), np.sqrt((b**2).sum(0))
    c = (a.T @ b) / np.maximum(np.outer(sa, sb), 1e-300)
    c[(sa < 1e-12), :] = 0.0
    c[:, (sb < 1e-12)] = 0.0
    return np.clip(c, -1.0, 1.0)


def _assign(score: np.ndarray) -> np.ndarray:
    """Hungarian assignment maximising ``score`` (K_true × K_inf) → matching (K_true,)."""
    r, c = linear_sum_assignment(score, maximize=True)
    out = np.full(score.shape[0], -1, dtype=np.int64)
    out[r] = c
    return out


def match_units(true_masks_or_latents: Any, inferred: Any, method: str = "overlap") -> np.ndarray:
    """Match inferred units to true units one-to-one (Hungarian assignment).

    Args:
        true_masks_or_latents: (R × K_true) true masks (rows: perturbations) or true latents
            (rows: cells).
        inferred: (R × K_inf) inferred masks / mask probabilities, or inferred latents, with the
            same rows in the same order.
        method: ``"overlap"`` maximises Σ_k Σ_r true[r, k] · inferred[r, matching[k]] (for binary
            masks: the number of agreeing nonzero entries); ``"correlation"`` maximises the sum of
            |Pearson r| between matched columns.

    Returns:
        int64 array of length K_true: the inferred unit matched to each true unit, -1 where none
        (only when K_inf < K_true). With K_inf ≥ K_true every true unit is matched and the extra
        inferred units are left over.
    """
    what = "match_units"
    true = _matrix(true_masks_or_latents, what, "the truth")
    inf = _matrix(inferred, what, "inferred")
    _same_rows(true, inf, what, "rows")
    if method == "overlap":
        score = true.T @ inf
    elif method == "correlation":
        score = np.abs(_corr(true, inf))
    else:
        raise SamsError(f"{what}: unknown method {method!r}. Use 'overlap' or 'correlation'.")
    return _assign(score)


def _matched_predictions(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(matching, pred reordered to the true units (False where unmatched), leftover inferred units)."""
    matching = _assign(true.T.astype(np.float64) @ pred.astype(np.float64))
    ok = matching >= 0
    aligned = np.zeros_like(true, dtype=bool)
    aligned[:, ok] = pred[:, matching[ok]]
    leftover = np.setdiff1d(np.arange(pred.shape[1]), matching[ok])
    return matching, aligned, leftover


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return float(precision), float(recall), float(f1)


def mask_scores(true_masks: Any, inferred_probs: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Precision, recall and F1 of binarised mask probabilities after matching units.

    The inferred probabilities are binarised at ``threshold`` (≥ is on), inferred units are
    matched to true units by overlap (the number of agreeing nonzero entries, Hungarian), and
    precision / recall / F1 are computed over all (perturbation, unit) entries. Positives of
    inferred units left unmatched count as false positives.

    Args:
        true_masks: (T × K_true) 0/1 true masks.
        inferred_probs: (T × K_inf) mask probabilities in [0, 1], rows in the same perturbation
            order (see ``sams_core.simulate.truth_masks_for`` to reorder the truth).
        threshold: probability at or above which an entry counts as on.

    Returns:
        dict with ``precision``, ``recall``, ``f1`` (floats; 0.0 where undefined), ``tp``,
        ``fp``, ``fn`` (ints) and ``matching`` (see :func:`match_units`).
    """
    what = "mask_scores"
    t = _binary_truth(true_masks, what)
    p = _probabilities(inferred_probs, what)
    _same_rows(t, p, what, "perturbations")
    pred = p >= _threshold(threshold, what)
    matching, aligned, leftover = _matched_predictions(t, pred)
    tp = int((t & aligned).sum())
    fp = int((~t & aligned).sum()) + int(pred[:, leftover].sum())
    fn = int((t & ~aligned).sum())
    precision, recall, f1 = _prf(tp, fp, fn)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "matching": matching}


def latent_mcc(true_latents: Any, inferred: Any) -> dict[str, Any]:
    """Mean correlation coefficient (MCC) between true and inferred latents after matching.

    Units are matched on |Pearson r| (Hungarian); the MCC is the mean over the true units of
    |r| with their matched inferred unit (0 for a true unit left unmatched when the model has
    fewer units) — the standard score of the identifiability literature. It is invariant to
    permuting, rescaling and flipping the sign of inferred units.

    Args:
        true_latents: (N × K_true) true latents of N cells.
        inferred: (N × K_inf) inferred latents of the same cells, same order.

    Returns:
        dict with ``mcc`` (float in [0, 1]), ``per_unit`` (K_true |r| values) and ``matching``.
    """
    what = "latent_mcc"
    t = _matrix(true_latents, what, "true_latents")
    z = _matrix(inferred, what, "inferred")
    _same_rows(t, z, what, "cells")
    if t.shape[0] < 2:
        raise SamsError(f"{what}: need at least 2 cells to compute correlations, got {t.shape[0]}.")
    c = np.abs(_corr(t, z))
    matching = _assign(c)
    per = np.array([c[k, matching[k]] if matching[k] >= 0 else 0.0 for k in range(t.shape[1])])
    return {"mcc": float(per.mean()), "per_unit": per, "matching": matching}


def target_recovery(true_masks: Any, inferred_probs: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Per-perturbation target sets against the truth after matching units (sVAE+'s target recovery).

    Matching and binarisation as in :func:`mask_scores`. A perturbation's target set is
    recovered exactly when its matched inferred targets equal its true targets and none of
    its positives fall on a leftover inferred unit.

    Returns:
        dict with ``precision``, ``recall``, ``f1`` over (perturbation, target) pairs, ``exact``
        (fraction of perturbations whose target set is recovered exactly), ``exact_per_perturbation``
        (bool array of length T), ``f1_per_perturbation`` (float array) and ``matching``.
    """
    what = "target_recovery"
    t = _binary_truth(true_masks, what)
    p = _probabilities(inferred_probs, what)
    _same_rows(t, p, what, "perturbations")
    pred = p >= _threshold(threshold, what)
    matching, aligned, leftover = _matched_predictions(t, pred)
    extra = pred[:, leftover].sum(1)
    tp_row = (t & aligned).sum(1)
    fp_row = (~t & aligned).sum(1) + extra
    fn_row = (t & ~aligned).sum(1)
    exact = (fp_row == 0) & (fn_row == 0)
    f1_row = np.array([_prf(int(a), int(b), int(c))[2] if a + b + c else 1.0 for a, b, c in zip(tp_row, fp_row, fn_row)])
    precision, recall, f1 = _prf(int(tp_row.sum()), int(fp_row.sum()), int(fn_row.sum()))
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "exact": float(exact.mean()),
        "exact_per_perturbation": exact,
        "f1_per_perturbation": f1_row,
        "matching": matching,
    }
