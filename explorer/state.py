"""State of the dashboard shared by its pages: the chosen dataset and model, cached loaders and
computations, selections mirrored into the URL, and download buttons.

The dashboard layer: only ``app.py`` and the pages import it; ``sams_core`` never imports Streamlit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import streamlit as st

from sams_core.demo import DEFAULT_DEMO, DEMO_DIR, DEMOS, DATA_FILE, file_sha256
from explorer.jobs import list_jobs
from explorer.preload import preload_models, preload_umap
from sams_core.errors import SamsError
from sams_core.io.paths import readable_path
from sams_core.settings import SETTINGS

if TYPE_CHECKING:  # numpy and pandas load with the first page that needs them
    import numpy as np
    import pandas as pd

RUNS_DIR = SETTINGS.runs_dir
# a read-only deployment (SAMS_READ_ONLY=1) offers no "Files on disk" (and app.py no Train page)
SOURCES = ("demo", "upload") if SETTINGS.read_only else ("demo", "path", "upload")
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
def _stamp(source: str, content: bytes | None) -> tuple | None:
    """What tells a file's content apart cheaply, for cache keys: size and modification time (of
    a folder bundle's parts); None for an upload (its bytes are the key)."""
    if content is not None:
        return None
    p = Path(source)
    try:
        parts = [p / "manifest.json", p / "weights.safetensors"] if p.is_dir() else [p]
        return tuple((q.stat().st_size, q.stat().st_mtime_ns) for q in parts)
    except OSError:
        return None


def _bundle(source: str, content: bytes | None = None):
    """The bundle at ``source`` (or uploaded), cached by content: a rewritten file is read again."""
    return _bundle_cached(source, content, _stamp(source, content))


@st.cache_resource(show_spinner="Loading model…", max_entries=16)
def _bundle_cached(source: str, content: bytes | None, stamp: tuple | None):
    preload_models()  # PyTorch and the model code, imported once under a lock (no cold-start race)
    from sams_core.io.bundle import load_bundle

    return load_bundle(content if content is not None else source, device="cpu")


def _adata(source: str, content: bytes | None = None):
    """The screen's AnnData, cached by content (at most 4 held: an upload's copy is released
    when it falls out)."""
    return _adata_cached(source, content, _stamp(source, content))


@st.cache_resource(show_spinner="Reading data…", max_entries=4)
def _adata_cached(source: str, content: bytes | None, stamp: tuple | None):
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


def data_summary(source: str, content: bytes | None = None):
    """Cells, genes, perturbations, combinations and controls of a screen (no model loaded),
    cached by content (a rewritten file is summarised again)."""
    return _data_summary_cached(source, content, _stamp(source, content))


@st.cache_data(show_spinner="Reading data…", max_entries=50)
def _data_summary_cached(source: str, content: bytes | None, stamp: tuple | None):
    from sams_core.data.summary import screen_summary, summarize_adata

    if content is None:
        return screen_summary(source)
    return summarize_adata(_adata(source, content))


@st.cache_resource(show_spinner="Matching data to the model…", max_entries=16)
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


def run_label(job: Any) -> str:
    """How the sidebar names a finished run's model: run name, model (family and objective) and date."""
    try:
        model = model_label_of(_manifest(str(job.model_path)))
    except SamsError:
        model = job.spec.family
    return f"run: {job.spec.name} · {model} · {job.created.replace('T', ' ')[:16]}"


def model_label_of(manifest: dict[str, Any]) -> str:
    """The model's name from its manifest, with a tempered objective said."""
    from sams_core.io.manifest import model_label

    return model_label(manifest)


