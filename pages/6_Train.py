"""Train: start a background training job on the chosen screen; follow it in the job list.

Each run is a job in its own process and folder (``explorer.jobs``): it keeps going when the page
changes, the tab closes or another session starts one (those queue). When it is done its model
appears in the sidebar for this screen.

The families, their options and the splits come from the library (the model registry and
``SPLIT_KINDS``): a newly registered family shows up here with its own option widgets.
"""

from __future__ import annotations

import math
from typing import Any

import streamlit as st

from explorer import jobs, train_form
from explorer import state as S
from sams_core import plots
from sams_core.data.splits import SPLIT_KINDS
from sams_core.errors import SamsError
from sams_core.io.manifest import read_manifest
from sams_core.models import registry

sel = S.page("Train", needs_model=False)
st.caption(f"Screen: {sel.data_label}" + (f" · data settings: `{sel.settings.cli_flags()}` (sidebar)" if sel.settings else ""))


def option_widget(where: Any, family: str, opt: registry.Option) -> Any:
    """A widget for one of a family's options (its type, choices and bounds from the registry);
    raises :class:`SamsError` for a value the option refuses."""
    title, key = opt.name.replace("_", " ").capitalize(), f"train_{family}_{opt.name}"
    if opt.choices is not None:
        return S.widget(where.selectbox, title, key, opt.default, opt.choices, help=opt.help)
    if opt.type is bool:
        return S.widget(where.checkbox, title, key, opt.default, help=opt.help)
    if opt.type is str:
        return S.widget(where.text_input, title, key, opt.default, help=opt.help)
    bounds = {"min_value": opt.low, "max_value": opt.high}
    if opt.type is int:
        lo = None if opt.low is None else math.floor(opt.low) + (1 if opt.low_open or opt.low % 1 else 0)
        hi = None if opt.high is None else math.ceil(opt.high) - (1 if opt.high_open or opt.high % 1 else 0)
        return S.widget(where.number_input, title, key, opt.default, step=1, help=opt.help, min_value=lo, max_value=hi)
    if opt.none_allowed:  # a number or "none", read as on the command line
        text = S.widget(where.text_input, title, key, "none" if opt.default is None else f"{opt.default:g}",
                        help=f"{opt.help}. {opt.requirement().capitalize()}.")
        return opt.parse(text)
    step = 10.0 ** math.floor(math.log10(abs(opt.default))) / 10 if opt.default else 0.1
    return S.widget(where.number_input, title, key, float(opt.default), step=step, format="%g", help=opt.help,
                    **{k: float(v) for k, v in bounds.items() if v is not None})


specs = {s.name: s for s in registry.families()}
NEW_SPLIT = "(a new split)"
c = st.columns(3)
family = S.widget(c[0].selectbox, "Model family", "train_family", "sams_vae", list(specs), format_func=lambda n: specs[n].label)
same_as = S.widget(c[1].selectbox, "Same split as model", "train_same_split", NEW_SPLIT, [NEW_SPLIT, *sel.models],
                   help="Reuse a model's recorded split (kind, fractions, seed and its exact held-out conditions), so the "
                        "new run is scored on the same test cells and appears in that model's Compare table.")
reused: dict[str, Any] | None = None
if same_as != NEW_SPLIT and same_as in sel.models:
    manifest = S.guarded(lambda: read_manifest(sel.models[same_as][1] or sel.models[same_as][0]))
    reused = S.guarded(lambda: train_form.same_split(manifest)) if manifest is not None else None
    if reused is not None:
        c[1].caption(f"Split of {same_as}: {train_form.split_summary(reused)}")
        mismatch = train_form.settings_mismatch(manifest, sel.settings.read_kwargs() if sel.settings else {})
        if mismatch:
            st.warning(mismatch)
if reused is None:
    split_kind = S.widget(c[2].selectbox, "Split", "train_split", "heldout-combos", SPLIT_KINDS)
else:  # shown, not chosen: the model's split
    split_kind = c[2].selectbox("Split", [reused["kind"]], disabled=True, key="train_split_reused")
spec = specs[family]
st.caption(spec.summary)
options: dict[str, Any] = {}
refused = False
OPTIONS_PER_ROW = 4  # a family with many options (SAMS-VAE's schedule) gets rows, not slivers
for start in range(0, len(spec.options), OPTIONS_PER_ROW):
    row = spec.options[start : start + OPTIONS_PER_ROW]
    for where, opt in zip(st.columns(OPTIONS_PER_ROW), row, strict=False):  # the last row may be shorter
        try:
            options[opt.name] = opt.validate(option_widget(where, family, opt))
        except SamsError as e:
            where.error(str(e))
            options[opt.name], refused = opt.default, True
