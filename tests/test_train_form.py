"""The Train page's "same split as model X": a new run holds out exactly the cells X held out."""

from __future__ import annotations

import numpy as np
import pytest

from explorer import jobs, train_form
from sams_core.data.screen import read_h5ad
from sams_core.demo import DEMOS
from sams_core.errors import SamsError
from sams_core.io.bundle import load_bundle
from sams_core.io.manifest import read_manifest
from sams_core.pipeline import SplitSpec, split_for_bundle, train_bundle
from sams_core.training.trainer import TrainConfig


def test_a_run_with_the_same_split_as_a_model_has_its_test_cells(tmp_path, screen_path):
    data = read_h5ad(screen_path)
    # X: a seeded split other than the form's default (seed 0, fraction 0.25)
    x, _, _ = train_bundle(data, "cpa_vae", SplitSpec("heldout-combos", 0.5, seed=3), TrainConfig(epochs=1, seed=0),
                           out=tmp_path / "x.sams", evaluate=False, n_latent=3, n_hidden=16)
    split = train_form.same_split(read_manifest(tmp_path / "x.sams"))
    assert split["heldout"] == x.split_spec["test_conditions"]
    job = jobs.submit(tmp_path / "runs", jobs.JobSpec(name="same", data=str(screen_path), family="cpa_vae",
                                                      hparams={"n_latent": 3, "n_hidden": 16}, split=split,
                                                      config={"epochs": 1, "seed": 0}))
    done = jobs.wait(job, timeout=240)
    assert done.state == "done", done.log()
    y = load_bundle(done.model_path)
    assert y.split_spec["test_conditions"] == x.split_spec["test_conditions"]
    # the very same cells in every set (the seeded split is kept when it holds out the same cells)
    assert np.array_equal(split_for_bundle(y, data), split_for_bundle(x, data))
    assert y.split_spec["n_val"] == x.split_spec["n_val"]
    # the default split of the form would not have held out the same conditions
    assert sorted(set(data.labels[SplitSpec().make(data) == "test"])) != x.split_spec["test_conditions"]


def test_the_real_demos_named_pairs_are_reused_exactly():
    demo = DEMOS["real"]
    path = next(iter(demo.bundle_paths().values()))
    manifest = read_manifest(path)
    split = train_form.same_split(manifest)
    assert split["kind"] == "heldout-covariate" and split["heldout"] == manifest["split"]["test_pairs"]
    data = read_h5ad(demo.data_path, covariate_keys=["cell_type"])
    made = SplitSpec(**split).make(data)
    assert np.array_equal(made == "test", split_for_bundle(load_bundle(path), data) == "test")
    assert int((made == "test").sum()) == manifest["split"]["n_test"]
    # read without the covariate, the page warns that the split will not be the same
    assert "covariates cell_type" in train_form.settings_mismatch(manifest, {"perturbation_key": "perturbation"})
    assert train_form.settings_mismatch(manifest, {"perturbation_key": "perturbation", "separators": ["+"],
                                                   "covariate_keys": ["cell_type"]}) is None


def test_a_model_without_a_recorded_split_is_refused_with_a_reason():
    with pytest.raises(SamsError, match="records no split"):
        train_form.same_split({"data": {}})


def test_the_train_page_submits_the_chosen_models_split(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from explorer import state as app_state

    monkeypatch.setattr(app_state, "RUNS_DIR", tmp_path)
    at = AppTest.from_file("../pages/6_Train.py", default_timeout=120)
    at.query_params["demo"] = "simulated"
    at.run()
    box = at.selectbox(key="w_train_same_split")
    name = box.options[1]
    box.select(name).run()
    assert not at.exception and not at.error
    shown = at.selectbox(key="train_split_reused")
    assert shown.disabled and shown.value == read_manifest(app_state.demo_bundles("simulated")[name][0])["split"]["kind"]
    at.button(key="train_start").click().run()
    (job,) = jobs.list_jobs(tmp_path)
    jobs.cancel(job)
    manifest = read_manifest(app_state.demo_bundles("simulated")[name][0])
    assert job.spec.split == train_form.same_split(manifest) and job.spec.split["heldout"]