def run_bundles(data_src: tuple[str, bytes | None] | None = None, settings: DataSettings | None = None) -> dict[str, tuple[str, None]]:
    """Bundles trained by finished jobs (the Train page) on the screen ``data_src`` (all screens
    when None), newest first, labelled with the run's name, model and date. A run matches when its
    screen file has the same content (hash) and, with ``settings``, was read with the same
    perturbation column and separators."""
    want = None if data_src is None else screen_hash(data_src)
    out: dict[str, tuple[str, None]] = {}
    for job in list_jobs(RUNS_DIR):
        if job.state != "done" or not job.model_path.is_file():
            continue
        if want is not None:
            try:
                if file_hash(job.spec.data) != want:
                    continue
            except OSError:
                continue
        if settings is not None:
            ds = job.spec.data_settings or {}
            if ds.get("perturbation_key") not in (None, settings.perturbation_key):
                continue
            if list(ds.get("separators") or ["+"]) != list(settings.separators):
                continue
        out[run_label(job)] = (str(job.model_path), None)
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


def demo_bundles(demo: str = DEFAULT_DEMO) -> dict[str, tuple[str, None]]:
    """The bundles shipped with the demo ``demo`` (a key of ``sams_core.demo.DEMOS``)."""
    return {n: (str(p), None) for n, p in DEMOS[demo].bundle_paths().items()}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# the screen's data settings (sidebar "Data settings") and its content hash
#: obs columns offered first as covariates (DESIGN §4); others with few levels are offered too.
COVARIATE_NAMES = ("cell_type", "cell_line", "batch", "gem_group", "donor", "sample")
#: obs columns the reader writes itself: never offered as a covariate.
NOT_COVARIATES = ("perturbation", "raw_perturbation")
SEPARATOR_CHOICES = ("+", "_", "|", ";")


