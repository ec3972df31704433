"""Latent space: UMAP of cells' latents coloured by perturbation, a unit, mask targets or covariates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from explorer import state as S
from sams_core import plots
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
covs = [c for c in data.obs.columns if c not in ("perturbation",) and data.obs[c].nunique() <= 50] if data.obs is not None else []
modes = ["perturbation", "unit value", "targeted by"] + [f"covariate: {c}" for c in covs]
mode = S.widget(c3.selectbox, "Colour by", "latent_color", "perturbation", modes)

bar = st.progress(0.0, text="Preparing…")


def progress(msg: str, frac: float) -> None:
    bar.progress(float(frac), text=msg)


emb = S.guarded(lambda: S.embedding(ctx.model_key, ctx.data_key, bundle, data, latent, int(max_cells), progress))
if emb is None:
    st.stop()
bar.progress(1.0, text=f"UMAP of {len(emb.cells):,} cells ({latent} latent)" + (" — from cache" if emb.from_cache else ""))
labels = data.labels[emb.cells].astype(str)

if mode == "perturbation":
    color, cont, clabel = labels, False, "perturbation"
elif mode == "unit value":
    unit = S.widget(st.selectbox, "Unit", "latent_unit", 0, list(range(K)), format_func=lambda k: f"unit {k}")
    z = cell_latents(bundle, data, emb.cells, latent)
    color, cont, clabel = z[:, unit], True, f"unit {unit}"
elif mode == "targeted by":
    pert = S.widget(st.selectbox, "Perturbation", "latent_pert", bundle.perturbations[0], bundle.perturbations)
    p = bundle.mask_probabilities()
    targets = []
    if p is not None and pert in bundle.mask_rows:
        targets = [k for k in range(K) if float(p[bundle.mask_rows.index(pert), k]) >= 0.5]
    got = np.array([pert in split_label(lab) for lab in labels])
    color = np.where(got, f"received {pert}", "other cells")
    cont, clabel = False, "cells"
    st.caption(f"Units {pert} targets (P ≥ 0.5): {', '.join(f'unit {k}' for k in targets) or 'none / no masks'}")
else:
    col = mode.split(": ", 1)[1]
    color, cont, clabel = data.obs[col].to_numpy()[emb.cells], False, col

fig = plots.umap_scatter(emb.coords, color, hover=labels, color_label=clabel, continuous=cont,
                         title=f"UMAP of {latent} latents · {bundle.label}")
S.chart(fig, f"umap_{latent}", "latent_umap")
tab = pd.DataFrame({"cell": np.asarray(data.obs.index)[emb.cells] if data.obs is not None else emb.cells,
                    "perturbation": labels, "umap1": emb.coords[:, 0], "umap2": emb.coords[:, 1]})
with st.expander("Coordinates"):
    S.show_table(tab, f"umap_{latent}_coordinates", "latent_coords", height=250)
