"""Dose-response: one perturbation's predicted effect over dosages, with intervals, as a figure."""

from __future__ import annotations

import numpy as np
import pytest

from sams_core import plots
from sams_core.demo import DEMOS
from sams_core.errors import SamsError
from sams_core.interpret.dose import dose_response
from sams_core.interpret.effects import predict_effect
from sams_core.io.bundle import load_bundle


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEMOS["simulated"].bundle_paths()["sams_vae_correlated"])


def test_the_curve_starts_at_no_effect_grows_with_dosage_and_matches_compose_at_dosage_1(bundle):
    pert = bundle.perturbations[0]
    r = dose_response(bundle, pert, doses=[0, 0.5, 1, 2], top_k=4, n_globals=10, n_per_global=4)
    assert list(r.doses) == [0, 0.5, 1, 2] and len(r.genes) == 4
    assert np.all(r.mean[0] == 0) and r.norm[0] == 0
    assert r.norm[1] < r.norm[2] < r.norm[3]  # twice the dosage moves the cells further
    assert np.all(r.lower <= r.mean + 1e-9) and np.all(r.mean <= r.upper + 1e-9)
    assert np.all(r.upper[1:] > r.lower[1:])  # an interval, not a point
    # at the measured dosage it is what Compose shows for the perturbation
    p = predict_effect(bundle, pert, n_globals=10, n_per_global=4)
    cols = [bundle.genes.index(g) for g in r.genes]
    np.testing.assert_allclose(r.mean[2], p.mean[cols], rtol=1e-5, atol=1e-6)
    # the genes shown are those it moves most at dosage 1
    assert set(r.genes) == {bundle.genes[j] for j in np.argsort(-np.abs(p.mean))[:4]}


def test_the_figure_draws_a_line_and_a_band_per_gene(bundle):
    r = dose_response(bundle, bundle.perturbations[1], doses=np.linspace(0, 2, 5), genes=bundle.genes[:3],
                      n_globals=5, n_per_global=2)
    assert r.genes == bundle.genes[:3]
    fig = plots.dose_response_figure(r.table(), "dose")
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == bundle.genes[:3]
    assert list(lines[0].x) == [0, 0.5, 1, 1.5, 2]
    assert sum(t.fill == "toself" for t in fig.data) == 3


@pytest.mark.parametrize("pert, doses, match", [
    ("nope", [0, 1], "not a perturbation"),
    (None, [1], "at least two"),
    (None, [-1, 1], "at least two"),
    (None, ["a", 1], "must be numbers"),
])
def test_bad_requests_are_refused_with_a_reason(bundle, pert, doses, match):
    with pytest.raises(SamsError, match=match):
        dose_response(bundle, pert or bundle.perturbations[0], doses=doses, n_globals=2, n_per_global=2)


def test_the_compose_page_draws_the_dose_response_on_request():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file("../pages/4_Compose.py", default_timeout=180)
    at.query_params["demo"] = "simulated"
    at.run()
    before = len(at.get("plotly_chart"))
    at.toggle(key="w_dose_on").set_value(True).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    charts = at.get("plotly_chart")
    assert len(charts) == before + 1
    assert '"measured dosage"' in charts[-1].proto.spec and "Dose-response" in charts[-1].proto.spec
