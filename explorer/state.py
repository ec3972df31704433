"""State of the dashboard shared by its pages: the chosen dataset and model, cached loaders and
computations, selections mirrored into the URL, and download buttons.

The dashboard layer: only ``app.py`` and the pages import it; ``sams_core`` never imports Streamlit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import streamlit as st

from sams_core.demo import DEMO_DIR, DEMO_MODELS, DATA_FILE
from explorer.jobs import list_jobs
from sams_core.errors import SamsError
from sams_core.settings import SETTINGS

if TYPE_CHECKING:  # numpy and pandas load with the first page that needs them
    import numpy as np
    import pandas as pd

RUNS_DIR = SETTINGS.runs_dir
SOURCES = ("demo", "path", "upload")
SOURCE_LABELS = {"demo": "Shipped demo", "path": "Files on disk", "upload": "Upload"}
ss = st.session_state
_LOG = logging.getLogger("sams_explorer")


# ---------------------------------------------------------------------------------------------
# selections that survive page changes and reloads (session state + URL query parameters)
def _from_qp(key: str, default: Any) -> Any:
    raw = st.query_params.get(key)
    if raw is None:
        return default
    try:
        if isinstance(default, bool):
            return raw in ("1", "true", "True")
        if isinstance(default, int):
            return int(float(raw))
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, (list, tuple)):
            return [x for x in raw.split(",") if x]
    except ValueError:
        return default
    return raw


def _to_qp(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def remember(key: str, value: Any) -> None:
    """Store a selection in the session and the URL."""
    ss["sel_" + key] = value
    try:
        st.query_params[key] = _to_qp(value)
    except Exception:  # noqa: BLE001 - URL mirroring is best effort
        pass


def recalled(key: str, default: Any) -> Any:
    """A stored selection: from this session, else from the URL, else ``default``."""
    if "sel_" + key in ss:
        return ss["sel_" + key]
    return _from_qp(key, default)


def _among(value: Any, options: Sequence, default: Any) -> Any:
    """A remembered choice kept among the current options: items no longer offered are dropped,
    and a choice none of whose items is offered (made on another screen) becomes ``default``."""
    opts = list(options)
    if isinstance(value, list):
        kept = [v for v in value if v in opts]
        return kept if kept or not value else default
    return value if value in opts else default


def _within_bounds(value: Any, low: Any, high: Any) -> Any:
    """A remembered number moved inside the widget's current bounds (another screen may have
    fewer cells than the one the value was chosen on)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if low is not None and value < low:
        return type(value)(low)
    if high is not None and value > high:
        return type(value)(high)
    return value


def widget(fn: Callable, label: str, key: str, default: Any, options: Sequence | None = None, **kw: Any) -> Any:
    """A Streamlit widget whose value persists across pages and reloads (``key`` in the URL)."""
    wkey = "w_" + key
    if wkey not in ss:
        val = recalled(key, default)
        ss[wkey] = _among(val, options, default) if options is not None else val
    elif options is not None:
        ss[wkey] = _among(ss[wkey], options, default)
    ss[wkey] = _within_bounds(ss[wkey], kw.get("min_value"), kw.get("max_value"))
    val = fn(label, options, key=wkey, **kw) if options is not None else fn(label, key=wkey, **kw)
    remember(key, val)
    return val


# ---------------------------------------------------------------------------------------------
# cached loaders
@st.cache_resource(show_spinner="Loading model…")
def _bundle(source: str, content: bytes | None = None):
    from sams_core.io.bundle import load_bundle

    return load_bundle(content if content is not None else source, device="cpu")


@st.cache_resource(show_spinner="Reading data…")
def _adata(source: str, content: bytes | None = None):
    import anndata

    if content is not None:
        with tempfile.NamedTemporaryFile(suffix=".h5ad") as f:
            f.write(content)
            f.flush()
            try:
                return anndata.read_h5ad(f.name)
            except Exception as e:  # noqa: BLE001
                raise SamsError(f"Could not read the upload as an .h5ad file ({type(e).__name__}: {e}). Upload an AnnData .h5ad file.") from e
    p = Path(source)
    if not p.is_file():
        raise SamsError(f"No data file at {source}. Give the path of an .h5ad file.")
    try:
        return anndata.read_h5ad(p)
    except Exception as e:  # noqa: BLE001
        raise SamsError(f"Could not read {p.name} as an .h5ad file ({type(e).__name__}: {e}).") from e


@st.cache_data(show_spinner="Reading data…", max_entries=50)
def data_summary(source: str, content: bytes | None = None):
    """Cells, genes, perturbations, combinations and controls of a screen (no model loaded)."""
    from sams_core.data.summary import screen_summary, summarize_adata

    if content is None:
        return screen_summary(source)
    return summarize_adata(_adata(source, content))


