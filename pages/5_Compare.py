"""Compare: every model of this dataset on the same held-out split, against data-only baselines."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from explorer import state as S
from sams_core import plots
from sams_core.evaluation.compare import (
    MIN_RELIABLE_CONDITIONS,
    QUICK_COMPARE,
    add_truth_scores,
    compare_on_heldout,
    flag_unreliable,
    per_level_baselines,
    per_level_metrics,
)


@st.cache_resource(show_spinner=False)
def _comparisons() -> dict:
    """Comparison tables of this server process, shared by every session (by screen, settings and models)."""
    return {}


@st.cache_resource(show_spinner=False, max_entries=20)
def _model_rows(data_key: str) -> dict:
    """Each model's scores on one screen, kept per bundle so adding a model scores only that one."""
    return {}


@st.cache_data(show_spinner="Scoring the baselines per level…", max_entries=20)
def _level_baselines(data_key: str, split_key: str, _data, _split):
    """The data-only baselines per level of the primary covariate (by screen and split)."""
    return per_level_baselines(_data, _split)


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

table = flag_unreliable(table)
if not table["reliable"].all():
    st.warning(f"Scored on fewer than {MIN_RELIABLE_CONDITIONS} held-out conditions: these scores are unreliable "
               "(one condition's R² can be anything); read them as anecdotes, not as a ranking.")
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

# models trained with covariates: their scores per level of the primary covariate
per = per_level_metrics(bundles)
if not per.empty:
    cov_name = next(iter(next(b for b in bundles.values() if b.covariates).covariates))
    st.subheader(f"Per {cov_name} (held-out cells)")
    per.insert(1, "model", [labels.get(n, n) for n in per["name"]])
    per.insert(2, "kind", "model")
    base = _level_baselines(ctx.data_key, str(spec.get("test_conditions")), data, split)
    per = pd.concat([base.assign(model=base["name"]), per], ignore_index=True)[list(per.columns)]
    per = per.sort_values("level", kind="stable").reset_index(drop=True)
    levels = sorted(per["level"].unique())
    shown_level = S.widget(st.selectbox, f"{cov_name}", "compare_level", "all levels", ["all levels", *levels],
                           help=f"Scores of each {cov_name}'s held-out cells against that {cov_name}'s controls.")
    shown = per if shown_level == "all levels" else per[per["level"] == shown_level]
    missing = [labels.get(n, n) for n in bundles if n not in set(per["name"])]
    st.caption(f"Models: scores recorded when each was trained, on every held-out cell of each {cov_name} against the "
               f"controls of the same {cov_name} (not the subsample scored above). Baselines: scored here the same way, the "
               f"additive one from the same {cov_name}'s cells outside the test set (none where a perturbation's {cov_name} "
               "was held out, as on a cell-type transfer split). "
               f"Rows on fewer than {MIN_RELIABLE_CONDITIONS} conditions are marked reliable = False."
               + (f" No per-{cov_name} scores recorded for: {', '.join(missing)}." if missing else ""))
    bad = shown[~shown["reliable"]]
    if len(bad):
        st.warning("Unreliable (fewer than {} conditions): {}.".format(
            MIN_RELIABLE_CONDITIONS, "; ".join(f"{r['model']} in {r['level']} ({int(r['n_conditions'])} conditions)" for _, r in bad.iterrows())))
    S.show_table(shown, f"heldout_per_{cov_name}", "compare_level_table")
    level_metrics = [m for m in metrics if m in shown]
    if level_metrics and shown_level != "all levels":
        S.chart(plots.comparison_bars(shown.assign(name=shown["model"]), level_metrics,
                                      title=f"Held-out comparison in {shown_level}"), f"heldout_comparison_{shown_level}", "compare_level_bars")
