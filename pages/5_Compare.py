"""Compare: every model of this dataset on the same held-out split, against data-only baselines."""

from __future__ import annotations

import streamlit as st

from explorer import state as S
from sams_core import plots
from sams_core.evaluation.compare import QUICK_COMPARE, add_truth_scores, compare_on_heldout


@st.cache_resource(show_spinner=False)
def _comparisons() -> dict:
    """Comparison tables of this server process, shared by every session (by screen, settings and models)."""
    return {}


@st.cache_resource(show_spinner=False, max_entries=20)
def _model_rows(data_key: str) -> dict:
    """Each model's scores on one screen, kept per bundle so adding a model scores only that one."""
    return {}

ctx = S.page("Compare")
data, split = ctx.data, ctx.split
spec = ctx.bundle.split_spec
names = [n for n in ctx.models]
chosen = S.widget(st.multiselect, "Models", "compare_models", names, names)
bundles = {}
for n in chosen:
    b = S.guarded(lambda n=n: ctx.bundle_of(n))
    if b is None:
        continue
    if b.split_spec.get("test_conditions") != spec.get("test_conditions"):
        st.caption(f"{n}: trained on another split — left out.")
        continue
    bundles[n] = b
if not bundles:
    st.info("Choose at least one model trained on this split.")
    st.stop()
held = spec.get("test_conditions", [])
st.caption(f"Split: {spec.get('kind')} · {len(held):,} held-out conditions: {', '.join(held[:20])}{' …' if len(held) > 20 else ''}")
full = S.widget(st.toggle, "Score every held-out cell and condition", "compare_full", False,
                help="Off: a seeded subsample (at most {max_conditions} held-out conditions, {n_cells} cells each for the energy "
                     "distance, {n_ate_samples} predicted cells per condition, IWELBO on at most {max_iwelbo_cells} held-out cells "
                     "with {n_iwelbo_samples} importance samples), seconds on any screen. On: everything (minutes on large screens).".format(**QUICK_COMPARE))
settings = {"n_cells": 300, "n_ate_samples": 1000} if full else dict(QUICK_COMPARE)
memo = _comparisons()
key = (ctx.data_key, full, tuple(f"{n}:{b.checksum()}" for n, b in bundles.items()))
if key not in memo:
    with st.spinner("Comparing models on the held-out conditions…"):
        memo[key] = S.guarded(lambda: compare_on_heldout(bundles, data, split, cache=_model_rows(ctx.data_key), **settings))
    while len(memo) > 20:
        memo.pop(next(iter(memo)))
table = memo[key]
if table is None:
    st.stop()
table = table.copy()
labels = {n: b.label for n, b in bundles.items()}
table.insert(1, "model", [labels.get(n, n) for n in table["name"]])

truth = ctx.truth
if truth is not None:
    table = add_truth_scores(table, bundles, truth)

for _, r in table[table["collapsed"]].iterrows():
    st.warning(f"{r['model']} looks collapsed: its predicted effects are nearly the same for every held-out condition.")

S.show_table(table, "heldout_comparison", "compare_table")
metric_opts = [c for c in ["ate_r", "ate_r2", "ate_r_top20", "ate_r2_top20", "calibration_slope", "calibration_slope_top20", "cosine",
                            "cosine_rank", "energy_distance", "iwelbo", "mask_f1", "mask_precision", "mask_recall"] if c in table]
metrics = S.widget(st.multiselect, "Metrics to plot", "compare_metrics", [m for m in ["ate_r_top20", "cosine", "energy_distance", "mask_f1"] if m in metric_opts], metric_opts)
if metrics:
    fig = plots.comparison_bars(table.assign(name=table["model"]), metrics, title="Held-out comparison (grey = baselines)")
    S.chart(fig, "heldout_comparison", "compare_bars")
st.caption("ate_r / R²: correlation of predicted and observed effects over genes (top20 = the 20 most changed genes); "
           "calibration_slope: slope of predicted on observed effects (1 = calibrated, below 1 = shrunk predictions); "
           "cosine_rank: for each observed effect, the share of other predictions closer to it than its own (0 best, 0.5 chance); "
           "energy_distance: held-out vs predicted cells in PCA space, lower is better, energy_floor is what two halves of the "
           "held-out cells score; mask_f1: recovery of the simulator's true masks.")