@st.cache_resource(show_spinner="Matching data to the model…")
def _aligned(model_key: str, data_key: str, _bundle_obj, _adata_obj):
    from sams_core.pipeline import data_for_bundle, split_for_bundle

    data = data_for_bundle(_bundle_obj, _adata_obj)
    return data, split_for_bundle(_bundle_obj, data)


@st.cache_resource(show_spinner=False)
def _plain_data(data_key: str, _adata_obj):
    from sams_core.data.screen import from_anndata

    return from_anndata(_adata_obj)


# ---------------------------------------------------------------------------------------------
# the current dataset and model
@dataclass
class Context:
    """Everything a page needs: the screen, the chosen model, its split, the truth if simulated."""

    source: str
    data_key: str
    data_label: str
    adata: Any
    models: dict[str, tuple[str, bytes | None]]
    model_name: str
    bundle: Any
    data: Any
    split: np.ndarray

    @property
    def model_key(self) -> str:
        return f"{self.model_name}:{self.bundle.checksum()}"

    @property
    def truth(self):
        if "sams_truth" not in self.adata.uns:
            return None
        from sams_core.simulate import truth_from_adata

        try:
            return truth_from_adata(self.adata)
        except Exception:  # noqa: BLE001
            return None

    def bundle_of(self, name: str):
        src, content = self.models[name]
        return _bundle(src, content)

    def measured(self) -> list[str]:
        return sorted({str(x) for x in self.data.labels})


def run_bundles(data_src: tuple[str, bytes | None] | None = None) -> dict[str, tuple[str, None]]:
    """Bundles trained by finished jobs (the Train page) on the screen ``data_src`` (all screens
    when None), newest first, labelled with the run's name and date."""
    if data_src is None:
        want = None
    else:
        want = str(jobs_data_path(data_src, write=False))
    out: dict[str, tuple[str, None]] = {}
    for job in list_jobs(RUNS_DIR):
        if job.state == "done" and job.model_path.is_file() and (want is None or job.spec.data == want):
            out[f"run: {job.spec.name} · {job.created.replace('T', ' ')}"] = (str(job.model_path), None)
    return out


def jobs_data_path(data_src: tuple[str, bytes | None], write: bool = True) -> Path:
    """The screen as a file a training job can read: its path, or the upload saved (atomically)
    under ``SAMS_HOME/uploads`` by content hash."""
    source, content = data_src
    if content is None:
        return Path(source).resolve()
    path = SETTINGS.home / "uploads" / f"{_sha(content)}.h5ad"
    if write and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_bytes(content)
        os.replace(tmp, path)
    return path


def demo_bundles() -> dict[str, tuple[str, None]]:
    return {n: (str(DEMO_DIR / f"{n}.sams"), None) for n in DEMO_MODELS if (DEMO_DIR / f"{n}.sams").exists()}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:12]


@dataclass
class Selection:
    """What the sidebar has chosen, before anything heavy is loaded.

    ``model_name`` is None when the screen has no model yet (the screen alone is explored and
    trained on); ``problem`` says what is missing when not even a screen is chosen.
    """

    source: str
    data_src: tuple[str, bytes | None] | None
    data_label: str
    models: dict[str, tuple[str, bytes | None]]
    model_name: str | None
    problem: str | None = None

    def manifest(self) -> dict[str, Any] | None:
        """The chosen bundle's manifest (no model built), or None after showing what went wrong."""
        if self.model_name is None:
            return None
        return guarded(lambda: _manifest(*self.models[self.model_name]))


@st.cache_data(show_spinner=False, max_entries=50)
def _manifest(source: str, content: bytes | None = None) -> dict[str, Any]:
    from sams_core.io.manifest import read_manifest

    return read_manifest(content if content is not None else source)


# The entry script (app.py) draws the sidebar once per run, before the page runs; the page then
# reads that selection instead of drawing the choosers again. Widgets drawn on every page keep
# their state across navigation (Streamlit forgets keyed widgets a page does not draw).
_RUN = threading.local()
NO_MODEL = "No model for this screen yet: train one on the Train page, or choose a bundle in the sidebar."


@contextlib.contextmanager
def drawn_sidebar(sel: Selection):
    """Let the pages run inside this block use ``sel`` (drawn by the entry script)."""
    _RUN.selection = sel
    try:
        yield sel
    finally:
        _RUN.selection = None


def selection() -> Selection:
    """The sidebar's selection: drawn by the entry script in this run, else drawn now (a page run
    on its own, e.g. in tests)."""
    sel = getattr(_RUN, "selection", None)
    return sel if sel is not None else choose()


def screen() -> Selection | None:
    """The sidebar's screen (a model is not needed), or None after saying what is missing."""
    sel = selection()
    if sel.data_src is None:
        st.info(sel.problem or "Choose a screen (.h5ad) in the sidebar to start.")
        return None
    return sel


