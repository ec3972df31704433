"""Figures of the dashboard as pure functions: data in, Plotly figure out (no Streamlit).

Every function returns a ``plotly.graph_objects.Figure``; :func:`figure_bytes` exports one as
PNG / SVG / PDF (kaleido, a local Chromium) or a self-contained offline HTML page. Importing
this module makes ``plotly_white`` Plotly's default template.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from sams_core.errors import SamsError

if TYPE_CHECKING:  # pandas and plotly.express load where a figure needs them (faster first page)
    import pandas as pd

TEMPLATE = "plotly_white"
FORMATS = ("png", "svg", "pdf", "html")
MIME = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf", "html": "text/html"}

# Every figure gets the template when it is created (Plotly's default template, applied without
# re-validating it); setting it per figure would cost ~10 ms each, a third of a page's re-run.
pio.templates.default = TEMPLATE


def _layout(fig: go.Figure, title: str | None = None, height: int | None = None) -> go.Figure:
    fig.update_layout(title=title, margin=dict(l=10, r=10, t=50 if title else 20, b=10),
                      **({"height": height} if height else {}))
    return fig


def _orders(values: np.ndarray, cluster: bool) -> tuple[np.ndarray, np.ndarray]:
    if not cluster or values.shape[0] == 0 or values.shape[1] == 0:
        return np.arange(values.shape[0]), np.arange(values.shape[1])

    return heatmap_orders(values)


def matrix_heatmap(
    values: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    title: str | None = None,
    colorscale: str = "Blues",
    zmin: float | None = None,
    zmax: float | None = None,
    zmid: float | None = None,
    colorbar: str = "",
    row_order: np.ndarray | None = None,
    col_order: np.ndarray | None = None,
    highlight: str | None = None,
) -> go.Figure:
    """A labelled heatmap of ``values`` [rows × cols] in the given row/column orders."""
    v = np.asarray(values, dtype=float)
    ro = np.arange(v.shape[0]) if row_order is None else np.asarray(row_order)
    co = np.arange(v.shape[1]) if col_order is None else np.asarray(col_order)
    r = [str(rows[i]) for i in ro]
    c = [str(cols[j]) for j in co]
    fig = go.Figure(go.Heatmap(
        z=v[np.ix_(ro, co)], x=c, y=r, colorscale=colorscale, zmin=zmin, zmax=zmax, zmid=zmid,
        colorbar=dict(title=colorbar), hovertemplate="%{y} · %{x}<br>%{z:.3f}<extra></extra>",
    ))
    many = len(r) > TALL_HEATMAP  # thousands of rows: one screen-high chart, names on hover, zoom in with a box
    fig.update_yaxes(autorange="reversed", type="category", showticklabels=not many)
    fig.update_xaxes(type="category", side="bottom")
    if highlight is not None and highlight in r:
        fig.add_shape(type="rect", xref="paper", x0=0, x1=1, yref="y", y0=r.index(highlight) - 0.5,
                      y1=r.index(highlight) + 0.5, line=dict(color="crimson", width=2))
    if many:
        fig.update_layout(dragmode="zoom")
    return _layout(fig, title, height=900 if many else max(300, 22 * len(r) + 120))


#: Above this many rows a heatmap is drawn screen-high with row names on hover (zoom to read them).
TALL_HEATMAP = 120
#: Rows a perturbation heatmap shows unless the whole matrix is asked for.
HEATMAP_ROWS = 60
#: What the rows of a mask / embedding heatmap can be ranked by (:func:`row_scores`).
ROW_STATISTICS = ("targeted units", "largest mask probability", "shift size")


def row_scores(statistic: str, probs: np.ndarray | None = None, embeddings: np.ndarray | None = None,
               threshold: float = 0.5) -> np.ndarray:
    """One number per perturbation (row) to rank heatmap rows by: ``"targeted units"`` (units
    with mask probability ≥ ``threshold``, ties broken by the summed probability), ``"largest
    mask probability"``, or ``"shift size"`` (norm of the expected shift, mask probability ×
    embedding; the embedding alone for models without masks)."""
    if statistic not in ROW_STATISTICS:
        raise SamsError(f"Unknown statistic {statistic!r}: use one of {', '.join(ROW_STATISTICS)}.")
    if statistic != "shift size" and probs is None:
        raise SamsError(f"{statistic!r} needs mask probabilities; rank a model without masks by 'shift size'.")
    if statistic == "targeted units":
        p = np.asarray(probs, dtype=float)
        return (p >= threshold).sum(1) + p.sum(1) / (p.shape[1] + 1)
    if statistic == "largest mask probability":
        return np.asarray(probs, dtype=float).max(1)
    if embeddings is None:
        raise SamsError("'shift size' needs the model's embeddings.")
    e = np.asarray(embeddings, dtype=float)
    return np.linalg.norm(e * np.asarray(probs, dtype=float) if probs is not None else e, axis=1)


def heatmap_rows(names: Sequence[str], scores: np.ndarray, query: str = "", top: int | None = HEATMAP_ROWS) -> np.ndarray:
    """Positions of the rows a heatmap shows: the rows whose name contains ``query`` (a
    case-insensitive substring; all when empty), the ``top`` of them by ``scores`` (highest first;
    None: every matching row, in the list's order)."""
    q = query.strip().lower()
    keep = np.array([i for i, n in enumerate(names) if q in str(n).lower()], dtype=np.int64) if q else np.arange(len(names))
    if top is None or keep.size <= top:
        return keep if top is None else keep[np.argsort(-np.asarray(scores, dtype=float)[keep], kind="stable")]
    sc = np.asarray(scores, dtype=float)[keep]
    return keep[np.argsort(-sc, kind="stable")[:top]]


def mask_heatmap(
    probs: np.ndarray,
    rows: Sequence[str],
    units: Sequence[str] | None = None,
    threshold: float | None = None,
    cluster: bool = True,
    title: str = "Mask probabilities",
    highlight: str | None = None,
    orders: tuple[np.ndarray, np.ndarray] | None = None,
) -> go.Figure:
    """Perturbations × units mask probabilities; with ``threshold`` entries below it show as 0."""
    p = np.asarray(probs, dtype=float)
    units = list(units) if units is not None else [f"unit {k}" for k in range(p.shape[1])]
    ro, co = orders if orders is not None else _orders(p, cluster)
    shown = np.where(p >= threshold, p, 0.0) if threshold is not None else p
    t = title + (f" (≥ {threshold:g})" if threshold is not None else "")
    return matrix_heatmap(shown, rows, units, t, "Blues", 0.0, 1.0, None, "P(mask)", ro, co, highlight)


def embedding_heatmap(
    values: np.ndarray,
    rows: Sequence[str],
    units: Sequence[str] | None = None,
    title: str = "Embedding (latent shift per unit)",
    orders: tuple[np.ndarray, np.ndarray] | None = None,
    highlight: str | None = None,
) -> go.Figure:
    """Perturbations × units embedding values (diverging colours around 0)."""
    v = np.asarray(values, dtype=float)
    units = list(units) if units is not None else [f"unit {k}" for k in range(v.shape[1])]
    ro, co = orders if orders is not None else _orders(v, True)
    m = float(np.nanmax(np.abs(v))) if v.size else 1.0
    return matrix_heatmap(v, rows, units, title, "RdBu_r", -m, m, 0.0, "shift", ro, co, highlight)


def _number(v) -> float:
    """A loss value as a float (NaN when missing)."""
    try:
        return float(v) if v is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def history_figure(
    history: Sequence[dict] | pd.DataFrame, title: str = "Training loss", kept_epoch: int | None = None
) -> go.Figure:
    """The untempered −ELBO per cell, train and validation, per epoch (a training history as
    records or a table), with the training schedule's phases and the kept state marked.

    The training curve is the ``term_neg_elbo`` column (the paper's −ELBO, whatever prior weight
    the schedule trained with) where the history has it, else ``train_loss``; a dotted line marks
    each change of ``phase`` ("warmup" → "sparsify" → "final") and a star the ``kept_epoch``.
    """
    records = history.to_dict("records") if hasattr(history, "to_dict") else list(history)
    fig = go.Figure()
    if records and all("epoch" in r for r in records):
        epochs = [r["epoch"] for r in records]
        has_elbo = any(np.isfinite(_number(r.get("term_neg_elbo"))) for r in records)
        train_col = "term_neg_elbo" if has_elbo else "train_loss"
        curves = {}
        for col, name in ((train_col, "train"), ("val_loss", "validation")):
            values = np.array([_number(r.get(col)) for r in records], dtype=float)
            if np.isfinite(values).any():
                curves[name] = values
                fig.add_trace(go.Scatter(x=epochs, y=values, mode="lines+markers", name=name, marker=dict(size=4)))
        phases = [r.get("phase") for r in records]
        for i in range(1, len(records)):
            if phases[i] and phases[i - 1] and phases[i] != phases[i - 1]:
                fig.add_vline(x=epochs[i - 1] + 0.5, line_dash="dot", line_color="grey",
                              annotation_text=str(phases[i]), annotation_position="top")
        if kept_epoch is not None and kept_epoch in epochs and curves:
            values = curves.get("validation", curves.get("train"))
            y = values[epochs.index(kept_epoch)]
            if np.isfinite(y):
                fig.add_trace(go.Scatter(x=[kept_epoch], y=[y], mode="markers", name="kept state",
                                         marker={"symbol": "star", "size": 12}))
    fig.update_xaxes(title="epoch")
    fig.update_yaxes(title="−ELBO per cell (untempered)")
    return _layout(fig, title, height=320)


def umap_scatter(
    coords: np.ndarray,
    color: Sequence | np.ndarray,
    hover: Sequence[str] | None = None,
    color_label: str = "perturbation",
    continuous: bool = False,
    title: str = "UMAP of cell latents",
    max_categories: int = 30,
) -> go.Figure:
    """Cells in 2-D coloured by a category (perturbation, targeted, covariate) or a value."""
    import pandas as pd
    import plotly.express as px

    xy = np.asarray(coords, dtype=float)
    df = pd.DataFrame({"UMAP 1": xy[:, 0], "UMAP 2": xy[:, 1]})
    df[color_label] = np.asarray(color) if continuous else np.asarray(color).astype(str)
    df["perturbation"] = np.asarray(hover).astype(str) if hover is not None else df[color_label]
    if not continuous and df[color_label].nunique() > max_categories:
        df[color_label] = colour_groups(df[color_label].to_numpy(), "", max_categories)
    hover_data = {"perturbation": True, "UMAP 1": False, "UMAP 2": False}
    if color_label != "perturbation":
        hover_data[color_label] = True
    if continuous:
        fig = px.scatter(df, x="UMAP 1", y="UMAP 2", color=color_label, hover_data=hover_data,
                         color_continuous_scale="RdBu_r", color_continuous_midpoint=0.0)
    else:
        order = sorted(df[color_label].unique(), key=lambda s: (s in ("control", "other"), s))
        fig = px.scatter(df, x="UMAP 1", y="UMAP 2", color=color_label, hover_data=hover_data,
                         category_orders={color_label: order}, color_discrete_map={"other": "#d0d0d0"},
                         color_discrete_sequence=px.colors.qualitative.Dark24 + px.colors.qualitative.Light24)
    fig.update_traces(marker=dict(size=4, opacity=0.75))
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, scaleanchor="x", scaleratio=1)
    return _layout(fig, title, height=560)


