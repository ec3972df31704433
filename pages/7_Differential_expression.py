"""Differential expression: what the data says for each perturbation against its controls
(scanpy's rank_genes_groups, no model needed), and a map of perturbations by the latent shift
the chosen model learned for them, clustered; a point opens that perturbation on Masks or Compose."""

from __future__ import annotations

import streamlit as st

from explorer import state as S
from sams_core import plots
from sams_core.evaluation.glossary import metric_help

sel = S.page("Differential expression", needs_model=False)
data = S.screen_data(sel)
if data is None:
    st.stop()
data_key = f"{sel.data_src[0]}:{sel.settings.key if sel.settings else ''}"

st.subheader("Observed differential expression")
conds = sorted({str(x) for x in data.labels} - {"control"}, key=lambda c: (c.count("+"), c))
c1, c2, c3 = st.columns([2, 1, 1])
cond = S.widget(c1.selectbox, "Perturbation (against the control cells)", "de_cond", conds[0], conds,
                help="every measured condition, singles first; type to search")
method = S.widget(c2.selectbox, "Test", "de_method", "wilcoxon", ["wilcoxon", "t-test", "t-test_overestim_var", "logreg"],
                  help="scanpy rank_genes_groups method (Wilcoxon rank-sum is scanpy's recommended default)")
alpha = S.widget(c3.select_slider, "Adjusted p below", "de_alpha", 0.05, [0.001, 0.01, 0.05, 0.1])
de = S.guarded(lambda: S.observed_de(data_key, data, cond, method))
if de is None:
    st.stop()
n_cells = de.attrs.get("n_cells", int((data.labels == cond).sum()))
n_ctrl = de.attrs.get("n_controls", int(data.control_mask.sum()))
n_sig = int((de["pval_adj"] < alpha).sum())
st.caption(f"{cond}: {n_cells:,} cells against {n_ctrl:,} {de.attrs.get('controls', 'control cells')} · "
           f"{n_sig:,} of {len(de):,} genes with adjusted p < {alpha:g}. " + metric_help("pvals_adj"))
left, right = st.columns([3, 2])
with left:
    S.chart(plots.de_volcano(de, f"Observed DE · {cond} vs control ({method})", alpha=alpha), f"de_volcano_{cond}", "de_volcano")
with right:
    S.show_table(de, f"de_{cond}", "de_table", height=430)

st.subheader("Perturbation similarity map")
if sel.model_name is None:
    st.info("The map places perturbations by the latent shifts a model learned: " + S.NO_MODEL)
    st.stop()
ctx = S.load(sel)
if ctx is None:
    st.stop()
bundle = ctx.bundle
has_masks = bundle.mask_probabilities() is not None
c1, c2 = st.columns(2)
by = S.widget(c1.radio, "Distance", "map_by", "shift", ["shift", "mask"] if has_masks else ["shift"], horizontal=True,
              format_func={"shift": "latent shift (Euclidean)", "mask": "mask overlap (Jaccard-like)"}.get)
n_rows = len(bundle.mask_rows)
k = S.widget(c2.slider, "Clusters", "map_k", max(1, min(n_rows, round((n_rows / 2) ** 0.5))), min_value=1, max_value=max(2, n_rows))
pm = S.guarded(lambda: S.perturbation_map(ctx.model_key, bundle, by, int(k)))
if pm is None:
    st.stop()
st.caption("Perturbations placed so that distances on the map follow the distances between their learned "
           f"{'latent shifts' if by == 'shift' else 'masks'} (classical MDS), coloured by hierarchical cluster. "
           "Click a point to open it on Masks or Compose.")
event = S.chart(plots.perturbation_map(pm, f"Perturbation map · {bundle.label}"), f"perturbation_map_{by}", "de_map", select=True)
points = list(event.selection.get("points", [])) if event is not None else []
picked = [str(p.get("customdata")) for p in points if p.get("customdata") is not None]
picked = [p[0] if isinstance(p, (list, tuple)) else p for p in picked]
if picked:
    name = picked[0]
    st.markdown(f"**{name}** · cluster {int(pm.loc[pm.perturbation == name, 'cluster'].iloc[0]) if (pm.perturbation == name).any() else '?'}")
    b1, b2 = st.columns(2)
    if b1.button(f"Open {name} on Masks", key="map_to_masks"):
        S.open_page("pages/1_Masks.py", masks_pert=name, masks_filter="")
    if b2.button(f"Open {name} on Compose", key="map_to_compose"):
        S.open_page("pages/4_Compose.py", compose_members=name.split("+"))
with st.expander("Clusters"):
    S.show_table(pm, f"perturbation_map_{by}", "de_map_table", height=250)