def page(title: str, needs_model: bool = True) -> Any:
    """A page's title and what it works on: the loaded :class:`Context` (screen and model), or
    with ``needs_model=False`` the screen's :class:`Selection`. Stops the page, after saying what
    is missing, when there is none."""
    st.title(title)
    found = sidebar() if needs_model else screen()
    if found is None:
        st.stop()
    return found


def sidebar() -> Context | None:
    """The loaded :class:`Context` of the sidebar's screen and model, or None after saying what is
    missing (no screen, or no model for it)."""
    sel = selection()
    if sel.data_src is None:
        st.info(sel.problem or "Choose a screen (.h5ad) in the sidebar to start.")
        return None
    if sel.model_name is None:
        st.info(NO_MODEL)
        return None
    return load(sel)


def choose() -> Selection:
    """Dataset and model choosers in the sidebar (nothing loaded yet)."""
    sb = st.sidebar
    sb.header("Data and model")
    source = widget(sb.radio, "Dataset", "dataset", "demo", SOURCES, format_func=SOURCE_LABELS.get)
    models: dict[str, tuple[str, bytes | None]] = {}
    data_src: tuple[str, bytes | None] | None = None
    if source == "demo":
        data_src = (str(DEMO_DIR / DATA_FILE), None)
        models.update(demo_bundles())
        label = "demo: simulated SAMS screen"
    elif source == "path":
        dpath = widget(sb.text_input, "Data (.h5ad path)", "data_path", str(DEMO_DIR / DATA_FILE))
        mpath = widget(sb.text_input, "Model bundle (.sams path)", "model_path", "")
        data_src = (dpath, None) if dpath else None
        if mpath:
            models[Path(mpath).name] = (mpath, None)
        label = dpath
    else:
        up = sb.file_uploader("Screen (.h5ad)", type=None, key="up_data")
        if up is not None:
            ss["upload_data"] = (up.name, up.getvalue())
        ups = sb.file_uploader("Model bundles (.sams)", type=None, accept_multiple_files=True, key="up_models")
        if ups:
            ss["upload_models"] = {u.name: u.getvalue() for u in ups}
        if "upload_data" in ss:
            name, content = ss["upload_data"]
            data_src = (f"upload:{name}:{_sha(content)}", content)
        for name, content in ss.get("upload_models", {}).items():
            models[f"upload: {name}"] = (f"upload:{name}:{_sha(content)}", content)
        label = ss["upload_data"][0] if "upload_data" in ss else "upload"
    if data_src is not None:
        models.update(run_bundles(data_src))
    if data_src is None:
        return Selection(source, None, label, models, None, "Choose a screen (.h5ad) in the sidebar to start.")
    model_name = None
    if models:
        names = list(models)
        model_name = widget(sb.selectbox, "Model", "model", names[0], names)
    return Selection(source, data_src, label, models, model_name)


def load(sel: Selection) -> Context | None:
    """The chosen screen and model loaded and matched; None after showing what went wrong."""
    source, data_src, label, models, model_name = sel.source, sel.data_src, sel.data_label, sel.models, sel.model_name
    sb = st.sidebar
    try:
        adata = _adata(*data_src)
        bundle = _bundle(*models[model_name])
        data, split = _aligned(f"{model_name}:{bundle.checksum()}", data_src[0], bundle, adata)
    except SamsError as e:
        st.error(str(e))
        return None
    except Exception as e:  # noqa: BLE001 - never a traceback in the app
        st.error(f"Could not load this dataset and model: {type(e).__name__}: {e}")
        return None
    sb.caption(f"{bundle.label} · {data.n_cells:,} cells × {data.n_genes:,} genes")
    return Context(source, data_src[0], label, adata, models, model_name, bundle, data, split)


# ---------------------------------------------------------------------------------------------
# cached computations (keyed by model and data keys; the objects themselves are not hashed)
@st.cache_data(show_spinner="Predicting…", max_entries=200)
def predict(model_key: str, _bundle_obj, combo: tuple[tuple[str, float], ...], level: float = 0.9):
    from sams_core.interpret.effects import predict_effect

    return predict_effect(_bundle_obj, dict(combo), level=level)


@st.cache_data(show_spinner="Computing observed effects…")
def observed(data_key: str, _data) -> pd.DataFrame:
    from sams_core.evaluation.baselines import observed_effects

    return observed_effects(_data)


@st.cache_data(show_spinner="Ranking unmeasured pairs…")
def unmeasured_pairs(model_key: str, _bundle_obj, measured: tuple[str, ...]) -> pd.DataFrame:
    from sams_core.interpret.effects import rank_unmeasured_pairs

    return rank_unmeasured_pairs(_bundle_obj, list(measured))