def colour_groups(labels: Sequence[str] | np.ndarray, query: str = "", max_categories: int = 30) -> np.ndarray:
    """Each cell's colour group on a scatter of many conditions: its own label for at most
    ``max_categories - 1`` labels — those containing ``query`` (case-insensitive substring), or all
    when it is empty, the ones with most cells first — and ``"other"`` for the rest."""
    lab = np.asarray(labels).astype(str)
    names, counts = np.unique(lab, return_counts=True)
    q = query.strip().lower()
    ok = np.array([q in n.lower() for n in names], dtype=bool) if q else np.ones(names.size, bool)
    cand = np.flatnonzero(ok)
    chosen = names[cand[np.argsort(-counts[cand], kind="stable")[: max_categories - 1]]]
    return np.where(np.isin(lab, chosen), lab, "other")


def top_genes_bar(table: pd.DataFrame, n: int = 20, value: str = "effect", title: str | None = None,
                  axis_title: str | None = None) -> go.Figure:
    """The ``n`` genes with the largest |``value``| as bars, with interval error bars when the
    table has ``lower``/``upper`` columns (an :meth:`EffectPrediction.table`)."""
    t = table.reindex(table[value].abs().sort_values(ascending=False).index).head(n).iloc[::-1]
    err = None
    if {"lower", "upper"} <= set(t.columns):
        err = dict(type="data", symmetric=False, array=(t["upper"] - t[value]).to_numpy(),
                   arrayminus=(t[value] - t["lower"]).to_numpy(), color="#444", thickness=1)
    colors = np.where(t[value] >= 0, "#c0392b", "#2e86c1")
    fig = go.Figure(go.Bar(x=t[value], y=t["gene"], orientation="h", error_x=err, marker_color=colors,
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_xaxes(title=axis_title or (value if value != "effect" else "log2 fold change"), zeroline=True)
    fig.update_yaxes(type="category")
    return _layout(fig, title or f"Top {min(n, len(table))} genes", height=max(320, 20 * len(t) + 100))


def effect_volcano(table: pd.DataFrame, title: str | None = None, n_labels: int = 10) -> go.Figure:
    """Volcano-style: predicted effect (x) against the width of its interval (y, lower = surer);
    genes whose interval excludes 0 are highlighted."""
    width = (table["upper"] - table["lower"]).to_numpy(dtype=float)
    effect = table["effect"].to_numpy(dtype=float)
    genes = table["gene"].astype(str).to_numpy()
    sure = ((table["lower"] > 0) | (table["upper"] < 0)).to_numpy()
    custom = np.stack([table["lower"].to_numpy(dtype=float), table["upper"].to_numpy(dtype=float)], axis=1)
    traces = []
    for name, keep, colour in (("interval excludes 0", sure, "#c0392b"), ("interval covers 0", ~sure, "#aaaaaa")):
        traces.append(go.Scatter(
            x=effect[keep], y=width[keep], mode="markers", name=name, text=genes[keep], customdata=custom[keep],
            marker=dict(color=colour, size=7),
            hovertemplate="<b>%{text}</b><br>effect %{x:.3f}<br>interval %{customdata[0]:.3f} to %{customdata[1]:.3f}<extra></extra>",
        ))
    top = np.argsort(-np.abs(effect), kind="stable")[:n_labels]
    notes = [dict(x=float(effect[i]), y=float(width[i]), text=str(genes[i]), showarrow=False, yshift=9, font=dict(size=10))
             for i in top]
    fig = go.Figure(traces, layout=dict(
        annotations=notes, legend_title_text="",
        xaxis=dict(title="predicted log2 fold change"),
        yaxis=dict(autorange="reversed", title="interval width (lower = more certain)"),
    ))
    return _layout(fig, title or "Effect vs uncertainty", height=420)


def observed_vs_predicted(observed: np.ndarray, predicted: np.ndarray, genes: Sequence[str], title: str = "Observed vs predicted",
                          x_title: str = "observed log2 fold change") -> go.Figure:
    """Per-gene observed (or another reference, named by ``x_title``) against predicted effect,
    with Pearson r in the title."""
    o = np.asarray(observed, dtype=float)
    p = np.asarray(predicted, dtype=float)
    ok = np.isfinite(o) & np.isfinite(p)
    r = float(np.corrcoef(o[ok], p[ok])[0, 1]) if ok.sum() > 2 and o[ok].std() > 0 and p[ok].std() > 0 else float("nan")
    fig = go.Figure(go.Scatter(x=o, y=p, mode="markers", text=list(genes), marker=dict(size=6, opacity=0.7),
                               hovertemplate="%{text}<br>" + x_title + " %{x:.3f}<br>predicted %{y:.3f}<extra></extra>"))
    lo = float(np.nanmin(np.concatenate([o, p]))) if o.size else 0.0
    hi = float(np.nanmax(np.concatenate([o, p]))) if o.size else 1.0
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dash", color="grey"), showlegend=False, hoverinfo="skip"))
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(title="predicted log2 fold change")
    fig.update_layout(showlegend=False)
    return _layout(fig, f"{title} (r = {r:.3f})", height=420)


def latent_shift_bar(shift: np.ndarray, title: str = "Latent shift") -> go.Figure:
    """Expected latent shift per unit of a combination."""
    s = np.asarray(shift, dtype=float)
    fig = go.Figure(go.Bar(x=[f"unit {k}" for k in range(s.size)], y=s, marker_color=np.where(s >= 0, "#c0392b", "#2e86c1")))
    fig.update_yaxes(title="shift")
    fig.update_xaxes(type="category")
    return _layout(fig, title, height=300)


def enrichment_heatmap(table: pd.DataFrame, n_sets: int = 25, title: str = "Unit × gene-set enrichment") -> go.Figure:
    """Units × gene sets, −log10 q (signed by the statistic's direction where it has one), for the
    sets with the smallest q in any unit (a :func:`unit_enrichment` table)."""
    if table is None or table.empty:
        raise SamsError("No enrichment results to show: no gene set passed the size filter.")
    t = table.copy()
    t["score"] = -np.log10(t["q"].clip(lower=1e-300).astype(float))
    if "direction" in t:
        t["score"] *= np.where(t["direction"].astype(str).str.startswith("down"), -1.0, 1.0)
    best = t.groupby("set")["q"].min().sort_values().index[:n_sets]
    m = t[t["set"].isin(best)].pivot_table(index="set", columns="unit", values="score", aggfunc="first").reindex(best)
    m = m.fillna(0.0)
    m.columns = [f"unit {c}" for c in m.columns]
    desc = dict(zip(t["set"], t.get("description", t["set"])))
    rows = [set_label(s, desc.get(s, "")) for s in m.index]
    mx = float(np.abs(m.to_numpy()).max()) or 1.0
    signed = "direction" in t
    return matrix_heatmap(m.to_numpy(), rows, list(m.columns), title, "RdBu_r" if signed else "Reds",
                          -mx if signed else 0.0, mx, 0.0 if signed else None, "−log10 q" + (" (signed)" if signed else ""),
                          None, None)


def set_label(name: str, description: str = "", width: int = 40) -> str:
    """A gene set's row label: its id and the first ``width`` characters of its description, the id
    once when the description already starts with it ("GO:0006915 apoptotic process")."""
    name, d = str(name), str(description or "").strip()
    if not d or d == name:
        return name
    if d.startswith(name):
        d = d[len(name):].strip()
    return f"{name} {d[:width]}".strip()


def comparison_bars(table: pd.DataFrame, metrics: Sequence[str], name: str = "name", title: str = "Held-out comparison") -> go.Figure:
    """One panel per metric, one bar per model / baseline (a :func:`compare_on_heldout` table)."""
    from plotly.subplots import make_subplots

    metrics = [m for m in metrics if m in table.columns]
    if not metrics:
        raise SamsError("None of the chosen metrics is in the comparison table.")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics)
    kinds = table["kind"].to_numpy() if "kind" in table else np.full(len(table), "model")
    colors = np.where(kinds == "baseline", "#95a5a6", "#2e86c1")
    for i, m in enumerate(metrics, start=1):
        fig.add_trace(go.Bar(x=table[name].astype(str), y=table[m], marker_color=colors, showlegend=False,
                             hovertemplate="%{x}: %{y:.3f}<extra>" + m + "</extra>"), row=1, col=i)
    fig.update_xaxes(tickangle=-35)
    return _layout(fig, title, height=420)


def figure_bytes(fig: go.Figure, fmt: str, width: int | None = None, height: int | None = None, scale: float = 2.0) -> bytes:
    """The figure as ``png``, ``svg``, ``pdf`` (kaleido, a local Chromium) or offline ``html``."""
    fmt = fmt.lower()
    if fmt == "html":
        return fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")
    if fmt not in FORMATS:
        raise SamsError(f"Unknown figure format {fmt!r}: use one of {', '.join(FORMATS)}.")
    try:
        _export_browser()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The kopts argument is ignored")
            return _static(fig).to_image(format=fmt, width=width, height=height, scale=scale if fmt == "png" else 1)
    except Exception as e:  # kaleido needs Chrome/Chromium
        raise SamsError(f"Could not export the figure as {fmt.upper()}: {e}. Install Chromium (kaleido uses it) or download HTML.") from e


_EXPORT_BROWSER: list[bool] = []


def _export_browser() -> None:
    """Keep one Kaleido browser running for this process (kaleido ≥ 1: its sync server), so a
    figure export after the first takes a fraction of a second instead of starting Chromium."""
    if _EXPORT_BROWSER:
        return
    _EXPORT_BROWSER.append(True)
    try:
        import atexit

        import kaleido

        kaleido.start_sync_server(silence_warnings=True)
        atexit.register(kaleido.stop_sync_server, silence_warnings=True)
    except Exception:  # noqa: BLE001 - an older kaleido: each export starts its own browser
        pass


def _static(fig: go.Figure) -> go.Figure:
    """``fig`` with WebGL scatter traces drawn as SVG scatter traces (the same picture): a
    headless browser without a GPU renders WebGL in software, several times slower."""
    if not any(t.type == "scattergl" for t in fig.data):
        return fig
    out = go.Figure(layout=fig.layout)
    for t in fig.data:
        if t.type == "scattergl":
            spec = t.to_plotly_json()
            spec.pop("type", None)
            out.add_trace(go.Scatter(**spec))
        else:
            out.add_trace(t)
    return out


def cluster_order(matrix: np.ndarray, method: str = "average") -> np.ndarray:
    """Row order from hierarchical clustering of the rows of ``matrix`` (scipy leaves order)."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    m = np.asarray(matrix, dtype=np.float64)
    if m.shape[0] < 3:
        return np.arange(m.shape[0])
    # the optimal leaf order costs seconds above a few hundred rows; plain linkage order there
    return leaves_list(linkage(m, method=method, optimal_ordering=m.shape[0] <= 400))


def heatmap_orders(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column orders for a heatmap (e.g. perturbations × units mask probabilities)."""
    v = np.asarray(values, dtype=np.float64)
    return cluster_order(v), cluster_order(v.T)


# ---- latent space: values, highlight, selection ---------------------------------------------
def umap_values(coords: np.ndarray, values: np.ndarray, hover: Sequence[str] | None = None, value_label: str = "value",
                diverging: bool = False, title: str = "UMAP of cell latents") -> go.Figure:
    """Cells in 2-D coloured by a number each: a gene's expression (``diverging=False``: a
    sequential scale from 0) or a predicted effect (``diverging=True``: blue-white-red around 0).
    Cells are drawn in order of the value so the highest are on top; selectable by box and lasso."""
    xy = np.asarray(coords, dtype=float)
    v = np.asarray(values, dtype=float)
    if xy.shape[0] != v.shape[0]:
        raise SamsError(f"{xy.shape[0]} cells but {v.shape[0]} values to colour them by.")
    order = np.argsort(np.abs(v) if diverging else v, kind="stable")
    lim = float(np.nanmax(np.abs(v))) if v.size and np.isfinite(v).any() else 1.0
    marker = dict(size=4, opacity=0.8, color=v[order], colorbar=dict(title=value_label),
                  colorscale="RdBu_r" if diverging else "Viridis")
    if diverging:
        marker.update(cmin=-lim, cmax=lim)
    text = np.asarray(hover).astype(str)[order] if hover is not None else None
    fig = go.Figure(go.Scattergl(
        x=xy[order, 0], y=xy[order, 1], mode="markers", marker=marker, text=text, customdata=order,
        hovertemplate=("%{text}<br>" if text is not None else "") + f"{value_label}: %{{marker.color:.3g}}<extra></extra>",
    ))
    fig.update_xaxes(showticklabels=False, title="UMAP 1")
    fig.update_yaxes(showticklabels=False, title="UMAP 2", scaleanchor="x", scaleratio=1)
    fig.update_layout(dragmode="lasso")
    return _layout(fig, title, height=560)


def umap_highlight(coords: np.ndarray, highlighted: np.ndarray, name: str, hover: Sequence[str] | None = None,
                   title: str = "UMAP of cell latents") -> go.Figure:
    """Cells in 2-D with those of one perturbation (``highlighted``, a boolean per cell) drawn in
    colour on top of the others in grey."""
    xy = np.asarray(coords, dtype=float)
    h = np.asarray(highlighted, dtype=bool)
    if h.shape[0] != xy.shape[0]:
        raise SamsError(f"{xy.shape[0]} cells but {h.shape[0]} highlight flags.")
    text = np.asarray(hover).astype(str) if hover is not None else np.full(xy.shape[0], "")
    fig = go.Figure()
    for mask, label, color, size in ((~h, "other cells", "#c8c8c8", 3), (h, name, "#d62728", 6)):
        idx = np.flatnonzero(mask)
        fig.add_trace(go.Scattergl(x=xy[idx, 0], y=xy[idx, 1], mode="markers", name=f"{label} ({idx.size:,})",
                                   marker=dict(size=size, color=color, opacity=0.9 if label == name else 0.5),
                                   text=text[idx], customdata=idx, hovertemplate="%{text}<extra></extra>"))
    fig.update_xaxes(showticklabels=False, title="UMAP 1")
    fig.update_yaxes(showticklabels=False, title="UMAP 2", scaleanchor="x", scaleratio=1)
    fig.update_layout(dragmode="lasso")
    return _layout(fig, title, height=560)


def selected_cells(coords: np.ndarray, points: Sequence[dict]) -> np.ndarray:
    """Positions (rows of ``coords``) of the cells a box or lasso selection picked, from the
    selection event's points (their x and y; several cells at one spot are all taken)."""
    xy = np.asarray(coords, dtype=float)
    if not len(points):
        return np.zeros(0, dtype=np.int64)
    index: dict[tuple[float, float], list[int]] = {}
    for i, (x, y) in enumerate(np.round(xy, 6)):
        index.setdefault((float(x), float(y)), []).append(i)
    out: set[int] = set()
    for p in points:
        key = (round(float(p.get("x", np.nan)), 6), round(float(p.get("y", np.nan)), 6))
        out.update(index.get(key, []))
    return np.array(sorted(out), dtype=np.int64)


def composition_table(groups: dict[str, Sequence], selected: np.ndarray, top: int = 15) -> pd.DataFrame:
    """Composition of the selected cells by each grouping (``{"perturbation": labels, "cell_type":
    ...}``, one value per cell): cells and share of the selection per value, beside the share among
    all cells (``top`` values per grouping, the rest as "other")."""
    import pandas as pd

    rows = []
    sel = np.asarray(selected, dtype=np.int64)
    for by, values in groups.items():
        v = np.asarray(values).astype(str)
        if sel.size == 0:
            continue
        counts = pd.Series(v[sel]).value_counts()
        everywhere = pd.Series(v).value_counts(normalize=True)
        kept = counts.index[:top]
        for val in kept:
            rows.append({"by": by, "value": val, "cells": int(counts[val]), "share": counts[val] / sel.size,
                         "share_all_cells": float(everywhere.get(val, 0.0))})
        rest = counts.iloc[top:].sum()
        if rest:
            rows.append({"by": by, "value": "other", "cells": int(rest), "share": rest / sel.size,
                         "share_all_cells": float(everywhere.drop(kept).sum())})
    return pd.DataFrame(rows, columns=["by", "value", "cells", "share", "share_all_cells"])


def composition_bars(table: pd.DataFrame, title: str = "Selected cells") -> go.Figure:
    """One panel per grouping of a :func:`composition_table`: share of the selected cells per value
    (bars) beside the share among all cells (grey), so enrichment shows at a glance."""
    from plotly.subplots import make_subplots

    groups = list(dict.fromkeys(table["by"])) or ["(nothing selected)"]
    fig = make_subplots(rows=1, cols=len(groups), subplot_titles=groups, horizontal_spacing=0.12)
    for i, by in enumerate(groups, start=1):
        t = table[table["by"] == by]
        fig.add_trace(go.Bar(y=t["value"], x=t["share"], orientation="h", name="selected", marker_color="#1f77b4",
                             showlegend=i == 1, customdata=t["cells"], hovertemplate="%{y}: %{x:.1%} (%{customdata} cells)<extra>selected</extra>"), 1, i)
        fig.add_trace(go.Bar(y=t["value"], x=t["share_all_cells"], orientation="h", name="all cells", marker_color="#c8c8c8",
                             showlegend=i == 1, hovertemplate="%{y}: %{x:.1%}<extra>all cells</extra>"), 1, i)
        fig.update_yaxes(autorange="reversed", row=1, col=i)
        fig.update_xaxes(tickformat=".0%", row=1, col=i)
    fig.update_layout(barmode="group")
    return _layout(fig, title, height=max(300, 24 * int(table.groupby("by").size().max() if len(table) else 4) + 120))


# ---- observed differential expression and the perturbation map -------------------------------
def de_volcano(table: pd.DataFrame, title: str = "Observed differential expression", alpha: float = 0.05,
               min_lfc: float = 0.5, n_labels: int = 12) -> go.Figure:
    """Observed volcano of one perturbation against its controls: log2 fold change (x) against
    −log10 adjusted p-value (y), from a table with ``gene``, ``logfoldchange`` and ``pval_adj``
    (:func:`sams_core.interpret.differential.observed_de`). Genes below ``alpha`` with |log2 FC|
    at least ``min_lfc`` are coloured; p-values show in scientific notation."""
    lfc = table["logfoldchange"].to_numpy(dtype=float)
    padj = np.clip(table["pval_adj"].to_numpy(dtype=float), 1e-300, 1.0)
    y = -np.log10(padj)
    genes = table["gene"].astype(str).to_numpy()
    up, down = (padj < alpha) & (lfc >= min_lfc), (padj < alpha) & (lfc <= -min_lfc)
    traces = []
    for name, keep, colour in ((f"up (adj. p < {alpha:g})", up, "#c0392b"), (f"down (adj. p < {alpha:g})", down, "#2166ac"),
                               ("not significant", ~(up | down), "#b0b0b0")):
        traces.append(go.Scattergl(x=lfc[keep], y=y[keep], mode="markers", name=f"{name}: {int(keep.sum())}", text=genes[keep],
                                   customdata=padj[keep], marker=dict(color=colour, size=6),
                                   hovertemplate="<b>%{text}</b><br>log2 FC %{x:.3f}<br>adj. p %{customdata:.2e}<extra></extra>"))
    top = np.argsort(-(y * (np.abs(lfc) + 1e-9)), kind="stable")[:n_labels]
    notes = [dict(x=float(lfc[i]), y=float(y[i]), text=str(genes[i]), showarrow=False, yshift=9, font=dict(size=10)) for i in top]
    fig = go.Figure(traces, layout=dict(annotations=notes, legend_title_text="", xaxis=dict(title="observed log2 fold change"),
                                        yaxis=dict(title="−log10 adjusted p-value")))
    fig.add_hline(y=-np.log10(alpha), line=dict(dash="dot", color="#888888", width=1))
    return _layout(fig, title, height=480)


def perturbation_map(table: pd.DataFrame, title: str = "Perturbation similarity map") -> go.Figure:
    """Perturbations as points in 2-D (columns ``perturbation``, ``x``, ``y``, ``cluster`` of
    :func:`sams_core.interpret.differential.perturbation_map`), coloured by cluster and labelled:
    near points move the latent space alike. Clicking a point selects it."""
    import plotly.express as px

    colours = px.colors.qualitative.Dark24
    fig = go.Figure()
    for i, (cl, t) in enumerate(table.groupby("cluster", sort=True)):
        fig.add_trace(go.Scatter(x=t["x"], y=t["y"], mode="markers+text", text=t["perturbation"], textposition="top center",
                                 name=f"cluster {cl}", marker=dict(size=11, color=colours[i % len(colours)]),
                                 customdata=t["perturbation"], hovertemplate="<b>%{text}</b><extra>cluster " + str(cl) + "</extra>"))
    fig.update_xaxes(showticklabels=False, title="map 1", zeroline=False)
    fig.update_yaxes(showticklabels=False, title="map 2", zeroline=False, scaleanchor="x", scaleratio=1)
    return _layout(fig, title, height=520)


def dose_response_figure(table: pd.DataFrame, title: str | None = None, measured_dose: float | None = 1.0) -> go.Figure:
    """Predicted effect against dosage, one line per gene with its credible band (columns
    ``dose``, ``gene``, ``mean``, ``lower``, ``upper``, as from
    :meth:`sams_core.interpret.dose.DoseResponse.table`); a dotted line marks ``measured_dose``
    (screens measure dosage 1: the curve elsewhere is extrapolated by the model)."""
    import plotly.express as px

    if table.empty:
        raise SamsError("No dose-response to draw: the table has no rows. Pick a perturbation and at least two dosages.")
    colours = px.colors.qualitative.Plotly
    fig = go.Figure()
    for i, (gene, t) in enumerate(table.groupby("gene", sort=False)):
        t = t.sort_values("dose")
        c = colours[i % len(colours)]
        rgb = tuple(int(c[j:j + 2], 16) for j in (1, 3, 5))
        fig.add_trace(go.Scatter(
            x=np.concatenate([t["dose"], t["dose"][::-1]]), y=np.concatenate([t["upper"], t["lower"][::-1]]),
            mode="lines", fill="toself", fillcolor=f"rgba({rgb[0]},{rgb[1]},{rgb[2]},0.15)", line=dict(width=0),
            hoverinfo="skip", showlegend=False, legendgroup=str(gene)))
        fig.add_trace(go.Scatter(
            x=t["dose"], y=t["mean"], mode="lines+markers", name=str(gene), legendgroup=str(gene), line=dict(color=c),
            customdata=np.stack([t["lower"], t["upper"]], axis=1),
            hovertemplate=f"<b>{gene}</b><br>dosage %{{x:g}}<br>effect %{{y:.3f}} [%{{customdata[0]:.3f}}, %{{customdata[1]:.3f}}]<extra></extra>"))
    if measured_dose is not None:
        fig.add_vline(x=measured_dose, line_dash="dot", line_color="grey", annotation_text="measured dosage",
                      annotation_position="top left")
    fig.add_hline(y=0, line_color="lightgrey")
    fig.update_xaxes(title="dosage")
    fig.update_yaxes(title="predicted effect (log2 fold change)")
    return _layout(fig, title, height=460)
