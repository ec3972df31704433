"""SAMS Explorer: the dashboard's front door (``streamlit run app.py``)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

import sams_core
from sams_core import app_state as S
from sams_core import plots

st.set_page_config(page_title="SAMS Explorer", layout="wide")
st.title("SAMS Explorer")
st.caption(f"sams_core {sams_core.__version__}")
st.write(
    "Sparse-mechanism-shift models of single-cell perturbation screens: which few latent processes "
    "each perturbation moves, and what unmeasured combinations would do. Choose a dataset and a model "
    "in the sidebar (the shipped demo is a simulated screen with its answer key), then open a page."
)

sel = S.choose()
manifest = sel.manifest() if sel is not None else None
if manifest is None:
    st.stop()

# What the bundle's manifest holds is shown first; the screen and the model itself (PyTorch,
# AnnData) load after, so the first chart does not wait for them.
from sams_core.manifest import model_label  # noqa: E402

label = model_label(manifest)
st.subheader(f"{sel.data_label} · {label}")
summary = st.container()
left, right = st.columns([3, 2])
history = manifest.get("training", {}).get("history", [])
with left:
    if history:
        S.chart(plots.history_figure(history, f"Training loss · {label}"), "training_loss", "home_history")
    else:
        st.info("This bundle records no training history.")
with right:
    st.markdown("**Held-out metrics** (from the bundle)")
    metrics = manifest.get("metrics", {})
    if metrics:
        m = pd.DataFrame(metrics).T
        m.index.name = "split"
        S.show_table(m.reset_index(), "metrics", "home_metrics")
    else:
        st.info("This bundle records no metrics.")
    spec = manifest.get("split", {})
    if spec:
        st.markdown(
            f"**Split**: {spec.get('kind')} (fraction {spec.get('fraction')}, seed {spec.get('seed')}); "
            f"held out: {', '.join(spec.get('test_conditions', [])[:12]) or '—'}"
        )
    with st.expander("Hyper-parameters"):
        st.json(manifest.get("hparams", {}))

with summary:
    ctx = S.load(sel)
    if ctx is None:
        st.stop()
    data, bundle = ctx.data, ctx.bundle
    c = st.columns(6)
    c[0].metric("Cells", f"{data.n_cells:,}")
    c[1].metric("Genes", f"{data.n_genes:,}")
    c[2].metric("Perturbations", data.n_perturbations)
    c[3].metric("Combinations", len(data.combinations()))
    c[4].metric("Control cells", f"{int(data.control_mask.sum()):,}")
    c[5].metric("Model family", bundle.family)
    if ctx.truth is not None:
        st.success("Simulated data: the answer key (`uns['sams_truth']`) is shown beside the model where it applies.")

st.markdown(
    "**Pages** — *Masks*: which units each perturbation targets · *Latent space*: UMAP of cells · "
    "*Gene programs*: genes and gene sets of each unit · *Compose*: predict any combination · "
    "*Compare*: all models on the held-out split · *Train*: fit a new model."
)
