"""Plain meanings of every metric the command line and the dashboard show.

One sentence per metric, keyed by the column or manifest name it appears under (``ate_r_top20``,
``iwelbo``, ``mask_f1``, ...), so a table header, a hover help or a report can explain a number
without the reader looking it up. :func:`metric_help` finds the sentence for a key, also for
spellings a page shows (``"ATE r"``, ``"R²"``, ``"top-20"``) and for keys with a split or model
prefix (``"test/ate_r"``).
"""

from __future__ import annotations

import re

#: metric key → what it means, in one sentence (higher/lower is better where it matters).
GLOSSARY: dict[str, str] = {
    "n_conditions": "Number of perturbation conditions the scores are computed over; below 3 the scores are unreliable.",
    "n_cells": "Number of cells the scores are computed over.",
    "iwelbo": "Held-out importance-weighted ELBO in nats per cell: how well the model predicts the cells it never saw (higher is better).",
    "elbo": "Evidence lower bound in nats per cell: the model's fit of the training cells, penalised by how far its posterior strays from the prior (higher is better).",
    "neg_elbo": "Negative ELBO, the untempered training loss in nats per cell (lower is better).",
    "loss": "The objective the optimiser minimised, per cell; a tempered schedule's loss is not the ELBO (lower is better).",
    "ate_r": "Pearson correlation between predicted and observed average treatment effects over all perturbations and genes (1 = perfect, 0 = unrelated).",
    "ate_r2": "R² of predicted against observed average treatment effects over all perturbations and genes (1 = perfect, 0 = no better than predicting the mean, negative = worse).",
    "ate_r_top20": "Pearson correlation of predicted and observed effects on each perturbation's 20 most changed genes (top-20), where real effects are.",
    "ate_r2_top20": "R² of predicted against observed effects on each perturbation's 20 most changed genes (top-20; negative = worse than the mean).",
    "cosine": "Mean cosine similarity between each condition's predicted and observed log fold-change over genes (1 = same direction).",
    "cosine_rank": "Cosine rank: for each observed effect, the share of other conditions' predictions closer to it than its own (0 = best, 0.5 = chance); exposes models that predict the same effect for everything.",
    "calibration_slope": "Slope of the line of predicted on observed effects over all genes (1 = calibrated, below 1 = predictions shrunk towards zero, above 1 = exaggerated).",
    "calibration_intercept": "Intercept of the line of predicted on observed effects over all genes (0 = no shift common to all effects).",
    "calibration_slope_top20": "Calibration slope on each condition's 20 most changed genes (1 = calibrated).",
    "calibration_intercept_top20": "Calibration intercept on each condition's 20 most changed genes (0 = no offset).",
    "energy_distance": "Energy distance between held-out cells and cells drawn from the predictor, in a PCA of the data; compares whole distributions, not only means (lower is better, the floor is the best reachable).",
    "energy_floor": "Energy distance between two halves of the held-out cells themselves: the score a perfect predictor would get.",
    "collapsed": "True when the predictor gives nearly the same effect for every condition, so its correlations say little.",
    "mask_precision": "Share of the model's active mask entries that are true targets in the simulator, after matching latent units to true units.",
    "mask_recall": "Share of the simulator's true mask entries the model found, after matching latent units to true units.",
    "mask_f1": "Mask F1: harmonic mean of mask precision and recall against the simulator's true masks (1 = every target found and nothing else).",
    "mcc": "Mean correlation between true and inferred latent units after matching units (1 = the latent space is recovered up to order and sign).",
    "interaction_score": "Size of a combination's predicted effect that is not the sum of its singles, relative to the whole effect (0 = purely additive).",
    "effect_norm": "Length of the predicted effect vector over genes: how much the perturbation changes expression overall.",
    "mean_interval_width": "Mean width of the genes' credible intervals: how uncertain the prediction is.",
    "genes_excluding_zero": "Number of genes whose credible interval excludes zero: genes the model is confident are changed.",
    "pair_score": "Expected predicted interaction of an unmeasured pair, averaged over Monte-Carlo draws; high scores are the most informative pairs to measure next.",
    "mask_probability": "Posterior probability that a perturbation acts on a latent unit.",
    "pvals_adj": "p-value adjusted for testing many genes (Benjamini-Hochberg): below 0.05 the change is unlikely to be chance.",
    "pval": "Probability of a difference at least this large between the perturbation's cells and the controls by chance, for one gene (not adjusted for testing many).",
    "q": "Enrichment p-value adjusted for testing many gene sets (Benjamini-Hochberg): below 0.05 the set is unlikely to be enriched by chance.",
    "logfoldchange": "Log2 fold change of a gene's mean expression in a perturbation's cells over control cells.",
    "enrichment_p": "Probability of an overlap at least this large between a unit's top genes and a gene set by chance (hypergeometric).",
}

#: What the additive-in-data baseline is and when it applies, in one sentence.
ADDITIVE_BASELINE: str = (
    "The additive-in-data baseline predicts a combination's effect as the sum of its members' observed "
    "single effects, using no model; it applies only to combinations whose every member was measured alone "
    "in the training cells (otherwise it has no prediction), and a model should beat it where members interact."
)

#: What the no-change baseline is, in one sentence.
NO_CHANGE_BASELINE: str = "The no-change baseline predicts that every perturbation leaves expression as in the controls; any useful model beats it."

_ALIASES: dict[str, str] = {
    "ate r": "ate_r",
    "r": "ate_r",
    "r²": "ate_r2",
    "r2": "ate_r2",
    "ate r²": "ate_r2",
    "ate r2": "ate_r2",
    "top-20": "ate_r_top20",
    "top20": "ate_r_top20",
    "ate r top-20": "ate_r_top20",
    "r² top-20": "ate_r2_top20",
    "calibration slope": "calibration_slope",
    "calibration intercept": "calibration_intercept",
    "cosine rank": "cosine_rank",
    "energy distance": "energy_distance",
    "mask f1": "mask_f1",
    "f1": "mask_f1",
    "interaction score": "interaction_score",
    "effect norm": "effect_norm",
    "genes with interval excluding 0": "genes_excluding_zero",
    "n_genes_excluding_zero": "genes_excluding_zero",
    "held-out iwelbo": "iwelbo",
    "−elbo": "neg_elbo",
    "-elbo": "neg_elbo",
    "additive in data": "additive_in_data",
    "no change": "no_change",
    "pval_adj": "pvals_adj",
    "padj": "pvals_adj",
    "pvals": "pval",
}


def _normalise(key: str) -> str:
    k = key.strip().lower()
    k = k.rsplit("/", 1)[-1].rsplit(":", 1)[-1].strip()
    return _ALIASES.get(k, _ALIASES.get(k.replace("_", " "), re.sub(r"[\s\-]+", "_", k)))


def metric_help(key: str, default: str = "") -> str:
    """The plain meaning of metric ``key`` (a column name such as ``ate_r_top20``, a label such as
    ``"Calibration slope"``, or a prefixed name such as ``"test/iwelbo"``); ``default`` when the
    key is not a known metric. The two data baselines (``"additive in data"``, ``"no change"``)
    are explained too."""
    k = _normalise(key)
    if k == "additive_in_data":
        return ADDITIVE_BASELINE
    if k == "no_change":
        return NO_CHANGE_BASELINE
    return GLOSSARY.get(k, default)


def column_help(columns: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Help text for each of ``columns`` that is a known metric (for table column tooltips)."""
    return {c: h for c in columns if (h := metric_help(str(c)))}


__all__ = ["ADDITIVE_BASELINE", "GLOSSARY", "NO_CHANGE_BASELINE", "column_help", "metric_help"]
