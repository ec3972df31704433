"""Gene programs: the genes each latent unit drives and the gene sets they belong to."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from explorer import state as S
from sams_core import plots
from sams_core.interpret.genesets import load_shipped, read_gmt, shipped_collections
from sams_core.interpret.programs import program_collection, top_genes

ctx = S.page("Gene programs")
data, bundle = ctx.data, ctx.bundle
K = bundle.model.n_latent
L = S.guarded(lambda: S.loadings(ctx.model_key, ctx.data_key, bundle, data))
if L is None:
    st.stop()

options = []
if ctx.truth is not None and ctx.truth.program_sets:
    options.append("simulated programs")
options += list(shipped_collections())
options.append("upload GMT")
c1, c2, c3 = st.columns([1, 2, 1])
unit = S.widget(c1.selectbox, "Unit", "gp_unit", 0, list(range(K)), format_func=lambda k: f"unit {k}")
coll_name = S.widget(c2.selectbox, "Gene-set collection", "gp_collection", options[0], options,
                     format_func=lambda s: {"go_bp": "GO biological process", "go_mf": "GO molecular function",
                                            "go_cc": "GO cellular component"}.get(s, s))
n_top = S.widget(c3.slider, "Top genes", "gp_ntop", 15, min_value=5, max_value=50, step=5)

collection, ckey = None, coll_name
if coll_name == "simulated programs":
    collection = S.guarded(lambda: program_collection(ctx.adata))
elif coll_name == "upload GMT":
    up = st.file_uploader("Gene sets (.gmt or .gmt.gz)", key="gp_gmt")
    if up is not None:
        collection = S.guarded(lambda: read_gmt(up.getvalue(), name=up.name))
        ckey = f"upload:{up.name}:{hash(up.getvalue())}"
    else:
        st.info("Upload a GMT file: one gene set per line, name<TAB>description<TAB>genes…")
else:
    collection = S.guarded(lambda: load_shipped(coll_name))

left, right = st.columns(2)
with left:
    tg = top_genes(L, int(unit), n_top)
    fig = plots.top_genes_bar(tg.drop_duplicates("gene"), n=n_top, value="loading",
                              title=f"The {n_top} genes unit {unit} drives most", axis_title="loading (log2 change of expression per SD of the unit)")
    S.chart(fig, f"unit{unit}_top_genes", "gp_top")
    S.show_table(tg, f"unit{unit}_top_genes", "gp_top_table", height=250)
with right:
    p = bundle.mask_probabilities()
    st.markdown(f"**Perturbations that target unit {unit}**")
    if p is not None:
        col = p[:, int(unit)]
        t = pd.DataFrame({"perturbation": bundle.mask_rows, "mask probability": col}).sort_values("mask probability", ascending=False)
        emb = bundle.embedding_means()
        if emb is not None:
            t["embedding"] = emb[[bundle.mask_rows.index(r) for r in t["perturbation"]], int(unit)]
        t = t[t["mask probability"] >= 0.5]
        if t.empty:
            st.caption("No perturbation targets this unit with probability ≥ 0.5.")
        else:
            S.show_table(t, f"unit{unit}_targeted_by", "gp_targets")
    else:
        st.caption(f"{bundle.label} has no masks.")

if collection is not None and collection.coverage(data.genes) == 0.0:  # a property of the screen's gene ids, not a failure
    shown = ", ".join(list(data.genes)[:3])
    st.warning(f"None of the screen's {data.n_genes:,} genes (e.g. {shown}) is in the collection {coll_name!r}: "
               "the shipped GO sets use human gene symbols (e.g. TP53). Convert Ensembl or other ids to symbols, "
               "or upload gene sets that use your ids (\"upload GMT\"). The unit's top genes above need no gene sets.")
    collection = None
if collection is not None:
    enr = S.guarded(lambda: S.enrichment(ctx.model_key, ctx.data_key, ckey, L, collection))
    if enr is not None and not enr.empty:
        st.subheader(f"Enrichment · {coll_name}")
        S.chart(plots.enrichment_heatmap(enr), f"enrichment_{coll_name}", "gp_heat")
        st.markdown(f"**Unit {unit}**: gene sets ranked by q (rank-sum test of its loadings)")
        S.show_table(enr[enr["unit"] == int(unit)].sort_values("q").head(50), f"unit{unit}_enrichment_{coll_name}", "gp_enr")
    elif enr is not None:
        st.info("No gene set of this collection has enough of the model's genes.")
