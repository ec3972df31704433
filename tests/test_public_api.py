"""`import sams_core as sc` gives the functions a user reaches for, without loading PyTorch."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import sams_core as sc


def test_import_is_light():
    code = "import sys, sams_core; sams_core.SamsError; print('torch' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("name", sorted(sc._PUBLIC))
def test_public_names_resolve_with_docs_and_types(name):
    obj = getattr(sc, name)
    assert name in dir(sc)
    assert inspect.getdoc(obj), f"sc.{name} has no docstring"
    if inspect.isfunction(obj):
        sig = inspect.signature(obj)
        assert sig.return_annotation is not inspect.Signature.empty, f"sc.{name} has no return type"


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sc.nope  # noqa: B018


def test_readme_flow_on_a_small_screen(screen_path, tmp_path):
    data = sc.read_h5ad(screen_path)
    bundle, result, evaluation = sc.train(
        data, "cpa_vae", sc.SplitSpec("heldout-combos", 0.34), sc.TrainConfig(epochs=2, seed=0),
        tmp_path / "m.sams", n_latent=4, n_hidden=16, evaluate=False,
    )
    again = sc.load_bundle(tmp_path / "m.sams")
    assert again.perturbations == bundle.perturbations
    pred = sc.predict_effect(again, "KLF1+GATA1")
    assert pred.table().shape[0] == data.n_genes


def test_command_line_works_from_any_folder(tmp_path):
    """The README's install makes ``sams`` and ``python -m sams_core`` work outside the checkout."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    for cmd in ([sys.executable, "-m", "sams_core", "--help"], [str(Path(sys.executable).parent / "sams"), "--help"]):
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "train" in out.stdout, (cmd, out.stderr[-500:])
