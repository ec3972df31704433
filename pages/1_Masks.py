"""Masks: which latent units each perturbation targets (probabilities, embeddings, truth)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from explorer import state as S
from sams_core import plots
from sams_core.plots import heatmap_orders

ctx = S.page("Masks")
bundle = ctx.bundle
probs = bundle.mask_probabilities()
emb = bundle.embedding_means()
if probs is None:
    st.warning(f"{bundle.label} has no masks (only SAMS-VAE and sVAE+ learn which units a perturbation targets). "
               "Choose a SAMS-VAE or sVAE+ model in the sidebar.")
    if emb is None:
        st.stop()
rows = bundle.mask_rows
units = [f"unit {k}" for k in range(bundle.n_latent)]
if settling := bundle.mask_settling_note():
    st.info(settling, icon=":material/pending:")

c1, c2, c3 = st.columns([1, 1, 2])
threshold = S.widget(c1.slider, "Mask threshold", "masks_threshold", 0.5, min_value=0.0, max_value=1.0, step=0.05)
cluster = S.widget(c2.checkbox, "Cluster rows and columns", "masks_cluster", True)
query = S.widget(c3.text_input, "Search perturbations (part of a name)", "masks_filter", "")
stats = [s for s in plots.ROW_STATISTICS if probs is not None or s == "shift size"]
c1, c2, c3 = st.columns([2, 1, 1])
stat = S.widget(c1.selectbox, "Show the top perturbations by", "masks_stat", stats[0], stats)
top_n = S.widget(c2.number_input, "How many", "masks_top", min(plots.HEATMAP_ROWS, len(rows)), min_value=1,
                 max_value=max(len(rows), 1), step=10)
whole = S.widget(c3.toggle, f"Whole matrix ({len(rows):,})", "masks_all", len(rows) <= plots.HEATMAP_ROWS,
                 help="Every matching perturbation; above a hundred rows the chart is screen-high, names on hover: drag a box to zoom to a cluster.")
scores = plots.row_scores(stat, probs, emb, threshold)
keep = plots.heatmap_rows(rows, scores, query, None if whole else int(top_n)).tolist()
if not keep:
    st.info(f"No perturbation matches {query!r}; showing the top {int(top_n)}.")
    keep = plots.heatmap_rows(rows, scores, "", int(top_n)).tolist()
n_match = len(plots.heatmap_rows(rows, scores, query, None)) if query else len(rows)
st.caption(f"Showing {len(keep):,} of {len(rows):,} perturbations" + (f" ({n_match:,} match {query!r})" if query else "")
           + ("" if whole else f", the top {int(top_n)} by {stat}") + ".")
sel_rows = [rows[i] for i in keep]
chosen = S.widget(st.selectbox, "Perturbation (type to search)", "masks_pert", sel_rows[0], rows)

base = probs if probs is not None else emb
sub = base[keep]
orders = heatmap_orders(sub) if cluster and 2 < sub.shape[0] <= 3000 else (np.arange(sub.shape[0]), np.arange(sub.shape[1]))

left, right = st.columns(2)
if probs is not None:
    with left:
        S.chart(plots.mask_heatmap(probs[keep], sel_rows, units, threshold, orders=orders, highlight=chosen,
                                   title=f"Mask probabilities · {bundle.label}"), "mask_probabilities", "masks_probs")
if emb is not None:
    with right if probs is not None else left:
        S.chart(plots.embedding_heatmap(emb[keep], sel_rows, units, orders=orders, highlight=chosen), "embeddings", "masks_emb")

i = rows.index(chosen)
st.subheader(f"{chosen}")
detail = pd.DataFrame({"unit": units})
if probs is not None:
    detail["mask probability"] = probs[i]
    detail["targeted"] = probs[i] >= threshold
if emb is not None:
    detail["embedding"] = emb[i]
truth_m = S.mask_truth(ctx)
truth = ctx.truth
if probs is not None:
    tg = detail.loc[detail["targeted"], "unit"].tolist()
    st.markdown(f"**Targeted units** (P ≥ {threshold:g}): {', '.join(tg) if tg else 'none'}")
S.show_table(detail, f"{chosen}_units", "masks_detail")

if truth is not None and truth_m is not None:
    st.subheader("Ground truth (simulated screen)")
    st.caption("The simulator's true masks and effects. Model units are unordered: compare patterns, not unit numbers "
               "(the F1 on the Compare page matches units first).")
    tu = [f"true unit {k}" for k in range(truth_m.shape[1])]
    tp = list(truth.perturbations)
    temb = np.asarray(truth.embeddings)
    pos = [tp.index(r) for r in sel_rows]
    tm = truth_m[keep].astype(float)
    tor = heatmap_orders(tm) if cluster and tm.shape[0] > 2 else (np.arange(tm.shape[0]), np.arange(tm.shape[1]))
    tor = (orders[0], tor[1])
    a, b = st.columns(2)
    with a:
        S.chart(plots.mask_heatmap(tm, sel_rows, tu, None, orders=tor, highlight=chosen, title="True masks"), "true_masks", "masks_truth")
    with b:
        S.chart(plots.embedding_heatmap(temb[pos], sel_rows, tu, orders=tor, highlight=chosen, title="True effects"), "true_effects", "masks_truth_emb")
    if probs is not None:
        from sams_core.evaluation.truth import mask_scores

        sc = mask_scores(truth_m, probs, threshold)
        st.markdown(f"**Mask recovery at {threshold:g}** (units matched by overlap): precision {sc['precision']:.2f}, "
                    f"recall {sc['recall']:.2f}, F1 {sc['f1']:.2f}")
