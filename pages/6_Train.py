"""Train: fit a model on the chosen screen with a live loss curve; save it under runs/.

The families, their options and the splits come from the library (the model registry and
``SPLIT_KINDS``): a newly registered family shows up here with its own option widgets.
"""

from __future__ import annotations

import math
import re
from typing import Any

import streamlit as st

from explorer import state as S
from sams_core import plots
from sams_core.data.splits import SPLIT_KINDS
from sams_core.errors import SamsError
from sams_core.models import registry

st.set_page_config(page_title="Train · SAMS Explorer", layout="wide")
st.title("Train")
ctx = S.sidebar()
if ctx is None:
    st.stop()
st.caption(f"Data: {ctx.data_label}")


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
c = st.columns(2)
family = S.widget(c[0].selectbox, "Model family", "train_family", "sams_vae", list(specs), format_func=lambda n: specs[n].label)
split_kind = S.widget(c[1].selectbox, "Split", "train_split", "heldout-combos", SPLIT_KINDS)
spec = specs[family]
st.caption(spec.summary)
options: dict[str, Any] = {}
refused = False
if spec.options:
    c = st.columns(len(spec.options))
    for where, opt in zip(c, spec.options, strict=True):
        try:
            options[opt.name] = opt.validate(option_widget(where, family, opt))
        except SamsError as e:
            where.error(str(e))
            options[opt.name], refused = opt.default, True
c = st.columns(4)
n_latent = S.widget(c[0].number_input, "Latent units", "train_latent", 6, min_value=1, max_value=100, step=1)
n_hidden = S.widget(c[1].number_input, "Hidden units", "train_hidden", 64, min_value=8, max_value=1024, step=8)
epochs = S.widget(c[2].number_input, "Epochs", "train_epochs", 20, min_value=1, max_value=2000, step=10)
fraction = S.widget(c[3].number_input, "Held-out fraction", "train_fraction", 0.25, min_value=0.0, max_value=0.9, step=0.05)
default_name = "_".join([family, *(str(options[n]) for n in spec.label_options), f"{n_latent}u", f"{epochs}ep"])
name = st.text_input("Run name", default_name, key=f"train_name_{default_name}")

if st.button("Start training", type="primary", key="train_start", disabled=refused):
    from sams_core.pipeline import SplitSpec, train_bundle
    from sams_core.training.trainer import TrainConfig

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"
    out = S.RUNS_DIR / f"{safe}.sams"
    bar = st.progress(0.0, text="Starting…")
    live = st.empty()
    hist: list[dict] = []

    def progress(rec) -> None:
        hist.append(rec.as_dict())
        bar.progress(min(1.0, rec.epoch / max(rec.total_epochs, 1)),
                     text=f"epoch {rec.epoch}/{rec.total_epochs} · train loss {rec.train_loss:.2f}"
                     + (f" · val {rec.val_loss:.2f}" if rec.val_loss is not None else ""))
        if rec.epoch == rec.total_epochs or rec.epoch % max(1, rec.total_epochs // 20) == 0:
            live.plotly_chart(plots.history_figure(hist, "Training loss (live)"), width="stretch", key=f"train_live_{rec.epoch}")

    try:
        data = S._plain_data(ctx.data_key, ctx.adata)
        hp = {"n_latent": int(n_latent), "n_hidden": int(n_hidden), **options}
        S.RUNS_DIR.mkdir(parents=True, exist_ok=True)
        bundle, result, ev = train_bundle(data, family, SplitSpec(split_kind, float(fraction)), TrainConfig(epochs=int(epochs), batch_size=256),
                                          out, progress=progress, n_ate_samples=500, **hp)
    except SamsError as e:
        st.error(str(e))
    except Exception as e:  # noqa: BLE001
        st.error(f"Training failed: {type(e).__name__}: {e}")
    else:
        bar.progress(1.0, text=f"Done in {result.seconds:.1f} s (best epoch {result.best_epoch})")
        st.success(f"Saved {out} — choose **runs/{out.name}** as the model in the sidebar.")
        if ev is not None and not ev.metrics.empty:
            S.show_table(ev.metrics.reset_index(), f"{safe}_metrics", "train_metrics")
        ss = st.session_state
        ss["train_last"] = f"runs/{out.name}"

runs = S.run_bundles()
if runs:
    st.subheader("Saved runs")
    st.write(", ".join(runs))
    if st.session_state.get("train_last") in runs and st.button(f"Open {st.session_state['train_last']}", key="train_open"):
        st.session_state.pop("w_model", None)
        S.remember("model", st.session_state["train_last"])
        st.switch_page("pages/0_Home.py")
