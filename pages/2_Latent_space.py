"""Latent space: UMAP of cells' latents coloured by perturbation, by the cluster of its perturbation,
a gene's expression, a predicted effect, a unit, mask targets or a covariate; one perturbation highlighted; box or lasso selection
with the selected cells' composition by perturbation and covariate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from explorer import state as S
from sams_core import plots
from sams_core.interpret.differential import condition_clusters
from sams_core.interpret.embed import cell_latents
from sams_core.labels import split_label

ctx = S.page("Latent space")
data, bundle = ctx.data, ctx.bundle
K = bundle.model.n_latent

c1, c2, c3 = st.columns(3)
latent = S.widget(c1.radio, "Latent", "latent_which", "full", ["full", "basal"], horizontal=True,
                  help="full = basal state + the perturbation's shift; basal = the cell's state without it")
max_cells = S.widget(c2.slider, "Cells (subsample)", "latent_cells", min(2000, data.n_cells),
                     min_value=min(200, data.n_cells), max_value=data.n_cells, step=100)
covs = [c for c in data.obs.columns if c not in S.NOT_COVARIATES and data.obs[c].nunique() <= 50] if data.obs is not None else []
modes = ["perturbation", "perturbation cluster", "gene expression", "predicted effect", "highlight a perturbation",
         "unit value", "targeted by"]
modes += [f"covariate: {c}" for c in covs]
mode = S.widget(c3.selectbox, "Colour by", "latent_color", "perturbation", modes)

bar = st.progress(0.0, text="Preparing…")


def progress(msg: str, frac: float) -> None:
    bar.progress(float(frac), text=msg)


emb = S.guarded(lambda: S.embedding(ctx.model_key, ctx.data_key, bundle, data, latent, int(max_cells), progress))
if emb is None:
    st.stop()
bar.progress(1.0, text=f"UMAP of {len(emb.cells):,} cells ({latent} latent)" + (" — from cache" if emb.from_cache else ""))
labels = data.labels[emb.cells].astype(str)
shown = f"{len(emb.cells):,} cells" if len(emb.cells) == data.n_cells else f"{len(emb.cells):,} of {data.n_cells:,} cells (seeded subsample)"
title = f"UMAP of {latent} latents · {shown} · {bundle.label}"
genes = list(data.genes)


def gene_choice() -> str:
    return S.widget(st.selectbox, "Gene (type to search)", "latent_gene", genes[0], genes,
                    help=f"any of the screen's {len(genes):,} genes; type part of its name to find it")


if mode == "gene expression":
    gene = gene_choice()
    x = data.dense(emb.cells)[:, genes.index(gene)].astype(float)
    if data.is_counts:
        x = np.log1p(1e4 * x / np.maximum(data.library[emb.cells], 1.0))
    what = "log1p normalised expression" if data.is_counts else "expression"
    fig = plots.umap_values(emb.coords, x, hover=labels, value_label=gene, title=f"{gene} ({what}) · {title}")
elif mode == "predicted effect":
    gene = gene_choice()
    conds = tuple(sorted(set(labels)))
    pe = S.guarded(lambda: S.predicted_effects(ctx.model_key, bundle, conds, tuple(data.perturbations), data.is_counts))
    if pe is None:
        st.stop()
    v = pe[gene].reindex(labels).to_numpy(dtype=float) if gene in pe.columns else pe.iloc[:, genes.index(gene)].reindex(labels).to_numpy(dtype=float)
    if np.isnan(v).any():
        st.caption(f"{int(np.isnan(v).sum()):,} cells belong to conditions this model cannot predict (shown at 0).")
    fig = plots.umap_values(emb.coords, np.nan_to_num(v), hover=labels, value_label=f"{gene} log2 FC", diverging=True,
                            title=f"Predicted effect on {gene} of each cell's condition · {title}")
elif mode == "highlight a perturbation":
    conds = sorted({lab for lab in labels if lab != "control"})
    pert = S.widget(st.selectbox, "Perturbation", "latent_highlight", conds[0] if conds else "control", conds or ["control"])
    fig = plots.umap_highlight(emb.coords, labels == pert, pert, hover=labels, title=f"{pert} · {title}")
elif mode == "perturbation cluster":
    has_masks = bundle.mask_probabilities() is not None
    n_rows = len(bundle.mask_rows)
    d1, d2 = st.columns(2)
    by = S.widget(d1.radio, "Cluster perturbations by", "latent_cluster_by", "shift", ["shift", "mask"] if has_masks else ["shift"],
                  horizontal=True, format_func={"shift": "latent shift", "mask": "mask overlap"}.get)
    k = S.widget(d2.slider, "Clusters", "latent_cluster_k", max(1, min(n_rows, 20, round((n_rows / 2) ** 0.5))),
                 min_value=1, max_value=max(2, min(n_rows, 28)))
    pm = S.guarded(lambda: S.perturbation_map(ctx.model_key, bundle, by, int(k)))
    if pm is None:
        st.stop()
    groups = condition_clusters(labels, pm)
    st.caption(f"Each cell coloured by the cluster of its condition among the model's {n_rows:,} perturbations, "
               f"clustered by their learned {'latent shifts' if by == 'shift' else 'masks'} (the same clusters as the "
               "perturbation map on Differential expression); pairs whose members fall in different clusters share one colour.")
    fig = plots.umap_scatter(emb.coords, groups, hover=labels, color_label="perturbation cluster", title=title)
elif mode == "unit value":
    unit = S.widget(st.selectbox, "Unit", "latent_unit", 0, list(range(K)), format_func=lambda k: f"unit {k}")
    z = cell_latents(bundle, data, emb.cells, latent)
    fig = plots.umap_scatter(emb.coords, z[:, unit], hover=labels, color_label=f"unit {unit}", continuous=True, title=title)
elif mode == "targeted by":
    pert = S.widget(st.selectbox, "Perturbation", "latent_pert", bundle.perturbations[0], bundle.perturbations)
    p = bundle.mask_probabilities()
    targets = []
    if p is not None and pert in bundle.mask_rows:
        targets = [k for k in range(K) if float(p[bundle.mask_rows.index(pert), k]) >= 0.5]
    got = np.array([pert in split_label(lab) for lab in labels])
    st.caption(f"Units {pert} targets (P ≥ 0.5): {', '.join(f'unit {k}' for k in targets) or 'none / no masks'}")
    fig = plots.umap_scatter(emb.coords, np.where(got, f"received {pert}", "other cells"), hover=labels, color_label="cells", title=title)
elif mode.startswith("covariate: "):
    col = mode.split(": ", 1)[1]
    fig = plots.umap_scatter(emb.coords, data.obs[col].to_numpy()[emb.cells], hover=labels, color_label=col, title=title)
else:
    n_conditions = len(set(labels))
    groups = labels
    if n_conditions > 30:
        find = S.widget(st.text_input, "Colour the perturbations matching (part of a name)", "latent_find", "",
                        help="Up to 29 matching conditions get colours (most cells first); the others are grey.")
        groups = plots.colour_groups(labels, find, 30)
        n_col = len(set(groups) - {"other"})
        st.caption(f"{n_conditions:,} conditions among these cells: {n_col} coloured "
                   + (f"(matching {find!r})" if find.strip() else "(most cells)")
                   + ", the others grey. Search above, or choose 'highlight a perturbation' to find one.")
    fig = plots.umap_scatter(emb.coords, groups, hover=labels, color_label="perturbation" if groups is labels else "coloured", title=title)
fig.update_layout(dragmode="lasso")

event = S.chart(fig, f"umap_{latent}", "latent_umap", select=True)
points = list(event.selection.get("points", [])) if event is not None else []
picked = plots.selected_cells(emb.coords, points)
st.subheader("Selected cells")
if picked.size == 0:
    st.caption("Draw a box or a lasso on the UMAP (toolbar, top right) to see the composition of the cells inside it.")
else:
    groups = {"perturbation": labels, **{c: data.obs[c].to_numpy()[emb.cells] for c in covs}}
    comp = plots.composition_table(groups, picked)
    st.caption(f"{picked.size:,} of {len(emb.cells):,} cells selected: share of the selection per value (blue) "
               "beside the share among all cells shown (grey).")
    S.chart(plots.composition_bars(comp, f"Composition of {picked.size:,} selected cells"), "selection_composition", "latent_comp")
    S.show_table(comp, "selection_composition", "latent_comp_table")

tab = pd.DataFrame({"cell": np.asarray(data.obs.index)[emb.cells] if data.obs is not None else emb.cells,
                    "perturbation": labels, "umap1": emb.coords[:, 0], "umap2": emb.coords[:, 1]})
with st.expander("Coordinates"):
    S.show_table(tab, f"umap_{latent}_coordinates", "latent_coords", height=250)
