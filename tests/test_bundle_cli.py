"""Bundles round-trip exactly and refuse tampering; the command line runs end to end."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from sams_core.io.bundle import load_bundle
from sams_core.cli import main, parse_combination
from sams_core.data.screen import from_anndata
from sams_core.errors import SamsError
from sams_core.evaluation.metrics import model_ate_draws
from sams_core.pipeline import SplitSpec, data_for_bundle, split_for_bundle, train_bundle
from sams_core.training.trainer import TrainConfig


@pytest.fixture(scope="module")
def trained(screen, tmp_path_factory):
    data = from_anndata(screen[0])
    out = tmp_path_factory.mktemp("b") / "model.sams"
    bundle, result, ev = train_bundle(
        data, "sams_vae", SplitSpec("heldout-combos", 0.34, seed=0), TrainConfig(epochs=3, batch_size=256),
        out, n_ate_samples=200, n_latent=4, n_hidden=32, guide="correlated",
    )
    return data, out, bundle, ev


def test_round_trip_predicts_identically(trained):
    data, out, bundle, ev = trained
    loaded = load_bundle(out)
    d = np.eye(data.n_perturbations, dtype=np.float32)[:3]
    a = model_ate_draws(bundle.model, d, True, n_globals=10, n_per_global=5, seed=7)
    b = model_ate_draws(loaded.model, d, True, n_globals=10, n_per_global=5, seed=7)
    np.testing.assert_array_equal(a, b)
    assert loaded.genes == data.genes and loaded.perturbations == data.perturbations
    assert loaded.label == "SAMS-VAE (correlated)"
    assert len(loaded.history) == 3 and "test" in loaded.metrics
    assert ev.metrics.loc["test", "n_conditions"] == 1


def test_split_and_data_recreated_from_bundle(trained, screen_path):
    data, out, bundle, _ = trained
    b = load_bundle(out)
    d2 = data_for_bundle(b, screen_path)
    split = split_for_bundle(b, d2)
    assert sorted(set(d2.labels[split == "test"])) == b.split_spec["test_conditions"]


def test_folder_bundle_and_bytes(trained, tmp_path):
    _, out, bundle, _ = trained
    from sams_core.io.bundle import save_bundle

    folder = save_bundle(tmp_path / "folder_bundle", bundle.model, bundle.manifest)
    assert (folder / "manifest.json").exists() and (folder / "weights.safetensors").exists()
    assert load_bundle(folder).family == "sams_vae"
    assert load_bundle(out.read_bytes()).family == "sams_vae"


def test_tampered_and_truncated_bundles_are_refused(trained, tmp_path):
    _, out, _, _ = trained
    raw = out.read_bytes()
    trunc = tmp_path / "trunc.sams"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SamsError, match="truncated"):
        load_bundle(trunc)
    # change one weight byte: checksum mismatch
    with zipfile.ZipFile(out) as z:
        man, w = z.read("manifest.json"), bytearray(z.read("weights.safetensors"))
    w[-5] ^= 0xFF
    bad = tmp_path / "tampered.sams"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("manifest.json", man)
        z.writestr("weights.safetensors", bytes(w))
    with pytest.raises(SamsError, match="checksum"):
        load_bundle(bad)
    # a manifest claiming another family
    m = json.loads(man)
    m["family"] = "os.system"
    evil = tmp_path / "evil.sams"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("manifest.json", json.dumps(m))
        z.writestr("weights.safetensors", z and bytes(w))
    with pytest.raises(SamsError):
        load_bundle(evil)
    with pytest.raises(SamsError, match="not found"):
        load_bundle(tmp_path / "nope.sams")


def test_manifest_read_without_the_model(trained, tmp_path):
    from sams_core.io.manifest import model_label, read_manifest

    _, out, _, _ = trained
    man = read_manifest(out)
    assert man == load_bundle(out).manifest
    assert model_label(man) == "SAMS-VAE (correlated)"
    assert read_manifest(out.read_bytes())["family"] == "sams_vae"
    foreign = tmp_path / "foreign.sams"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("manifest.json", json.dumps({"format": "something-else"}))
        z.writestr("weights.safetensors", b"")
    with pytest.raises(SamsError, match="does not describe a SAMS model bundle"):
        read_manifest(foreign)
    with pytest.raises(SamsError, match="not found"):
        read_manifest(tmp_path / "nope.sams")


def test_parse_combination():
    assert parse_combination("KLF1+GATA1:0.5") == {"KLF1": 1.0, "GATA1": 0.5}
    assert parse_combination("control") == {}
    with pytest.raises(SamsError, match="not a number"):
        parse_combination("KLF1:lots")


def test_cli_train_evaluate_predict(screen_path, tmp_path, capsys):
    out = tmp_path / "cli.sams"
    rc = main(["train", "--data", str(screen_path), "--model", "cpa_vae", "--epochs", "2", "--latent", "3",
               "--hidden", "16", "--batch-size", "256", "--out", str(out)])
    assert rc == 0 and out.exists()
    assert "iwelbo" in capsys.readouterr().out
    csv = tmp_path / "m.csv"
    assert main(["evaluate", str(out), "--data", str(screen_path), "--samples", "10", "--ate-samples", "100", "--csv", str(csv)]) == 0
    table = pd.read_csv(csv)
    assert {"iwelbo", "ate_r", "cosine_rank"} <= set(table.columns)
    eff = tmp_path / "e.csv"
    assert main(["predict", str(out), "--perturbations", "KLF1+SPI1", "TAL1:0.5", "--samples", "200", "--out", str(eff)]) == 0
    e = pd.read_csv(eff)
    assert len(e) == 2 * 60 and (e.lower <= e.effect + 1e-6).all() and (e.effect <= e.upper + 1e-6).all()
    assert main(["predict", str(out), "--perturbations", "NOPE"]) == 2
    assert "Unknown perturbation" in capsys.readouterr().err


def test_cli_help_explains_every_option(capsys):
    for cmd in ("train", "evaluate", "predict"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "--" in text and "usage" in text


def test_cli_simulate_passes_options(tmp_path, capsys):
    out = tmp_path / "sim.h5ad"
    assert main(["simulate", "--perturbations", "4", "--latent", "3", "--genes", "30", "--combinations", "2", "--cells", "10", "--out", str(out)]) == 0
    assert out.exists()
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    assert "--perturbations" in capsys.readouterr().out


def test_bundle_reads_are_bounded(tmp_path):
    """A device, a link to one, or an archive declaring a huge manifest is refused before it is read."""
    import io
    import zipfile

    from sams_core.io.manifest import MANIFEST, WEIGHTS, read_manifest

    with pytest.raises(SamsError, match="not a regular file"):
        read_manifest("/dev/zero")
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / MANIFEST).symlink_to("/dev/zero")
    (folder / WEIGHTS).write_bytes(b"")
    with pytest.raises(SamsError, match="is a link"):
        read_manifest(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(MANIFEST, b"{" + b" " * (65 * 1024**2) + b"}")
        z.writestr(WEIGHTS, b"")
    assert len(buf.getvalue()) < 1024**2  # small on disk, large once decompressed
    with pytest.raises(SamsError, match="more than a bundle may hold"):
        read_manifest(buf.getvalue())
