"""Every page of the dashboard runs on the shipped demo, shows its charts, reacts to its widgets
and turns bad uploads into messages (streamlit.testing AppTest)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from explorer import jobs

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "screen.h5ad").exists(), reason="demo not built (python -m sams_core build-demo)")


def run(page: str, timeout: int = 120) -> AppTest:
    """``page`` on the simulated demo (its answer key is what several tests look for)."""
    at = AppTest.from_file(str(ROOT / page), default_timeout=timeout)
    at.query_params["demo"] = "simulated"
    return at.run()


def ok(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.fixture
def fast_umap(monkeypatch, tmp_path):
    """umap-learn compiles with numba on first use (~30 s): a linear stand-in keeps this file fast."""
    import umap

    class FakeUMAP:
        def __init__(self, **kw):
            pass

        def fit_transform(self, z):
            z = z - z.mean(0)
            return np.linalg.svd(z, full_matrices=False)[0][:, :2] * 10

    monkeypatch.setattr(umap, "UMAP", FakeUMAP)
    monkeypatch.setenv("SAMS_CACHE_DIR", str(tmp_path))
    import sams_core.interpret.embed as embed

    monkeypatch.setattr(embed, "DEFAULT_CACHE", tmp_path)
    defaults = list(embed.umap_embedding.__defaults__)
    defaults[-2] = tmp_path  # cache_dir
    monkeypatch.setattr(embed.umap_embedding, "__defaults__", tuple(defaults))


def test_home_summary_and_query_params():
    at = run("app.py")
    ok(at)
    assert at.title[0].value == "SAMS Explorer"
    assert len(at.get("plotly_chart")) >= 1
    labels = [m.label for m in at.metric]
    assert "Cells" in labels and "Combinations" in labels
    assert at.query_params["dataset"] == ["demo"] or at.query_params["dataset"] == "demo"
    assert "SAMS-VAE" in " ".join(s.value for s in at.subheader)


def test_query_params_reopen_view():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params["model"] = "svae_plus"
    at.run()
    ok(at)
    assert at.selectbox(key="w_model").value == "svae_plus"


def test_bad_upload_shows_error():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params["dataset"] = "upload"
    at.session_state["upload_data"] = ("screen.h5ad", (DEMO / "screen.h5ad").read_bytes())
    at.session_state["upload_models"] = {"broken.sams": b"this is not a bundle"}
    at.run()
    assert not at.exception
    assert at.error, "a broken bundle must show an error"
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params["dataset"] = "upload"
    at.session_state["upload_data"] = ("bad.h5ad", b"not hdf5 at all")
    at.session_state["upload_models"] = {"m.sams": (DEMO / "cpa_vae.sams").read_bytes()}
    at.run()
    assert not at.exception
    assert at.error and "h5ad" in at.error[0].value


def test_masks_page():
    at = run("pages/1_Masks.py")
    ok(at)
    assert len(at.get("plotly_chart")) >= 3  # model masks + embeddings + truth
    # masks still switching as training ended are said, exactly when the bundle's history shows it
    from sams_core.io.bundle import load_bundle

    expected = load_bundle(DEMO / f"{at.selectbox(key='w_model').value}.sams").mask_settling_note()
    shown = [i.value for i in at.info if "still switching" in i.value or "too short" in i.value]
    assert shown == ([expected] if expected else []), shown
    at.selectbox(key="w_masks_pert").select("SPI1").run()
    ok(at)
    assert at.subheader[0].value == "SPI1"


def test_latent_page(fast_umap):
    at = run("pages/2_Latent_space.py")
    ok(at)
    assert len(at.get("plotly_chart")) == 1
    assert at.get("progress")
    at.selectbox(key="w_latent_color").select("unit value").run()
    ok(at)
    assert at.selectbox(key="w_latent_unit") is not None
    for mode, key in (("gene expression", "w_latent_gene"), ("predicted effect", "w_latent_gene"),
                      ("highlight a perturbation", "w_latent_highlight")):
        at.selectbox(key="w_latent_color").select(mode).run()
        ok(at)
        assert at.selectbox(key=key).options, mode
    assert "raw_perturbation" not in " ".join(at.selectbox(key="w_latent_color").options)
    at.selectbox(key="w_latent_color").select("perturbation cluster").run()  # cells grouped by their perturbation's cluster
    ok(at)
    import json

    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = {t.get("name", "") for t in fig["data"]}
    assert any(n.startswith("cluster ") for n in names) and "control" in " ".join(names), names


def test_gene_programs_page():
    at = run("pages/3_Gene_programs.py")
    ok(at)
    assert len(at.get("plotly_chart")) >= 2  # top genes + enrichment heatmap (simulated programs)
    at.selectbox(key="w_gp_unit").select(3).run()
    ok(at)
    # GO sets on a screen of synthetic gene ids: a warning that says why and what to do, no error box
    at.selectbox(key="w_gp_collection").select("go_bp").run()
    ok(at)
    assert not at.error and any("human gene symbols" in w.value for w in at.warning), [w.value for w in at.warning]
    assert len(at.get("plotly_chart")) >= 1  # the unit's top genes are still shown


def test_compose_changes_with_combination():
    at = run("pages/4_Compose.py")
    ok(at)
    assert len(at.get("plotly_chart")) >= 4
    first = at.subheader[0].value
    norm1 = at.metric[1].value  # effect norm of the first combination
    at.multiselect(key="w_compose_members").set_value(["GATA1", "SPI1"]).run()
    ok(at)
    assert at.subheader[0].value != first
    assert at.metric[1].value != norm1
    assert at.dataframe  # the ranked unmeasured pairs


def test_compare_page():
    at = run("pages/5_Compare.py", timeout=180)
    ok(at)
    assert at.get("plotly_chart")
    df = at.dataframe[0].value
    assert {"no change", "additive in data"} <= set(df["name"])
    assert "mask_f1" in df.columns


REAL = ROOT / "assets" / "demo_real"


@pytest.mark.skipif(not (REAL / "screen.h5ad").exists(), reason="real demo not built (python -m sams_core build-demo)")
def test_compose_on_the_real_demo_predicts_in_the_chosen_cell_type():
    at = AppTest.from_file(str(ROOT / "pages/4_Compose.py"), default_timeout=180)
    at.query_params["demo"] = "real"
    at.query_params["compose_members"] = "MAP2K3"
    at.query_params["compose_rank"] = "false"  # the pair ranking is not what this test looks at
    at.run()
    ok(at)
    picker = at.selectbox(key="w_compose_covariate")
    assert picker.label == "Predict in which cell_type"
    assert set(picker.options) == {"A172", "T98G", "U87MG", "k562", "pooled (training shares)"}
    first, norm = picker.value, at.metric[1].value
    assert first != "k562"  # MAP2K3 is a glioma-line perturbation: the default is a glioma line, where it was measured most
    assert at.subheader[0].value.startswith(f"MAP2K3 in {first}")
    assert any(f"the {first} cells of MAP2K3 against the {first} controls" in c.value for c in at.caption)
    other = next(lv for lv in ("A172", "T98G", "U87MG") if lv != first)
    picker.select(other).run()
    ok(at)
    assert at.subheader[0].value.startswith(f"MAP2K3 in {other}")
    assert at.metric[1].value != norm  # the effect predicted in another cell line differs
    titles = [json.loads(c.proto.spec)["layout"].get("title", {}).get("text", "") for c in at.get("plotly_chart")]
    assert any(f"MAP2K3 in {other}" in t for t in titles), titles  # the charts say which cell line
    at.selectbox(key="w_compose_covariate").select("pooled (training shares)").run()
    ok(at)
    assert "pooled over cell_type" in at.subheader[0].value


@pytest.mark.skipif(not (REAL / "screen.h5ad").exists(), reason="real demo not built (python -m sams_core build-demo)")
def test_compare_on_the_real_demo_shows_scores_per_cell_type():
    at = AppTest.from_file(str(ROOT / "pages/5_Compare.py"), default_timeout=240)
    at.query_params["demo"] = "real"
    at.run()
    ok(at)
    assert "Per cell_type (held-out cells)" in [s.value for s in at.subheader]
    per = at.dataframe[1].value
    assert {"model", "level", "n_conditions", "reliable"} <= set(per.columns)
    assert {"U87MG", "k562"} <= set(per["level"])  # the held-out glioma line and the held-out Norman pairs
    assert {"no change", "additive in data"} <= set(per.loc[per["level"] == "k562", "name"])  # baselines per level too
    add_u87 = per[(per["name"] == "additive in data") & (per["level"] == "U87MG")].iloc[0]
    assert add_u87["n_conditions"] == 0 and not add_u87["reliable"]  # held-out in U87MG: nothing of U87MG to add up
    assert set(per.loc[per["n_conditions"] < 3, "reliable"]) <= {False} and per.loc[per["n_conditions"] >= 3, "reliable"].all()
    assert any("Unreliable" in w.value and "sVAE+ in k562" in w.value for w in at.warning)  # sVAE+ cannot predict the pairs
    at.selectbox(key="w_compare_level").select("U87MG").run()
    ok(at)
    assert set(at.dataframe[1].value["level"]) == {"U87MG"}
    assert len(at.get("plotly_chart")) == 2  # the pooled bars and the bars of U87MG


def test_train_page_trains_and_saves(tmp_path, monkeypatch):
    from explorer import state as app_state

    monkeypatch.setattr(app_state, "RUNS_DIR", tmp_path)
    at = run("pages/6_Train.py")
    ok(at)
    at.selectbox(key="w_train_family").select("cpa_vae").run()
    at.number_input(key="w_train_epochs").set_value(2).run()
    at.button(key="train_start").click().run()
    ok(at)
    (job,) = jobs.list_jobs(tmp_path)
    done = jobs.wait(job, timeout=300)
    assert done.state == "done", done.log()
    at.run()
    ok(at)
    assert at.success  # the job list says where the model is
    runs = app_state.run_bundles()
    assert any(name.startswith("run: cpa_vae") for name in runs), (runs, done.spec.name)


def test_a_screen_without_a_model_opens_on_home(tmp_path, screen):
    adata, _ = screen
    path = tmp_path / "mine.h5ad"
    adata.write_h5ad(path)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params["dataset"] = "path"
    at.query_params["data_path"] = str(path)
    at.run()
    ok(at)
    labels = [m.label for m in at.metric]
    assert "Cells" in labels
    assert any("No model for this screen yet" in i.value for i in at.info)


def own_screen(tmp_path, screen):
    """The toy screen as a user's own: a ``condition`` column with ``ctrl`` controls, real gene
    symbols and a ``cell_type`` covariate."""
    adata, _ = screen
    a = adata.copy()
    a.obs["condition"] = a.obs.pop("perturbation").replace({"control": "ctrl"})
    a.obs["cell_type"] = np.where(np.arange(a.n_obs) % 3 == 0, "erythroid", "myeloid")
    a.var_names = ["HBB", "GATA1", "KLF1", "SPI1", "CEBPA", *[f"MT{i}" for i in range(a.n_vars - 5)]]
    path = tmp_path / "own.h5ad"
    a.write_h5ad(path)
    return path


def open_path(path, model_path: str = "", page: str = "app.py", **params) -> AppTest:
    """``page`` (the app, or one page run on its own) on the screen at ``path``."""
    at = AppTest.from_file(str(ROOT / page), default_timeout=120)
    at.query_params["dataset"] = "path"
    at.query_params["data_path"] = str(path)
    at.query_params["model_path"] = model_path
    for k, v in params.items():
        at.query_params[k] = v
    return at.run()


def test_home_shows_the_detected_data_settings_with_their_cli_flags(tmp_path, screen):
    at = open_path(own_screen(tmp_path, screen))
    ok(at)
    text = " ".join(m.value for m in at.markdown)
    assert "perturbation column `condition`" in text and "`ctrl`" in text and "cell_type (2 levels)" in text
    assert any("--perturbation-key condition" in c.value and "--control-label ctrl" in c.value for c in at.code)
    assert at.selectbox(key="w_ds_key").value == "condition"
    assert "raw_perturbation" not in at.multiselect(key="w_ds_cov").options
    counts = {m.label: m.value for m in at.metric}
    assert counts["Combinations"] == "3" and counts["Perturbations"] == "6"


def test_edited_data_settings_change_the_counts(tmp_path, screen):
    """A separator that is not in the labels reads every combination as a perturbation of its own."""
    at = open_path(own_screen(tmp_path, screen), ds_sep="|")
    ok(at)
    counts = {m.label: m.value for m in at.metric}
    assert counts["Perturbations"] == "9"
    assert any("--separator '|'" in c.value for c in at.code)


def test_a_bundle_from_another_screen_is_refused(tmp_path, screen):
    at = open_path(own_screen(tmp_path, screen), str(DEMO / "cpa_vae.sams"), "pages/1_Masks.py")
    assert not at.exception
    assert any("trained on another screen" in e.value for e in at.error), [e.value for e in at.error]


def test_svae_plus_says_why_it_cannot_compose_on_every_page():
    for page in ("app.py", "pages/1_Masks.py", "pages/3_Gene_programs.py"):
        at = AppTest.from_file(str(ROOT / page), default_timeout=120)
        at.query_params["model"] = "svae_plus"
        at.run()
        ok(at)
        assert any("cannot compose a pair it never saw" in i.value for i in at.info), page


def test_differential_expression_page_on_a_screen_without_a_model(tmp_path, screen):
    at = open_path(own_screen(tmp_path, screen), page="pages/7_Differential_expression.py", de_method="t-test")
    ok(at)
    assert at.selectbox(key="w_de_cond").value == "CEBPA"  # singles first, sorted
    assert len(at.get("plotly_chart")) == 1  # the volcano; the map needs a model
    df = at.dataframe[0].value
    assert df["pval_adj"].is_monotonic_increasing and df["pval_adj"].iloc[0] < 1e-3
    assert any("No model for this screen" in i.value for i in at.info)


def test_differential_expression_page_maps_the_models_perturbations():
    at = AppTest.from_file(str(ROOT / "pages/7_Differential_expression.py"), default_timeout=180)
    at.query_params["demo"] = "simulated"
    at.query_params["de_method"] = "t-test"
    at.run()
    ok(at)
    assert len(at.get("plotly_chart")) == 2
    table = at.dataframe[1].value
    assert {"perturbation", "x", "y", "cluster"} <= set(table.columns) and table.cluster.nunique() >= 2


def test_train_page_trains_with_the_sidebars_data_settings(tmp_path, screen, monkeypatch):
    from explorer import state as app_state

    monkeypatch.setattr(app_state, "RUNS_DIR", tmp_path / "runs")
    at = open_path(own_screen(tmp_path, screen), page="pages/6_Train.py", ds_lik="poisson", ds_cov="cell_type")
    ok(at)
    assert any("--likelihood poisson" in c.value for c in at.caption)
    at.number_input(key="w_train_epochs").set_value(1).run()
    at.button(key="train_start").click().run()
    ok(at)
    (job,) = jobs.list_jobs(tmp_path / "runs")
    jobs.cancel(job)
    assert job.spec.data_settings == {"perturbation_key": "condition", "separators": ["+"], "control_labels": ["ctrl"],
                                      "covariate_keys": ["cell_type"]}
    assert job.spec.hparams["likelihood"] == "poisson"
