"""The model registry: each family declared once; the command line, the Train page and the labels
read it, so a family registered here (a toy) appears in ``train --help`` and on the Train page
without editing either, and its options reach the model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from explorer import jobs
from sams_core.cli import _parser, main
from sams_core.errors import SamsError
from sams_core.io.bundle import load_bundle
from sams_core.io.manifest import model_label
from sams_core.models import registry
from sams_core.models.conditional_vae import ConditionalVAE
from sams_core.models.registry import Capabilities, FamilySpec, Option

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"


class ToyVAE(ConditionalVAE):
    """A conditional VAE with one option of its own, ``wobble`` (recorded, not used)."""

    family = "toy_vae"

    def __init__(self, n_genes: int, n_perturbations: int, *, wobble: float = 0.5, **common: Any):
        super().__init__(n_genes, n_perturbations, wobble=wobble, **common)
        self.wobble = wobble


TOY = FamilySpec(
    name="toy_vae",
    label="Toy VAE",
    summary="A conditional VAE with a wobble, registered by a test.",
    class_path="",
    options=(Option("wobble", float, 0.5, "how much the toy wobbles", low=0.0, flag="--toy-wobble"),),
    capabilities=Capabilities(has_masks=False, composes_unseen_combinations=True),
    label_options=("wobble",),
)


@pytest.fixture
def toy():
    spec = registry.register(TOY, ToyVAE)
    try:
        yield spec
    finally:
        registry.unregister("toy_vae")


def train_help() -> str:
    return _parser()._subparsers._group_actions[0].choices["train"].format_help()


# ---- the built-in families ------------------------------------------------------------------

def test_builtin_families_and_derived_names():
    names = [s.name for s in registry.families()]
    assert names == ["sams_vae", "cpa_vae", "conditional_vae", "vae", "svae_plus"]
    assert registry.FAMILIES == tuple(names)
    assert dict(registry.FAMILY_LABELS) == {s.name: s.label for s in registry.families()}
    assert registry.get("svae_plus").capabilities.one_condition_per_cell
    assert not registry.get("vae").capabilities.composes_unseen_combinations
    with pytest.raises(SamsError, match="Unknown model family 'nope'. Choose one of: sams_vae"):
        registry.get("nope")


@pytest.mark.parametrize("family", ["sams_vae", "cpa_vae", "conditional_vae", "vae", "svae_plus"])
def test_declared_options_and_capabilities_match_the_models(family):
    """Defaults in the registry are the ones the model takes when the option is not given."""
    spec = registry.get(family)
    model = registry.build_model(family, n_genes=6, n_perturbations=3, n_latent=2, n_hidden=4)
    for opt in spec.options:
        assert model.hparams[opt.name] == opt.default, opt.name
    assert model.has_masks == spec.capabilities.has_masks == (model.mask_probs() is not None)
    assert model.composes == spec.capabilities.composes_unseen_combinations


def test_labels_come_from_the_registry():
    assert model_label({"family": "sams_vae", "hparams": {"guide": "correlated"}}) == "SAMS-VAE (correlated)"
    assert model_label({"family": "cpa_vae", "hparams": {"guide": "correlated"}}) == "CPA-VAE"
    assert registry.label("svae_plus", {}) == "sVAE+"
    assert model_label({"family": "from_the_future"}) == "from_the_future"
    assert model_label({}) == "?"


def test_options_check_values_and_name_the_fix():
    align = registry.get("sams_vae").option("align_at")
    assert align.parse("none") is None and align.parse("0.5") == 0.5
    with pytest.raises(SamsError, match=r"align_at \(--align-at\) must be a number in \[0, 1\) or none, got 1.5"):
        align.validate(1.5)
    with pytest.raises(SamsError, match="mask_prior"):
        registry.build_model("sams_vae", n_genes=6, n_perturbations=3, mask_prior=0.0)
    with pytest.raises(SamsError, match="one of mean-field, correlated"):
        registry.build_model("cpa_vae", n_genes=6, n_perturbations=3, guide="diagonal")
    assert registry.get("sams_vae").check({"global_weight": 10})["global_weight"] == 10.0


def test_register_refuses_clashes(toy):
    with pytest.raises(SamsError, match="already registered"):
        registry.register(TOY, ToyVAE)
    clash = FamilySpec("clash", "Clash", "A family whose flag means another option.", "x.y:Z",
                       options=(Option("guide", int, 1, "not a guide", flag="--toy-wobble"),))
    with pytest.raises(SamsError, match="--toy-wobble"):
        registry.register(clash)
    with pytest.raises(SamsError, match="Set family = 'other'"):
        registry.register(FamilySpec("other", "Other", "A class of another family.", ""), ToyVAE)
    assert "clash" not in registry.FAMILY_LABELS and "other" not in registry.FAMILY_LABELS


def test_help_and_registry_load_without_torch():
    code = (
        "import sys\n"
        "from sams_core.models import registry\n"
        "from sams_core.cli import main\n"
        "try:\n"
        "    main(['train', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'train --help imported torch'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--mask-prior" in out.stdout


# ---- a family registered from outside ---------------------------------------------------------

def test_toy_family_appears_in_train_help(toy):
    text = train_help()
    assert "--toy-wobble" in text and "how much the toy wobbles (Toy VAE; default 0.5)" in " ".join(text.split())
    assert "toy_vae" in text and "A conditional VAE with a wobble" in text


def test_cli_passes_the_toy_option_to_the_model(toy, screen_path, tmp_path, capsys):
    out = tmp_path / "toy.sams"
    rc = main(["train", "--data", str(screen_path), "--model", "toy_vae", "--toy-wobble", "0.9", "--epochs", "1",
               "--latent", "2", "--hidden", "8", "--batch-size", "256", "--no-eval", "--device", "cpu", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    bundle = load_bundle(out)
    assert isinstance(bundle.model, ToyVAE) and bundle.model.wobble == 0.9
    assert bundle.manifest["hparams"]["wobble"] == 0.9
    assert bundle.label == "Toy VAE (0.9)"
    # another family's flag is refused, naming the family that takes it
    assert main(["train", "--data", str(screen_path), "--model", "cpa_vae", "--toy-wobble", "0.3",
                 "--epochs", "1", "--out", str(tmp_path / "x.sams")]) == 2
    assert "--toy-wobble is an option of Toy VAE, not of CPA-VAE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", str(screen_path), "--model", "toy_vae", "--toy-wobble", "-1", "--out", str(out)])
    assert "must be a number in [0, inf)" in capsys.readouterr().err


@pytest.mark.skipif(not (DEMO / "screen.h5ad").exists(), reason="demo not built (python -m sams_core build-demo)")
def test_toy_family_appears_on_the_train_page(toy, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from explorer import state as app_state

    monkeypatch.setattr(app_state, "RUNS_DIR", tmp_path)
    at = AppTest.from_file(str(ROOT / "pages" / "6_Train.py"), default_timeout=120).run()
    assert not at.exception, [e.message for e in at.exception]
    assert "Toy VAE" in at.selectbox(key="w_train_family").options
    at.selectbox(key="w_train_family").select("toy_vae").run()
    assert not at.exception, [e.message for e in at.exception]
    wobble = at.number_input(key="w_train_toy_vae_wobble")
    assert wobble.value == 0.5 and wobble.label == "Wobble"
    assert any("with a wobble" in c.value for c in at.caption)
    wobble.set_value(0.7).run()
    at.number_input(key="w_train_epochs").set_value(1).run()
    at.button(key="train_start").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    (job,) = jobs.list_jobs(tmp_path)
    assert job.spec.name.startswith("toy_vae_0.7_")
    done = jobs.wait(job, timeout=300)  # a family registered at run time trains on a thread of this process
    assert done.state == "done", done.log() or done.error
    assert load_bundle(done.model_path).model.wobble == 0.7


def test_toy_family_model_matches_its_base_numbers(toy):
    """A registered family is built like any other: same seed, same networks as its base class."""
    torch.manual_seed(0)
    toy_model = registry.build_model("toy_vae", n_genes=6, n_perturbations=3, n_latent=2, n_hidden=4)
    torch.manual_seed(0)
    base = registry.build_model("conditional_vae", n_genes=6, n_perturbations=3, n_latent=2, n_hidden=4)
    for (n, a), (_, b) in zip(toy_model.state_dict().items(), base.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
