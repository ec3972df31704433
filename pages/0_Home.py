"""Home: the chosen screen at a glance, and the chosen model's training history and metrics."""

from __future__ import annotations

import streamlit as st

import sams_core
from explorer import state as S
from sams_core import plots
from sams_core.evaluation.glossary import metric_help
from sams_core.io.manifest import csv_text, markdown_table, metrics_table, model_label
from sams_core.models.registry import label as family_label

st.title("SAMS Explorer")
st.caption(f"sams_core {sams_core.__version__}")
st.write(
    "Sparse-mechanism-shift models of single-cell perturbation screens: which few latent processes "
    "each perturbation moves, and what unmeasured combinations would do. Choose a dataset and a model "
    "in the sidebar, then open a page. Two screens ship with the app: a real one (Norman 2019 K562 "
    "CRISPRa with McFaline-Figueroa 2023 glioma lines, cell type as a covariate) and a simulated one "
    "whose answer key (true masks and effects) the pages show beside the model."
)

sel = S.selection()
if sel.data_src is None:
    st.info(sel.problem)
    st.stop()


def screen_counts(note: str | None = None) -> None:
    """The screen's counts as the sidebar's data settings read it (cached on disk for the detected
    settings): the home page never waits for PyTorch. Pages that use the model load it and check
    that it fits the data."""
    counts = S.screen_counts(sel)
    if counts is None:
        st.stop()
    if note:
        st.caption(note)
    c = st.columns(5)
    c[0].metric("Cells", f"{counts.cells:,}")
    c[1].metric("Genes", f"{counts.genes:,}")
    c[2].metric("Perturbations", counts.perturbations)
    c[3].metric("Combinations", counts.combinations)
    c[4].metric("Control cells", f"{counts.control_cells:,}")
    if counts.simulated:
        st.success("Simulated data: the answer key (`uns['sams_truth']`) is shown beside the model where it applies.")


def data_settings() -> None:
    """The data settings the screen is read with (edit them in the sidebar), its covariates and
    conditions."""
    ds = sel.settings
    if ds is None:
        return
    obs = S.guarded(lambda: S.screen_obs(sel.data_src))
    if obs is None:
        return
    covs = ", ".join(f"{c} ({obs[c].nunique()} levels)" for c in ds.covariates) or "none"
    lik = {"auto": "auto (negative binomial for counts, Gaussian otherwise)"}.get(ds.likelihood, ds.likelihood)
    st.markdown(
        f"**Data settings** (edit in the sidebar) — perturbation column `{ds.perturbation_key}` · "
        f"separator {' '.join(f'`{x}`' for x in ds.separators)} · control labels "
        f"{', '.join(f'`{c}`' for c in ds.control_labels) or 'none found: choose them in the sidebar'} · "
        f"likelihood {lik} · covariates {covs} · screen hash `{S.screen_hash(sel.data_src)}`"
    )
    st.code(f"python -m sams_core train --data {sel.data_label if sel.data_src[1] is None else 'SCREEN.h5ad'} "
            f"{ds.cli_flags()} --out MODEL.sams", language="bash", wrap_lines=True)
    with st.expander("Perturbations and combinations"):
        S.show_table(S.condition_table(obs, ds), "conditions", "home_conditions", height=300)


manifest = sel.manifest()
if manifest is None:
    st.subheader(sel.data_label)
    screen_counts()
    data_settings()
    if sel.model_name is None:
        st.info(S.NO_MODEL)
        st.page_link("pages/6_Train.py", label="Train a model on this screen", icon=":material/model_training:")
    st.stop()

label = model_label(manifest)
st.subheader(f"{sel.data_label} · {label}")
if note := S.family_note(sel):
    st.info(note, icon=":material/info:")
summary = st.container()  # filled last: what the bundle's manifest holds is drawn first
left, right = st.columns([3, 2])
training = manifest.get("training", {})
history = training.get("history", [])
with left:
    if history:
        S.chart(plots.history_figure(history, f"Training loss · {label}", kept_epoch=training.get("best_epoch")),
                "training_loss", "home_history")
        for note in training.get("notes") or []:
            st.caption(note)
    else:
        st.info("This bundle records no training history.")
with right:
    st.markdown("**Held-out metrics** (from the bundle)")
    metrics = metrics_table(manifest)
    if len(metrics) > 1:
        # a Markdown table: no pandas and no data-grid component before the page is drawn
        st.markdown(markdown_table(metrics))
        with st.expander("What the metrics mean"):
            st.markdown("\n".join(f"- **{row[0]}**: {metric_help(row[0])}" for row in metrics[1:] if metric_help(row[0])))
        st.download_button("CSV", data=lambda: csv_text(metrics_table(manifest, digits=None)), file_name=f"{S.download_name('metrics')}.csv",
                           mime="text/csv", key="csv_home_metrics", on_click="ignore", icon=":material/download:")
    else:
        st.info("This bundle records no metrics.")
    spec = manifest.get("split", {})
    if spec:
        st.markdown(
            f"**Split**: {spec.get('kind')} (fraction {spec.get('fraction')}, seed {spec.get('seed')}); "
            f"held out: {', '.join(spec.get('test_conditions', [])[:12]) or '—'}"
        )
    S.export_button(sel, "home")
    with st.expander("Hyper-parameters"):
        hparams = manifest.get("hparams") or {}
        st.markdown(markdown_table([["hyper-parameter", "value"], *([k, str(v)] for k, v in hparams.items())]))

with summary:
    hp = manifest.get("hparams") or {}
    screen_counts(f"Model family: {family_label(manifest.get('family', '?'))} · "
                  f"{hp.get('n_latent', '?')} latent units · {hp.get('likelihood', '?')} likelihood · "
                  f"trained on {manifest.get('data', {}).get('n_cells', '?')} cells")

data_settings()
st.markdown(
    "**Pages** — *Masks*: which units each perturbation targets · *Latent space*: UMAP of cells · "
    "*Gene programs*: genes and gene sets of each unit · *Compose*: predict any combination · "
    "*Compare*: all models on the held-out split · *Train*: fit a new model · "
    "*Differential expression*: observed volcano per perturbation and a map of perturbations by latent shift."
)