c = st.columns(4)
n_latent = S.widget(c[0].number_input, "Latent units", "train_latent", 6, min_value=1, max_value=100, step=1)
n_hidden = S.widget(c[1].number_input, "Hidden units", "train_hidden", 64, min_value=8, max_value=1024, step=8)
epochs = S.widget(c[2].number_input, "Epochs", "train_epochs", 20, min_value=1, max_value=2000, step=10)
if reused is None:
    fraction = S.widget(c[3].number_input, "Held-out fraction", "train_fraction", 0.25, min_value=0.0, max_value=0.9, step=0.05)
else:
    fraction = c[3].number_input("Held-out fraction", value=float(reused.get("fraction", 0.25)), disabled=True,
                                 key="train_fraction_reused", help="The model's own; its held-out conditions are named exactly.")
default_name = "_".join([family, *(str(options[n]) for n in spec.label_options), f"{n_latent}u", f"{epochs}ep"])
name = st.text_input("Run name", default_name, key=f"train_name_{default_name}")

in_process = not registry.is_builtin(family)
if in_process:
    st.caption(f"{spec.label} was registered in this server process: its runs train on a thread of the server "
               "(they survive page changes, not a server restart).")
if st.button("Start training", type="primary", key="train_start", disabled=refused):
    hp = {"n_latent": int(n_latent), "n_hidden": int(n_hidden), **options}
    ds = sel.settings
    if ds is not None and ds.likelihood != "auto":
        hp["likelihood"] = ds.likelihood
    job_spec = jobs.JobSpec(
        name=name, data=str(S.jobs_data_path(sel.data_src)), family=family, hparams=hp,
        data_settings=ds.read_kwargs() if ds is not None else {},
        split=reused if reused is not None else {"kind": split_kind, "fraction": float(fraction)}, config={"epochs": int(epochs), "batch_size": 256},
    )
    job = S.guarded(lambda: jobs.submit(S.RUNS_DIR, job_spec, in_process=in_process))
    if job is not None:
        st.toast(f"Started {name}: follow it below; it keeps going if you leave this page.")


def _finished_training(job: Any) -> dict[str, Any]:
    """The finished run's training record (kept epoch, notes) from its bundle; empty before then."""
    if job.state != "done" or not job.model_path.is_file():
        return {}
    try:
        return read_manifest(job.model_path).get("training", {})
    except SamsError:
        return {}


@st.fragment(run_every=2.0)
def job_list() -> None:
    """The runs of this server, newest first: state, progress, ETA, live loss curve, log, cancel."""
    listed = jobs.list_jobs(S.RUNS_DIR)
    finished = {j.id for j in listed if j.state == "done"}
    seen = st.session_state.setdefault("jobs_seen_done", finished)
    if finished - seen:  # a run just finished: redraw the whole page so the sidebar lists its model
        st.session_state["jobs_seen_done"] = finished
        st.rerun(scope="app")
    st.subheader("Training jobs")
    if not listed:
        st.caption("No runs yet.")
        return
    for job in listed[:20]:
        recs = job.progress()
        last = recs[-1] if recs else None
        total = last["total_epochs"] if last else job.spec.config.get("epochs", 1)
        head = f"**{job.spec.name}** · {job.spec.family} · {job.created.replace('T', ' ')} · {job.state}"
        with st.expander(head, expanded=job.state in ("queued", "running") or job is listed[0]):
            st.caption(f"Screen: {job.spec.data} · folder: {job.path}")
            if job.state == "running":
                done = last["epoch"] if last else 0
                eta = job.eta_seconds()
                st.progress(min(1.0, done / max(total, 1)),
                            text=f"epoch {done}/{total}" + (f" · about {eta:.0f} s left" if eta is not None else ""))
                if st.button("Cancel", key=f"cancel_{job.id}"):
                    jobs.cancel(job)
            elif job.state == "queued":
                st.info("Waiting for the run before it to finish.")
            elif job.state == "failed":
                st.error(job.error or "The run failed; see its log.")
            elif job.state == "done":
                st.success(f"Done: choose **{S.run_label(job)}** as the model in the sidebar.")
            if recs:
                training = _finished_training(job)
                st.plotly_chart(plots.history_figure(recs, f"Training loss · {job.spec.name}", training.get("best_epoch")),
                                width="stretch", key=f"job_hist_{job.id}_{len(recs)}")
                for note in training.get("notes") or []:
                    st.caption(note)
            log = job.log()
            if log:
                st.code(log[-2000:], language=None)


job_list()