@dataclass(frozen=True)
class DataSettings:
    """How the screen is read: perturbation column, combination separator, control labels,
    likelihood ("auto": negative binomial for counts, Gaussian otherwise) and covariates."""

    perturbation_key: str
    separators: tuple[str, ...] = ("+",)
    control_labels: tuple[str, ...] = ()
    likelihood: str = "auto"
    covariates: tuple[str, ...] = ()
    #: True when every value is the one detected (the screen's cached summary applies)
    detected: bool = field(default=False, compare=False)

    def read_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``sams_core.data.screen.read_h5ad`` / ``from_anndata``."""
        kw: dict[str, Any] = {"perturbation_key": self.perturbation_key, "separators": list(self.separators)}
        if self.control_labels:
            kw["control_labels"] = list(self.control_labels)
        if self.covariates:
            kw["covariate_keys"] = list(self.covariates)
        return kw

    def cli_flags(self) -> str:
        """The same settings as ``python -m sams_core train`` flags."""
        parts = [f"--perturbation-key {_shell(self.perturbation_key)}"]
        parts += [f"--separator {_shell(x)}" for x in self.separators if self.separators != ("+",)]
        parts += [f"--control-label {_shell(c)}" for c in self.control_labels]
        if self.likelihood != "auto":
            parts.append(f"--likelihood {self.likelihood}")
        parts += [f"--covariate {_shell(c)}" for c in self.covariates]
        return " ".join(parts)

    @property
    def key(self) -> str:
        """A short hash of the settings (part of the screen's identity)."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:8]


def _shell(x: str) -> str:
    import shlex

    return shlex.quote(str(x))


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | Path) -> str:
    """Content hash (SHA-256, 16 hex digits) of a file, remembered while it is unchanged."""
    p = Path(path).resolve()
    st_ = p.stat()
    key = (str(p), st_.st_size, st_.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = file_sha256(p)[:16]
    return _FILE_HASHES[key]


def screen_hash(data_src: tuple[str, bytes | None]) -> str:
    """Content hash of the screen's file (path or upload)."""
    source, content = data_src
    if content is not None:
        return hashlib.sha256(content).hexdigest()[:16]
    return file_hash(source)


@st.cache_data(show_spinner="Reading the screen's labels…", max_entries=50)
def _obs(source: str, stamp: str, content: bytes | None = None) -> pd.DataFrame:
    """The screen's ``obs`` table (the matrix stays on disk for a path)."""
    import anndata

    if content is not None:
        return _adata(source, content).obs.copy()
    p = Path(source)
    if not p.is_file():
        raise SamsError(f"No data file at {source}. Give the path of an .h5ad file.")
    try:
        a = anndata.read_h5ad(p, backed="r")
    except Exception as e:  # noqa: BLE001
        raise SamsError(f"Could not read {p.name} as an .h5ad file ({type(e).__name__}: {e}).") from e
    try:
        return a.obs.copy()
    finally:
        a.file.close()


def screen_obs(data_src: tuple[str, bytes | None]) -> pd.DataFrame:
    """The screen's ``obs`` (cached while the file is unchanged)."""
    source, content = data_src
    stamp = ""
    if content is None and Path(source).is_file():
        st_ = Path(source).stat()
        stamp = f"{st_.st_size}:{st_.st_mtime_ns}"
    return _obs(source, stamp, content)


def detected_settings(obs: pd.DataFrame) -> tuple[list[str], str | None]:
    """(columns that can hold perturbations, the one the data contract detects or None)."""
    from sams_core.data.contract import PERTURBATION_KEYS

    cols = [str(c) for c in obs.columns if str(c) not in ("raw_perturbation",)
            and (obs[c].dtype == object or str(obs[c].dtype) in ("category", "string"))]
    found = next((k for k in PERTURBATION_KEYS if k in cols), None)
    return ([k for k in PERTURBATION_KEYS if k in cols] + [c for c in cols if c not in PERTURBATION_KEYS]), found


def covariate_candidates(obs: pd.DataFrame, perturbation_key: str) -> list[str]:
    """obs columns that can be covariates: categorical-like (2 to 200 levels), not the perturbation
    column nor the reader's own columns."""
    out = []
    for c in obs.columns:
        c = str(c)
        if c == perturbation_key or c in NOT_COVARIATES:
            continue
        if obs[c].dtype.kind in "fc" and c not in COVARIATE_NAMES:
            continue
        if 2 <= obs[c].nunique() <= 200:
            out.append(c)
    return sorted(out, key=lambda c: (c not in COVARIATE_NAMES, c))


def data_settings_widgets(data_src: tuple[str, bytes | None]) -> DataSettings | None:
    """The sidebar's "Data settings": detected values, each editable, with the CLI flags shown.
    None after a message when the screen cannot be read."""
    from sams_core.labels import CONTROL_LABELS

    obs = guarded(lambda: screen_obs(data_src))
    if obs is None:
        return None
    cols, found = detected_settings(obs)
    if not cols:
        st.sidebar.error("The screen's obs has no text column to read perturbations from. Add one (e.g. 'condition').")
        return None
    with st.sidebar.expander("Data settings", expanded=found is None):
        key = widget(st.selectbox, "Perturbation column", "ds_key", found or cols[0], cols,
                     help="obs column with each cell's perturbation; combinations join members with the separator. "
                          "Command line: --perturbation-key")
        seps = widget(st.multiselect, "Combination separator", "ds_sep", ["+"], list(SEPARATOR_CHOICES),
                      help="what joins the members of a combination, e.g. KLF1+GATA1. Command line: --separator")
        values = sorted(set(obs[key].astype(str)))[:500]
        detected = [v for v in values if v.lower() in CONTROL_LABELS]
        controls = widget(st.multiselect, "Control labels", "ds_ctrl", detected, values,
                          help="labels of control cells (no perturbation). Command line: --control-label")
        from sams_core.models.registry import LIKELIHOODS

        lik = widget(st.selectbox, "Likelihood", "ds_lik", "auto", ["auto", *LIKELIHOODS],
                     format_func=lambda x: {"auto": "auto (negative binomial for counts, else Gaussian)",
                                            "nb": "negative binomial (counts)", "gaussian": "Gaussian (log-normalised)"}.get(x, x),
                     help="the models' likelihood for expression. Command line: --likelihood")
        cands = covariate_candidates(obs, key)
        covs = widget(st.multiselect, "Covariates", "ds_cov", [c for c in cands if c in COVARIATE_NAMES], cands,
                      help="obs columns such as cell type or batch that the models condition on. Command line: --covariate")
        default_covs = [c for c in cands if c in COVARIATE_NAMES]
        settings = DataSettings(key, tuple(seps) or ("+",), tuple(controls), lik, tuple(covs),
                                detected=(key == found and list(seps) == ["+"] and list(controls) == detected
                                          and lik == "auto" and list(covs) == default_covs))
        st.caption("Command line:")
        st.code(settings.cli_flags(), language="bash", wrap_lines=True)
    return settings


@st.cache_resource(show_spinner="Reading the screen with its data settings…", max_entries=8)
def _screen_data(source: str, settings: DataSettings, content: bytes | None = None):
    from sams_core.data.screen import from_anndata

    return from_anndata(_adata(source, content), **settings.read_kwargs())


def screen_counts(sel: Selection):
    """Cells, genes, perturbations, combinations and controls of the screen as the data settings
    read it (the cached summary when the settings are the detected ones); None after a message."""
    from sams_core.data.summary import summarize

    if sel.data_src is None:
        return None
    if sel.settings is None or (sel.settings.detected and sel.data_src[1] is None):
        return guarded(lambda: data_summary(*sel.data_src))
    data = screen_data(sel)
    return None if data is None else summarize(data, "sams_truth" in _adata(*sel.data_src).uns)


def condition_table(obs: pd.DataFrame, settings: DataSettings) -> pd.DataFrame:
    """One row per condition of the screen as ``settings`` read it: label as written, members,
    number of members and cells (controls first, then by cells)."""
    import pandas as pd

    from sams_core.labels import control_words, split_label

    ctrl = control_words(settings.control_labels or None)
    counts = obs[settings.perturbation_key].astype(str).value_counts()
    rows = []
    for lab, n in counts.items():
        members = split_label(lab, settings.separators, ctrl)
        rows.append({"condition": lab, "members": " + ".join(members) or "control", "n_members": len(members), "cells": int(n)})
    t = pd.DataFrame(rows, columns=["condition", "members", "n_members", "cells"])
    return t.sort_values(["n_members", "cells"], ascending=[True, False]).reset_index(drop=True)


def screen_data(sel: Selection):
    """The screen read with the sidebar's data settings (no model needed); None after a message."""
    if sel.data_src is None or sel.settings is None:
        return None
    return guarded(lambda: _screen_data(sel.data_src[0], sel.settings, sel.data_src[1]))


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
    settings: DataSettings | None = None

    def manifest(self) -> dict[str, Any] | None:
        """The chosen bundle's manifest (no model built), or None after showing what went wrong."""
        if self.model_name is None:
            return None
        return guarded(lambda: _manifest(*self.models[self.model_name]))


def _manifest(source: str, content: bytes | None = None) -> dict[str, Any]:
    """The bundle's manifest, cached by content (a rewritten bundle shows its new metrics)."""
    return _manifest_cached(source, content, _stamp(source, content))


@st.cache_data(show_spinner=False, max_entries=50)
def _manifest_cached(source: str, content: bytes | None, stamp: tuple | None) -> dict[str, Any]:
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


def screen(sel: Selection | None = None) -> Selection | None:
    """The sidebar's screen (a model is not needed), or None after saying what is missing."""
    sel = sel or selection()
    if sel.data_src is None:
        st.info(sel.problem or "Choose a screen (.h5ad) in the sidebar to start.")
        return None
    return sel


def page(title: str, needs_model: bool = True) -> Any:
    """A page's title and what it works on: the loaded :class:`Context` (screen and model), or
    with ``needs_model=False`` the screen's :class:`Selection`. Stops the page, after saying what
    is missing, when there is none."""
    _leave_pages_folder_mode()
    st.title(title)
    sel = selection()
    found = sidebar(sel) if needs_model else screen(sel)
    if found is None:
        st.stop()
    note = family_note(sel)
    if note:
        st.info(note, icon=":material/info:")
    return found


def _leave_pages_folder_mode() -> None:
    """On a fresh server whose first visit is a page's own URL (a shared link to Compose, say),
    Streamlit runs that page without the entry script, by its ``pages/`` folder, and would stay in
    that mode for every session: no sidebar state, no page titles or icons. Switch to the entry
    script's navigation and rerun the same URL through it."""
    from streamlit.runtime.pages_manager import PagesManager

    if getattr(_RUN, "selection", None) is None and PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def capability_note(family: str, label: str) -> str | None:
    """What a model family cannot do, said on every page (None when it composes combinations)."""
    from sams_core.models import registry

    try:
        caps = registry.get(family).capabilities
    except SamsError:
        return None
    if caps.composes_unseen_combinations:
        return None
    return (f"{label} learns one shift per label: each combination measured in training is a label of its own, "
            "so it cannot compose a pair it never saw from its members. Its masks and in-distribution metrics "
            "(held-out cells of measured conditions) are shown; Compose and pair ranking need a composing "
            "model such as SAMS-VAE.")


def family_note(sel: Selection) -> str | None:
    """The chosen model's :func:`capability_note` (None without a model)."""
    manifest = sel.manifest() if sel.model_name is not None else None
    if not manifest:
        return None
    return capability_note(str(manifest.get("family", "")), model_label_of(manifest))


def sidebar(sel: Selection | None = None) -> Context | None:
    """The loaded :class:`Context` of the sidebar's screen and model, or None after saying what is
    missing (no screen, or no model for it)."""
    sel = sel or selection()
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
        key = widget(sb.selectbox, "Demo screen", "demo", DEFAULT_DEMO, list(DEMOS), format_func=lambda k: DEMOS[k].label)
        data_src = (str(DEMOS[key].data_path), None)
        models.update(demo_bundles(key))
        label = f"demo: {DEMOS[key].label}"
    elif source == "path":
        dpath = widget(sb.text_input, "Data (.h5ad path)", "data_path", str(DEMO_DIR / DATA_FILE))
        mpath = widget(sb.text_input, "Model bundle (.sams path)", "model_path", "")
        data_src = (dpath, None) if dpath else None
        if mpath:
            models[Path(mpath).name] = (mpath, None)
        label = dpath
        try:  # paths from the sidebar or the URL are read only under SAMS_DATA_ROOT
            for given in (dpath, mpath):
                if given:
                    readable_path(given)
        except SamsError as e:
            sb.error(str(e))
            data_src, models = None, {}
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
    if data_src is None:
        return Selection(source, None, label, models, None, "Choose a screen (.h5ad) in the sidebar to start.")
    settings = data_settings_widgets(data_src)
    if settings is None:
        return Selection(source, None, label, models, None, "The screen could not be read: see the message above.")
    models.update(run_bundles(data_src, settings))
    model_name = None
    if models:
        names = list(models)
        model_name = widget(sb.selectbox, "Model", "model", names[0], names,
                            help="Models trained on this screen with these data settings (runs of the Train page, "
                                 "the shipped demo's bundles, or bundles you gave): run name · model · date.")
    return Selection(source, data_src, label, models, model_name, settings=settings)


@st.cache_resource(show_spinner=False, max_entries=50)
def _checksum(model_key: str, data_key: str, _data) -> str:
    return _data.checksum()


def check_same_screen(manifest: dict[str, Any], data: Any, model_name: str, screen_label: str, checksum: str | None = None) -> None:
    """Refuse a model trained on another screen: the content hash the bundle recorded of its
    training data against the same hash of this screen read with the bundle's settings
    (``checksum``, computed when not given; bundles that record none are accepted)."""
    recorded = (manifest.get("data") or {}).get("checksum")
    if not recorded:
        return
    checksum = checksum or data.checksum()
    if recorded != checksum:
        raise SamsError(
            f"{model_name} was trained on another screen (its data hash {recorded} differs from {checksum} "
            f"of {screen_label}). Choose a model trained on this screen, load the screen it was trained on, "
            "or train a model on this screen on the Train page."
        )


def load(sel: Selection) -> Context | None:
    """The chosen screen and model loaded and matched; None after showing what went wrong."""
    source, data_src, label, models, model_name = sel.source, sel.data_src, sel.data_label, sel.models, sel.model_name
    sb = st.sidebar
    try:
        adata = _adata(*data_src)
        bundle = _bundle(*models[model_name])
        try:
            data, split = _aligned(f"{model_name}:{bundle.checksum()}", f"{data_src[0]}:{_stamp(*data_src)}", bundle, adata)
        except SamsError as e:
            raise SamsError(f"{model_name} was trained on another screen: {e}") from e
        data_hash = _checksum(f"{model_name}:{bundle.checksum()}", data_src[0], data)
        check_same_screen(bundle.manifest, data, model_name, label, data_hash)
    except SamsError as e:
        st.error(str(e))
        return None
    except Exception as e:  # noqa: BLE001 - never a traceback in the app
        st.error(f"Could not load this dataset and model: {type(e).__name__}: {e}")
        return None
    run = bundle.manifest.get("run") or {}
    made = f"run {run.get('name')} of {str(run.get('created', ''))[:16].replace('T', ' ')} · " if run.get("name") else ""
    sb.caption(f"{bundle.label} · {made}screen {Path(label).name} (data hash {data_hash[:8]}) · "
               f"{data.n_cells:,} cells × {data.n_genes:,} genes")
    return Context(source, data_src[0], label, adata, models, model_name, bundle, data, split)


# ---------------------------------------------------------------------------------------------
# cached computations (keyed by model and data keys; the objects themselves are not hashed)
@st.cache_data(show_spinner="Predicting…", max_entries=200)
def predict(model_key: str, _bundle_obj, combo: tuple[tuple[str, float], ...], level: float = 0.9,
            covariate_level: str | None = None):
    """The model's predicted effect of ``combo`` with its credible interval at ``level``, in
    ``covariate_level`` of the model's primary covariate (None: pooled at the training shares)."""
    from sams_core.interpret.effects import predict_effect

    return predict_effect(_bundle_obj, dict(combo), level=level, covariate_level=covariate_level)


@st.cache_data(show_spinner="Computing observed effects…")
def observed(data_key: str, _data, level: str | None = None) -> pd.DataFrame:
    """Observed effect of every measured condition (rows) against the controls of the same level
    of the primary covariate; ``level`` gives one level's table, None the cell-weighted mean."""
    from sams_core.evaluation.baselines import observed_effects

    return observed_effects(_data, level=level)


#: The Compose picker's choice that predicts at the training shares of the covariate's levels.
POOLED_LEVEL = "pooled (training shares)"


@st.cache_data(show_spinner=False, max_entries=20)
def cells_per_level(data_key: str, _data) -> pd.DataFrame:
    """Cells of each condition (rows, controls included) at each level of the primary covariate
    (columns); empty on a screen without covariates."""
    import numpy as np
    import pandas as pd

    if not getattr(_data, "covariates", None):
        return pd.DataFrame()
    return pd.crosstab(pd.Series(np.asarray(_data.labels).astype(str), name="condition"),
                       pd.Series(_data.level_of_cells().astype(str), name="level"))


def measured_level(counts: pd.DataFrame, label: str, members: Sequence[str], levels: Sequence[str]) -> str:
    """The level (among ``levels``) where ``label`` was measured most, else where its members
    were measured most alone (summed), else the first level."""
    cols = [lv for lv in levels if lv in counts.columns]
    if not cols:
        return levels[0]
    for rows in ([label], [m for m in members if m != label]):
        rows = [r for r in rows if r in counts.index]
        if rows:
            n = counts.loc[rows, cols].sum(0)
            if n.max() > 0:
                return str(n.idxmax())
    return levels[0]


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


@st.cache_data(show_spinner="Predicting each condition's effect…", max_entries=50)
def predicted_effects(model_key: str, _bundle_obj, conditions: tuple[str, ...], perturbations: tuple[str, ...], is_counts: bool) -> pd.DataFrame:
    """The model's predicted effect (log2 fold change over controls) of each condition on every
    gene; rows = conditions (NaN where the model cannot predict one)."""
    from sams_core.evaluation.metrics import model_ate

    return model_ate(_bundle_obj.model, list(conditions), list(perturbations), is_counts, n_samples=400)


@st.cache_data(show_spinner="Testing genes (scanpy rank_genes_groups)…", max_entries=100)
def observed_de(data_key: str, _data, condition: str, method: str) -> pd.DataFrame:
    """Observed differential expression of ``condition`` against the controls (cached)."""
    from sams_core.interpret.differential import observed_de as de

    return de(_data, condition, method=method)


@st.cache_data(show_spinner="Mapping perturbations…", max_entries=50)
def perturbation_map(model_key: str, _bundle_obj, by: str, n_clusters: int) -> pd.DataFrame:
    """Perturbations in 2-D by the model's latent shifts (or masks), clustered."""
    from sams_core.interpret.differential import perturbation_map as pmap
    from sams_core.interpret.effects import perturbation_distances

    return pmap(perturbation_distances(_bundle_obj, by=by), n_clusters)


def open_page(path: str, **selections: Any) -> None:
    """Go to the page at ``path`` with ``selections`` (keys of :func:`widget`) preset."""
    for key, value in selections.items():
        ss["sel_" + key] = value
        ss.pop("w_" + key, None)
        remember(key, value)
    st.switch_page(path)


_EMBEDDINGS: dict[tuple, Any] = {}


def embedding(model_key: str, data_key: str, _bundle_obj, _data, latent: str, max_cells: int, _progress=None):
    """UMAP of cells' latents: memoised in this process and cached on disk by ``umap_embedding``
    (not ``st.cache_data``, because its progress callback draws on the page)."""
    from sams_core.interpret.embed import umap_embedding

    key = (model_key, data_key, latent, int(max_cells))
    if key not in _EMBEDDINGS:
        if _progress:
            _progress("loading UMAP", 0.05)
        preload_umap()  # imported in the background since the first model was loaded: wait for it, under its lock
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


def download_name(name: str) -> str:
    """A download's file name (no extension): ``name`` followed by the model and the screen it
    shows, so files from several models and screens do not overwrite each other."""
    sel = getattr(_RUN, "selection", None)
    parts = [name]
    if sel is not None:
        if sel.model_name:
            parts.append(sel.model_name.split(" · ")[0].removeprefix("run: ").removeprefix("upload: "))
        if sel.data_src is not None:
            parts.append(Path(sel.data_label.removeprefix("demo: ")).stem)
    return _slug("__".join(parts))[:150]


def figure_downloads(fig, name: str, key: str) -> None:
    """PNG, SVG, PDF and HTML download buttons under a figure (rendered only when clicked)."""
    from sams_core.plots import MIME, figure_bytes

    cols = st.columns(4)
    for col, fmt in zip(cols, ("png", "svg", "pdf", "html")):
        col.download_button(
            fmt.upper(), data=(lambda f=fmt: figure_bytes(fig, f)), file_name=f"{download_name(name)}.{fmt}",
            mime=MIME[fmt], key=f"dl_{key}_{fmt}", on_click="ignore", icon=":material/download:",
        )


def chart(fig, name: str, key: str, select: bool = False) -> Any:
    """A Plotly figure with its download buttons; with ``select`` its points can be picked by
    box, lasso or click and the selection event is returned (None otherwise)."""
    if select:
        event = st.plotly_chart(fig, width="stretch", key=f"chart_{key}", on_select="rerun",
                                selection_mode=("points", "box", "lasso"))
    else:
        event = st.plotly_chart(fig, width="stretch", key=f"chart_{key}")
    figure_downloads(fig, name, key)
    return event if select else None


def table_download(df: pd.DataFrame, name: str, key: str, index: bool = False) -> None:
    """A CSV download button for a table (the CSV is written only when clicked)."""
    st.download_button("CSV", data=lambda: df.to_csv(index=index).encode(), file_name=f"{download_name(name)}.csv",
                       mime="text/csv", key=f"csv_{key}", on_click="ignore", icon=":material/download:")


P_VALUE_COLUMNS = re.compile(r"^(p|q|fdr|padj|p_adj|pval|pvals|pval_adj|pvals_adj|p_value|q_value|qval|enrichment_p)$", re.IGNORECASE)


def table_columns(df: pd.DataFrame) -> dict[str, Any]:
    """Column settings of a shown table: p- and q-values in scientific notation, and each metric
    column's plain meaning as its header's help (the glossary)."""
    from sams_core.evaluation.glossary import metric_help

    out: dict[str, Any] = {}
    for c in df.columns:
        name, help_ = str(c), metric_help(str(c)) or None
        if P_VALUE_COLUMNS.match(name):
            out[name] = st.column_config.NumberColumn(name, format="%.2e", help=help_)
        elif help_:
            out[name] = st.column_config.Column(name, help=help_)
    return out


def show_table(df: pd.DataFrame, name: str, key: str, index: bool = False, height: int | None = None) -> None:
    """A table with its CSV download; p-values in scientific notation, metric columns explained."""
    st.dataframe(df, width="stretch", hide_index=not index, height=height or "auto", column_config=table_columns(df))
    table_download(df, name, key, index)


def export_h5ad_bytes(sel: Selection, umap: bool = True) -> bytes:
    """The screen with everything the chosen model learned (latents, UMAP, masks, embeddings,
    loadings) as the bytes of an ``.h5ad`` file: what ``python -m sams_core export`` writes."""
    from sams_core.interpret.writeback import export_screen, write_h5ad

    adata = _adata(*sel.data_src)
    bundle = _bundle(*sel.models[sel.model_name])
    model_key = f"{sel.model_name}:{bundle.checksum()}"
    data, _ = _aligned(model_key, sel.data_src[0], bundle, adata)
    check_same_screen(bundle.manifest, data, sel.model_name, sel.data_label, _checksum(model_key, sel.data_src[0], data))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_h5ad(export_screen(adata, bundle, data, umap=umap), Path(tmp) / "export.h5ad")
        return path.read_bytes()


def export_button(sel: Selection, key: str) -> None:
    """A download button for :func:`export_h5ad_bytes` (the file is made only when clicked)."""
    if sel.model_name is None or sel.data_src is None:
        return
    st.download_button(
        "Export screen with results (.h5ad)", data=lambda: export_h5ad_bytes(sel), file_name=f"{download_name('screen_with_sams')}.h5ad",
        mime="application/x-hdf5", key=f"export_{key}", on_click="ignore", icon=":material/download:",
        help="the screen with obsm['X_sams'] (latents), obsm['X_sams_umap'] (UMAP), and the model's masks, embeddings and "
             "unit loadings in uns['sams'], for scanpy. Command line: python -m sams_core export BUNDLE DATA --out FILE.h5ad",
    )


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
    "DataSettings", "data_settings_widgets", "screen_data", "screen_obs", "screen_hash", "file_hash", "run_label",
    "check_same_screen", "capability_note", "screen_counts", "condition_table", "predicted_effects", "observed_de",
    "perturbation_map", "open_page", "download_name", "export_h5ad_bytes", "export_button", "family_note", "covariate_candidates", "detected_settings",
]
