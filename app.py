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

ctx = S.sidebar()
if ctx is None:
    st.stop()

data, bundle = ctx.data, ctx.bundle
combos = data.combinations()
n_ctrl = int(data.control_mask.sum())
st.subheader(f"{ctx.data_label} · {bundle.label}")
c = st.columns(6)
c[0].metric("Cells", f"{data.n_cells:,}")
c[1].metric("Genes", f"{data.n_genes:,}")
c[2].metric("Perturbations", data.n_perturbations)
c[3].metric("Combinations", len(combos))
c[4].metric("Control cells", f"{n_ctrl:,}")
c[5].metric("Model family", bundle.family)

left, right = st.columns([3, 2])
with left:
    if bundle.history:
        S.chart(plots.history_figure(bundle.history, f"Training loss · {bundle.label}"), "training_loss", "home_history")
    else:
        st.info("This bundle records no training history.")
with right:
    st.markdown("**Held-out metrics** (from the bundle)")
    if bundle.metrics:
        m = pd.DataFrame(bundle.metrics).T
        m.index.name = "split"
        S.show_table(m.reset_index(), "metrics", "home_metrics")
    else:
        st.info("This bundle records no metrics.")
    spec = bundle.split_spec
    if spec:
        st.markdown(
            f"**Split**: {spec.get('kind')} (fraction {spec.get('fraction')}, seed {spec.get('seed')}); "
            f"held out: {', '.join(spec.get('test_conditions', [])[:12]) or '—'}"
        )
    hp = bundle.manifest.get("hparams", {})
    with st.expander("Hyper-parameters"):
        st.json(hp)
    if ctx.truth is not None:
        st.success("Simulated data: the answer key (`uns['sams_truth']`) is shown beside the model where it applies.")

st.markdown(
    "**Pages** — *Masks*: which units each perturbation targets · *Latent space*: UMAP of cells · "
    "*Gene programs*: genes and gene sets of each unit · *Compose*: predict any combination · "
    "*Compare*: all models on the held-out split · *Train*: fit a new model."
)
