"""Compose: predict any combination (with dosages), with uncertainty, against data and baselines."""

from __future__ import annotations

import streamlit as st

from explorer import state as S
from sams_core import plots
from sams_core.interpret.effects import MAX_PAIRS, REFINE_TOP, candidate_pairs, compare_with_data, rank_unmeasured_pairs
from sams_core.interpret.dose import dose_response
from sams_core.labels import combination_label, split_label


@st.cache_resource(show_spinner=False)
def _ranked() -> dict:
    """Pair rankings of this server process, shared by every session (keyed by model, screen and settings)."""
    return {}


ctx = S.page("Compose")
data, bundle = ctx.data, ctx.bundle
perts = bundle.perturbations
measured = set(ctx.measured())
held = set(bundle.split_spec.get("test_conditions", []))
combos = data.combinations()
first = min(held) if held else (combos[0] if combos else perts[0])
default = [m for m in split_label(first) if m in perts] or perts[:1]

c1, c2 = st.columns([2, 1])
members = S.widget(c1.multiselect, "Perturbations", "compose_members", default, perts,
                   help="Any combination, measured or not")
level = S.widget(c2.slider, "Credible level", "compose_level", 0.9, min_value=0.5, max_value=0.99, step=0.01)
if not members:
    st.info("Pick at least one perturbation.")
    st.stop()
dcols = st.columns(min(len(members), 6))
dose = {}
for i, m in enumerate(members):
    dose[m] = S.widget(dcols[i % len(dcols)].number_input, f"Dosage {m}", f"compose_dose_{m}", 1.0,
                       min_value=0.0, max_value=5.0, step=0.25)
dose = {m: float(v) for m, v in dose.items() if v > 0}
if not dose:
    st.info("All dosages are 0: that is the control.")
    st.stop()

# a model trained with covariates predicts in one level of its primary covariate (or pooled)
covariates = getattr(bundle, "covariates", None) or {}
cov_level = None
where = ""
if covariates:
    cov_name, cov_levels = next(iter(covariates.items()))
    combo_label = combination_label(dose, perts)
    counts = S.cells_per_level(ctx.data_key, data)
    auto = S.measured_level(counts, combo_label, list(dose), list(cov_levels))
    ss = st.session_state
    # the default follows the combination (where it was measured most) until a level is picked
    if "w_compose_covariate" in ss and ss.get("compose_covariate_for") != combo_label and not ss.get("compose_covariate_picked"):
        ss["w_compose_covariate"] = auto
    ss["compose_covariate_for"] = combo_label
    picked = S.widget(st.selectbox, f"Predict in which {cov_name}", "compose_covariate", auto, list(cov_levels) + [S.POOLED_LEVEL],
                      on_change=lambda: ss.__setitem__("compose_covariate_picked", True),
                      help=f"The model was trained with {cov_name} as a covariate: its prediction (and the observed effect "
                           f"beside it) is for the cells of one {cov_name}, or '{S.POOLED_LEVEL}' for the levels mixed at "
                           "their shares of the training cells (the observed effect then averages the levels by cells). "
                           f"Default: the {cov_name} where these perturbations were measured most.")
    cov_level = None if picked == S.POOLED_LEVEL else picked
    where = f" in {cov_level}" if cov_level else f" pooled over {cov_name}"

pred = S.guarded(lambda: S.predict(ctx.model_key, bundle, tuple(sorted(dose.items())), float(level), cov_level))
if pred is None:
    st.stop()
table = pred.table()
label = pred.label  # canonical at unit dosages, so it matches the screen's labels
if cov_level is not None:
    held_pairs = {(str(c), str(lv)) for c, lv in bundle.split_spec.get("test_pairs", [])}
    n_here = int(counts.at[label, cov_level]) if label in counts.index and cov_level in counts.columns else 0
    status = ("held out (test)" if (label, cov_level) in held_pairs or (not held_pairs and label in held and n_here)
              else f"measured (train/val), {n_here:,} cells" if n_here else f"not measured in {cov_level}")
else:
    held_in = sorted({str(lv) for c, lv in bundle.split_spec.get("test_pairs", []) if str(c) == label})
    status = (f"held out (test) in {', '.join(held_in)}" if held_in else "held out (test)") if label in held else (
        "measured (train/val)" if label in measured else "not measured")
st.subheader(f"{pred.label}{where} — {status}")
m = st.columns(4)
m[0].metric("Interaction score", f"{pred.interaction_score:.3f}", help="‖combination − sum of singles‖ / ‖combination‖ (0 = additive)")
m[1].metric("Effect norm", f"{pred.effect_norm:.2f}")
m[2].metric("Mean interval width", f"{pred.mean_interval_width:.3f}")
m[3].metric("Genes with interval excluding 0", pred.n_genes_excluding_zero)

a, b = st.columns(2)
with a:
    S.chart(plots.top_genes_bar(table, 20, title=f"Top genes · {pred.label}{where} ({level:.0%} interval)"),
            f"{pred.label}{where}_top_genes", "compose_top")
with b:
    S.chart(plots.effect_volcano(table, title=f"Effect vs uncertainty · {pred.label}{where}"), f"{pred.label}{where}_volcano", "compose_volcano")

a, b = st.columns(2)
with a:
    S.chart(plots.latent_shift_bar(pred.latent_shift, f"Latent shift · {pred.label}{where}"), f"{pred.label}{where}_latent_shift", "compose_shift")