@st.cache_data(show_spinner="Computing unit loadings…")
def loadings(model_key: str, data_key: str, _bundle_obj, _data) -> pd.DataFrame:
    from sams_core.interpret.programs import unit_loadings

    return unit_loadings(_bundle_obj, _data)


@st.cache_data(show_spinner="Testing gene sets…")
def enrichment(model_key: str, data_key: str, collection_key: str, _loadings: pd.DataFrame, _collection, method: str = "rank") -> pd.DataFrame:
    from sams_core.interpret.programs import unit_enrichment

    return unit_enrichment(_loadings, _collection, method=method)


_EMBEDDINGS: dict[tuple, Any] = {}


def embedding(model_key: str, data_key: str, _bundle_obj, _data, latent: str, max_cells: int, _progress=None):
    """UMAP of cells' latents: memoised in this process and cached on disk by ``umap_embedding``
    (not ``st.cache_data``, because its progress callback draws on the page)."""
    from sams_core.interpret.embed import umap_embedding

    key = (model_key, data_key, latent, int(max_cells))
    if key not in _EMBEDDINGS:
        _EMBEDDINGS[key] = umap_embedding(_bundle_obj, _data, latent=latent, max_cells=max_cells, progress=_progress)
        while len(_EMBEDDINGS) > 20:
            _EMBEDDINGS.pop(next(iter(_EMBEDDINGS)))
    return _EMBEDDINGS[key]


@st.cache_data(show_spinner="Comparing models on the held-out conditions…")
def comparison(data_key: str, model_keys: tuple[str, ...], _bundles: dict, _data, _split) -> pd.DataFrame:
    from sams_core.evaluation.compare import compare_on_heldout

    return compare_on_heldout(_bundles, _data, _split, n_cells=200, n_ate_samples=500)


# ---------------------------------------------------------------------------------------------
# downloads
def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s).strip("_") or "figure"


def figure_downloads(fig, name: str, key: str) -> None:
    """PNG, SVG, PDF and HTML download buttons under a figure (rendered only when clicked)."""
    from sams_core.plots import MIME, figure_bytes

    cols = st.columns(4)
    for col, fmt in zip(cols, ("png", "svg", "pdf", "html")):
        col.download_button(
            fmt.upper(), data=(lambda f=fmt: figure_bytes(fig, f)), file_name=f"{_slug(name)}.{fmt}",
            mime=MIME[fmt], key=f"dl_{key}_{fmt}", on_click="ignore", icon=":material/download:",
        )


def chart(fig, name: str, key: str) -> None:
    """A Plotly figure with its download buttons."""
    st.plotly_chart(fig, width="stretch", key=f"chart_{key}")
    figure_downloads(fig, name, key)


def table_download(df: pd.DataFrame, name: str, key: str, index: bool = False) -> None:
    """A CSV download button for a table (the CSV is written only when clicked)."""
    st.download_button("CSV", data=lambda: df.to_csv(index=index).encode(), file_name=f"{_slug(name)}.csv",
                       mime="text/csv", key=f"csv_{key}", on_click="ignore", icon=":material/download:")


def show_table(df: pd.DataFrame, name: str, key: str, index: bool = False, height: int | None = None) -> None:
    """A table with its CSV download."""
    st.dataframe(df, width="stretch", hide_index=not index, height=height or "auto")
    table_download(df, name, key, index)


def guarded(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a SamsError (or anything else) becomes an ``st.error`` message, not a traceback."""
    try:
        return fn()
    except SamsError as e:
        st.error(str(e))
    except Exception as e:  # noqa: BLE001
        st.error(f"{type(e).__name__}: {e}")
    return None


def report_unexpected(e: Exception) -> None:
    """An error no page expected: a message for the user, the traceback in the server's log."""
    _LOG.exception("unexpected error on a page")
    msg = str(e) if isinstance(e, SamsError) else f"{type(e).__name__}: {e}"
    st.error(f"This page could not be drawn: {msg}. Check the sidebar's screen and model; the server log has the details.")


def mask_truth(ctx: Context):
    """True masks in the model's mask-row order, or None (not simulated, or rows are conditions)."""
    truth = ctx.truth
    if truth is None or ctx.bundle.mask_rows != ctx.bundle.perturbations:
        return None
    from sams_core.simulate import truth_masks_for

    try:
        return truth_masks_for(truth, ctx.bundle.perturbations)
    except Exception:  # noqa: BLE001
        return None


__all__ = [
    "Context", "Selection", "page", "sidebar", "screen", "jobs_data_path", "choose", "selection", "drawn_sidebar", "NO_MODEL", "load", "data_summary", "widget", "remember", "recalled", "predict", "observed", "unmeasured_pairs", "loadings",
    "enrichment", "embedding", "comparison", "chart", "figure_downloads", "table_download", "show_table", "guarded",
    "mask_truth", "run_bundles", "demo_bundles", "RUNS_DIR", "report_unexpected",
]
