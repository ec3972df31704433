"""Scores against a simulation's answer key: masks, latents and targets after matching units.

A model's latent units are only identified up to permutation, so inferred units are first
matched to true units (Hungarian assignment, :func:`scipy.optimize.linear_sum_assignment`).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from sams_core.errors import SamsError


def _check_rows(true: np.ndarray, inferred: np.ndarray, what: str) -> None:
    if true.ndim != 2 or inferred.ndim != 2 or true.shape[0] != inferred.shape[0]:
        raise SamsError(
            f"{what}: true {true.shape} and inferred {inferred.shape} must be 2-D with the same rows. "
            "Order the inferred rows like the truth."
        )


def match_units(true: np.ndarray, inferred: np.ndarray, method: str = "overlap") -> np.ndarray:
    """For each true unit k, the inferred unit matched to it (array of length K_true; -1 if none).

    ``overlap`` maximises the agreeing nonzero entries of binary masks; ``correlation``
    maximises |Pearson r| between latent columns.
    """
    true = np.asarray(true, dtype=np.float64)
    inferred = np.asarray(inferred, dtype=np.float64)
    _check_rows(true, inferred, "match_units")
    if method == "overlap":
        score = true.T @ inferred  # [K_true, K_inf]
    elif method == "correlation":
        score = np.abs(_corr(true, inferred))
    else:
        raise SamsError(f"Unknown matching method {method!r}: use 'overlap' or 'correlation'.")
    r, c = linear_sum_assignment(-score)
    out = np.full(true.shape[1], -1, dtype=np.int64)
    out[r] = c
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = (a - a.mean(0)) / np.maximum(a.std(0), 1e-12)
    b = (b - b.mean(0)) / np.maximum(b.std(0), 1e-12)
    return a.T @ b / a.shape[0]


def _prf(true_bin: np.ndarray, pred_bin: np.ndarray, extra_fp: int = 0) -> tuple[float, float, float]:
    tp = int((true_bin & pred_bin).sum())
    fp = int((~true_bin & pred_bin).sum()) + extra_fp
    fn = int((true_bin & ~pred_bin).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def mask_scores(true_masks: np.ndarray, inferred_probs: np.ndarray, threshold: float = 0.5) -> dict:
    """Precision, recall and F1 of binarised mask probabilities after matching units.

    Positives of inferred units not matched to any true unit count as false positives.
    """
    t = np.asarray(true_masks) > 0
    p = np.asarray(inferred_probs) >= threshold
    _check_rows(t, p, "mask_scores")
    match = match_units(t, p, "overlap")
    cols = np.where(match >= 0, match, 0)
    pred = p[:, cols] & (match >= 0)[None, :]
    unmatched = np.setdiff1d(np.arange(p.shape[1]), match[match >= 0])
    precision, recall, f1 = _prf(t, pred, int(p[:, unmatched].sum()))
    return {"precision": precision, "recall": recall, "f1": f1, "matching": match}


def latent_mcc(true_latents: np.ndarray, inferred: np.ndarray) -> dict:
    """Mean |correlation| between true latents and their matched inferred units (MCC)."""
    t = np.asarray(true_latents, dtype=np.float64)
    z = np.asarray(inferred, dtype=np.float64)
    _check_rows(t, z, "latent_mcc")
    match = match_units(t, z, "correlation")
    c = np.abs(_corr(t, z))
    per = np.array([c[k, match[k]] if match[k] >= 0 else 0.0 for k in range(t.shape[1])])
    return {"mcc": float(per.mean()), "per_unit": per, "matching": match}


def target_recovery(true_masks: np.ndarray, inferred_probs: np.ndarray, threshold: float = 0.5) -> dict:
    """Per-perturbation target sets vs the truth after matching (sVAE+'s target recovery).

    Returns precision / recall / F1 over (perturbation, unit) targets and the fraction of
    perturbations whose whole target set is recovered exactly.
    """
    s = mask_scores(true_masks, inferred_probs, threshold)
    t = np.asarray(true_masks) > 0
    p = np.asarray(inferred_probs) >= threshold
    match = s["matching"]
    exact = []
    unmatched = np.setdiff1d(np.arange(p.shape[1]), match[match >= 0])
    for i in range(t.shape[0]):
        pred = np.array([p[i, match[k]] if match[k] >= 0 else False for k in range(t.shape[1])])
        exact.append(bool(np.array_equal(pred, t[i]) and not p[i, unmatched].any()))
    return {"precision": s["precision"], "recall": s["recall"], "f1": s["f1"], "exact": float(np.mean(exact)), "matching": match}