with b:
    obs = S.observed(ctx.data_key, data, cov_level)
    cmp = compare_with_data(pred, obs)
    if "observed" in cmp:
        S.chart(plots.observed_vs_predicted(cmp["observed"].to_numpy(), pred.mean, pred.genes, f"{pred.label}{where}<br>observed vs predicted"),
                f"{pred.label}{where}_observed_vs_predicted", "compose_obs")
        if cov_level:
            st.caption(f"Observed: the {cov_level} cells of {pred.label} against the {cov_level} controls.")
        elif covariates:
            st.caption(f"Observed: each {cov_name}'s cells against its own controls, averaged over the levels by cells.")
    else:
        st.info(f"{pred.label} was not measured{where if cov_level else ''}, so there is no observed effect to compare with.")
    for note in obs.attrs.get("notes", []) or []:
        st.caption(note)

if len(dose) > 1:
    st.markdown("**Against the sum of singles and the additive-in-data baseline**")
    a, b = st.columns(2)
    with a:
        S.chart(plots.observed_vs_predicted(cmp["sum of predicted singles"].to_numpy(), pred.mean, pred.genes, f"Sum of singles vs combination{where}",
                                            x_title="sum of predicted singles (log2 FC)"), f"{pred.label}_vs_sum_of_singles", "compose_sum")
    with b:
        if "additive in data" in cmp:
            S.chart(plots.observed_vs_predicted(cmp["additive in data"].to_numpy(), pred.mean, pred.genes, f"Additive-in-data vs model{where}",
                                                x_title="sum of observed singles (log2 FC)"), f"{pred.label}_vs_additive", "compose_add")
    with st.expander("Per-gene table"):
        S.show_table(cmp.merge(table, on="gene"), f"{pred.label}_comparison", "compose_cmp", height=300)
else:
    with st.expander("Per-gene table"):
        S.show_table(table, f"{pred.label}_effects", "compose_table", height=300)

st.subheader("Which pair to measure next")
singles, n_candidates = candidate_pairs(bundle, sorted(measured))
st.caption(f"{n_candidates:,} unmeasured pairs of {len(singles):,} measured singles, ranked by predicted interaction, "
           "then by uncertainty. Every pair is scored with the same (paired) posterior draws, so differences between "
           f"pairs are not Monte-Carlo noise. Above {MAX_PAIRS:,} pairs, those whose members' latent shifts overlap most "
           "are scored; the top ones are refined with full posterior draws and a 90 % interval."
           + (f" The ranking is pooled over {cov_name} (its levels at their training shares), whichever {cov_name} is picked above."
              if covariates else ""))
if S.widget(st.toggle, "Rank unmeasured pairs", "compose_rank", n_candidates <= 500):
    c1, c2 = st.columns(2)
    n_score = S.widget(c1.number_input, "Pairs to score", "compose_rank_pairs", min(MAX_PAIRS, max(n_candidates, 1)),
                       min_value=1, max_value=max(n_candidates, 1), step=1000,
                       help="A first pass at the posterior-mean model; more pairs take longer (about 1 s per 1,000 on 2 cores).")
    n_refine = S.widget(c2.number_input, "Pairs to refine", "compose_rank_refine", min(REFINE_TOP, max(n_candidates, 1)),
                        min_value=0, max_value=max(n_candidates, 1), step=50,
                        help="The strongest pairs of the first pass, scored again with full posterior draws (interval, uncertainty).")
    memo = _ranked()
    key = (ctx.model_key, ctx.data_key, int(n_score), int(n_refine))
    if key not in memo:
        bar = st.progress(0.0, text="Ranking pairs…")
        memo[key] = S.guarded(lambda: rank_unmeasured_pairs(bundle, sorted(measured), max_pairs=int(n_score), refine=int(n_refine),
                                                            progress=lambda msg, f: bar.progress(min(max(float(f), 0.0), 1.0), text=msg)))
        bar.empty()
        while len(memo) > 20:
            memo.pop(next(iter(memo)))
    pairs = memo[key]
    if pairs is not None:
        S.show_table(pairs, "unmeasured_pairs", "compose_pairs", height=300)


@st.cache_resource(show_spinner=False)
def _dose_curves() -> dict:
    """Dose-response curves of this server process, shared by every session (by model and request)."""
    return {}


with st.expander("Dose-response: one perturbation over a range of dosages"):
    st.caption("The model scales a perturbation's latent shift by its dosage; screens measure dosage 1 (dotted line), so "
               "the curve elsewhere is the model's extrapolation. Every dosage uses the same posterior draws; the bands are "
               f"{level:.0%} credible intervals{where}. Genes: those the perturbation moves most at dosage 1.")
    dc = st.columns(3)
    dose_pert = S.widget(dc[0].selectbox, "Perturbation", "dose_pert", members[0], perts)
    dose_max = S.widget(dc[1].slider, "Largest dosage", "dose_max", 2.0, min_value=0.5, max_value=5.0, step=0.25)
    dose_genes = S.widget(dc[2].slider, "Genes", "dose_genes", 5, min_value=1, max_value=20)
    if S.widget(st.toggle, "Draw the dose-response", "dose_on", False, help="About a second per curve on two cores."):
        doses = tuple(round(k * float(dose_max) / 8, 4) for k in range(9))
        memo = _dose_curves()
        key = (ctx.model_key, dose_pert, doses, int(dose_genes), float(level), cov_level)
        if key not in memo:
            with st.spinner("Predicting each dosage…"):
                memo[key] = S.guarded(lambda: dose_response(bundle, dose_pert, doses=doses, top_k=int(dose_genes),
                                                            level=float(level), covariate_level=cov_level))
            while len(memo) > 50:
                memo.pop(next(iter(memo)))
        curve = memo[key]
        if curve is not None:
            S.chart(plots.dose_response_figure(curve.table(), f"Dose-response · {dose_pert}{where}"), f"{dose_pert}_dose_response", "compose_dose")
