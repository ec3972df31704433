"""Hostile input: malformed bundles, screens and arguments get a message naming the fix; reads
are bounded; saves are atomic; a shared deployment reads only under its data root.

``bench/hostile_probe.py`` runs the same kinds of input and counts the outcomes.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from sams_core.cli import main as cli
from sams_core.data.screen import from_anndata, read_h5ad
from sams_core.errors import SamsError
from sams_core.io.bundle import check_output, load_bundle, save_bundle
from sams_core.io.manifest import CHECKSUM_FIELD, MANIFEST, WEIGHTS, manifest_checksum, read_manifest
from sams_core.io.paths import readable_path
from sams_core.pipeline import SplitSpec, train_bundle
from sams_core.settings import Settings
from sams_core.training.trainer import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle_path(screen, tmp_path_factory):
    """A tiny trained bundle (.sams)."""
    out = tmp_path_factory.mktemp("hostile") / "model.sams"
    train_bundle(from_anndata(screen[0]), "sams_vae", SplitSpec("heldout-combos", 0.34, seed=0),
                 TrainConfig(epochs=1, batch_size=256), out, evaluate=False, n_latent=3, n_hidden=8)
    return out


@pytest.fixture(scope="module")
def parts(bundle_path):
    with zipfile.ZipFile(bundle_path) as z:
        return json.loads(z.read(MANIFEST)), z.read(WEIGHTS)


def write_zip(path: Path, manifest: dict | bytes, weights: bytes, method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as z:
        z.writestr(MANIFEST, manifest if isinstance(manifest, bytes) else json.dumps(manifest))
        z.writestr(WEIGHTS, weights)
    return path


def resigned(manifest: dict, **changes) -> dict:
    """``manifest`` edited and given a correct checksum again (what a careful forger would do)."""
    m = {**json.loads(json.dumps(manifest)), **changes}
    m[CHECKSUM_FIELD] = manifest_checksum(m)
    return m


def run_cli(*argv: str, capsys) -> tuple[int, str]:
    try:
        rc = cli(list(argv))
    except SystemExit as e:  # argparse refuses a malformed number
        rc = e.code
    return rc, capsys.readouterr().err


# ---- bounded reads -----------------------------------------------------------------------------
MEMORY_PROBE = textwrap.dedent("""
    import resource, sys, time
    sys.path.insert(0, {root!r})
    from sams_core.errors import SamsError
    from sams_core.io.bundle import load_bundle
    from sams_core.io.manifest import read_manifest
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for fn, src in ((read_manifest, '/dev/zero'), (load_bundle, '/dev/zero'), (load_bundle, {bomb!r})):
        t0 = time.perf_counter()
        try:
            fn(src)
            print('accepted', src)
        except SamsError as e:
            print('refused', time.perf_counter() - t0, str(e)[:300].replace(chr(10), ' '))
    print('growth_mb', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
""")


def test_dev_zero_and_zip_bomb_refused_fast_and_small(tmp_path):
    """A path to /dev/zero, and a 1 MB zip whose manifest expands to 1 GiB: refused within 2 s
    and under 200 MB (the process is capped at 3 GB, so an unbounded read would crash it)."""
    bomb = tmp_path / "bomb.sams"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open(MANIFEST, "w", force_zip64=True) as f:
            for _ in range(64):
                f.write(b" " * 2**24)
        z.writestr(WEIGHTS, b"")
    assert bomb.stat().st_size < 8 * 1024**2
    code = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (3 * 1024**3, 3 * 1024**3))\n"
    out = subprocess.run([sys.executable, "-c", code + MEMORY_PROBE.format(root=str(ROOT), bomb=str(bomb))],
                         capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    refused = [ln for ln in lines if ln.startswith("refused")]
    assert len(refused) == 3, out.stdout + out.stderr[-2000:]
    assert all(float(ln.split()[1]) < 2.0 for ln in refused), lines
    assert "not a regular file" in refused[0] and "more than a bundle may hold" in refused[2]
    growth = float(next(ln for ln in lines if ln.startswith("growth_mb")).split()[1])
    assert growth < 200, growth


def test_dev_zero_from_the_url_is_a_message(monkeypatch):
    """``?dataset=path&model_path=/dev/zero``: the app says why and keeps running."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params["dataset"] = "path"
    at.query_params["data_path"] = str(ROOT / "assets" / "demo" / "screen.h5ad")
    at.query_params["model_path"] = "/dev/zero"
    at.run()
    assert not at.exception
    assert any("not a regular file" in e.value for e in at.error), [e.value for e in at.error]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"data": None}, "'data' is not a table"),
        ({"metrics": {"test": [1, 2]}}, "metrics for 'test' are not a table of numbers"),
        ({"metrics": "good"}, "'metrics' is not a table"),
        ({"training": {"history": 3}}, "history is not a list"),
        ({"genes": "G1"}, "'genes' is not a list of names"),
        ({"format_version": "2"}, "format version '2' is not a version number"),
    ],
)
def test_manifest_schema_refused(parts, tmp_path, edit, message):
    manifest, weights = parts
    p = write_zip(tmp_path / "m.sams", resigned(manifest, **edit), weights)
    with pytest.raises(SamsError, match=message):
        read_manifest(p)


@pytest.mark.parametrize(("key", "value"), [("n_hidden", 10**6), ("n_latent", 0), ("n_latent", "four"), ("n_layers", 1.5)])
def test_absurd_sizes_refused_before_building(parts, tmp_path, key, value):
    manifest, weights = parts
    m = resigned(manifest, hparams={**manifest["hparams"], key: value})
    p = write_zip(tmp_path / "m.sams", m, weights)
    t0 = time.perf_counter()
    with pytest.raises(SamsError, match=f"hyper-parameter {key}"):
        load_bundle(p)
    assert time.perf_counter() - t0 < 2


def test_shapes_checked_against_the_header_before_allocating(parts, tmp_path):
    """A large but legal n_hidden (a 4096 × 60000 layer, ~1 GB) whose weights do not have it: refused
    from the safetensors header, before the model is built."""
    manifest, weights = parts
    m = resigned(manifest, hparams={**manifest["hparams"], "n_hidden": 60_000, "n_latent": 4096})
    p = write_zip(tmp_path / "m.sams", m, weights)
    t0 = time.perf_counter()
    with pytest.raises(SamsError, match="do not fit"):
        load_bundle(p)
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("edit", ["rotate genes", "reverse perturbations", "drop checksum"])
def test_edited_manifest_refused(parts, tmp_path, edit):
    """An edit of the manifest without recomputing its checksum: 'modified after it was saved'."""
    manifest, weights = parts
    m = json.loads(json.dumps(manifest))
    if edit == "rotate genes":
        m["genes"] = m["genes"][1:] + m["genes"][:1]
    elif edit == "reverse perturbations":
        m["perturbations"] = m["perturbations"][::-1]
    else:
        del m[CHECKSUM_FIELD]
    p = write_zip(tmp_path / "m.sams", m, weights)
    with pytest.raises(SamsError, match="modified after it was saved"):
        read_manifest(p)


def test_edited_weights_refused(parts, tmp_path):
    manifest, weights = parts
    w = bytearray(weights)
    w[-3] ^= 0xFF
    with pytest.raises(SamsError, match="modified after it was saved"):
        load_bundle(write_zip(tmp_path / "w.sams", manifest, bytes(w)))


def test_format_1_bundles_load_with_a_note(parts, tmp_path):
    """Bundles saved before manifests were checksummed load (weights verified) and say so."""
    manifest, weights = parts
    old = {k: v for k, v in manifest.items() if k != CHECKSUM_FIELD}
    old["format_version"] = 1
    b = load_bundle(write_zip(tmp_path / "old.sams", old, weights))
    assert any("before manifests were checksummed" in n for n in b.notes)
    for shipped in sorted((ROOT / "assets").rglob("*.sams")):
        assert read_manifest(shipped)["genes"]


def _patched_zip(tmp_path: Path, parts, sig_offsets: tuple[tuple[bytes, int, bytes], ...]) -> Path:
    p = write_zip(tmp_path / "z.sams", *parts)
    b = bytearray(p.read_bytes())
    for sig, off, value in sig_offsets:
        i = b.find(sig)
        b[i + off: i + off + len(value)] = value
    p.write_bytes(bytes(b))
    return p


def test_zip_errors_are_messages(parts, tmp_path):
    manifest, weights = parts
    encrypted = _patched_zip(tmp_path, parts, ((b"PK\x03\x04", 6, b"\x01"), (b"PK\x01\x02", 8, b"\x01")))
    with pytest.raises(SamsError, match="encrypted"):
        read_manifest(encrypted)
    method99 = _patched_zip(tmp_path, parts, ((b"PK\x03\x04", 8, b"\x63\x00"), (b"PK\x01\x02", 10, b"\x63\x00")))
    with pytest.raises(SamsError, match="compression method 99"):
        read_manifest(method99)
    crc = write_zip(tmp_path / "crc.sams", manifest, weights, zipfile.ZIP_STORED)
    b = bytearray(crc.read_bytes())
    b[b.find(b'"genes"') + 1] = ord("G")
    crc.write_bytes(bytes(b))
    with pytest.raises(SamsError, match="Bad CRC"):
        read_manifest(crc)
    many = write_zip(tmp_path / "many.sams", manifest, weights)
    with zipfile.ZipFile(many, "a") as z:
        for k in range(40):
            z.writestr(f"x{k}", b"")
    with pytest.raises(SamsError, match="holds 42 files"):
        read_manifest(many)
    extra = write_zip(tmp_path / "extra.sams", manifest, weights)
    with zipfile.ZipFile(extra, "a") as z:
        z.writestr("run.py", b"import os")
    with pytest.raises(SamsError, match="files other than"):
        read_manifest(extra)
    with pytest.raises(SamsError, match="truncated or not a SAMS"):
        read_manifest(b"")


def test_folder_parts_must_be_regular_files(parts, tmp_path):
    manifest, weights = parts
    real = tmp_path / "elsewhere.json"
    real.write_text(json.dumps(manifest))
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / MANIFEST).symlink_to(real)
    (linked / WEIGHTS).write_bytes(weights)
    with pytest.raises(SamsError, match="is a link"):
        read_manifest(linked)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    (fifo / MANIFEST).write_text(json.dumps(manifest))
    os.mkfifo(fifo / WEIGHTS)
    with pytest.raises(SamsError, match="not a regular file"):
        load_bundle(fifo)


# ---- atomic saves --------------------------------------------------------------------------------
SAVER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from sams_core.io.bundle import load_bundle, save_bundle
    b = load_bundle({src!r})
    real = os.fsync
    def slow(fd):
        time.sleep(0.03)
        real(fd)
    os.fsync = slow
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            i = 0
            while True:
                i += 1
                b.manifest["training"]["generation"] = i
                save_bundle({target!r}, b.model, b.manifest)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
""")


@pytest.mark.parametrize("kind", ["model.sams", "folder_bundle"])
def test_kill_during_save_leaves_a_whole_bundle(bundle_path, tmp_path, kind):
    """Saves slowed down and killed (SIGKILL) at random moments: the target always loads, as the
    old bundle or a new one; the next save removes what the killed saves left behind."""
    target = tmp_path / kind
    first = load_bundle(bundle_path)
    save_bundle(target, first.model, first.manifest)
    proc = subprocess.Popen([sys.executable, "-c", SAVER.format(root=str(ROOT), src=str(bundle_path), target=str(target))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rng = random.Random(0)
    generations = set()
    try:
        for _ in range(6):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            worker = int(proc.stdout.readline())
            time.sleep(rng.uniform(0.05, 0.4))
            os.kill(worker, signal.SIGKILL)
            assert proc.stdout.readline().strip() == "reaped"
            b = load_bundle(target)
            generations.add(b.manifest["training"].get("generation"))
    finally:
        proc.kill()
        proc.wait()
    assert len(generations) > 1, "the kills never landed after a finished save"
    save_bundle(target, first.model, first.manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind], list(tmp_path.iterdir())


def test_next_save_removes_a_killed_saves_write_probe(bundle_path, tmp_path):
    """A save killed between its write probe and the probe's removal leaves the probe behind; the
    next save to the same path removes it (the probe's process is gone), not a live one's."""
    b = load_bundle(bundle_path)
    target = tmp_path / "m.sams"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.sams.write-test-{dead.pid}-abc123"
    live = tmp_path / f".m.sams.write-test-{os.getppid()}-def456"
    stale.write_bytes(b"")
    live.write_bytes(b"")
    save_bundle(target, b.model, b.manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "m.sams"])


def test_full_disk_keeps_the_old_bundle(bundle_path, tmp_path, monkeypatch):
    b = load_bundle(bundle_path)
    for target in (tmp_path / "m.sams", tmp_path / "folder"):
        save_bundle(target, b.model, {**b.manifest, "metrics": {"test": {"iwelbo": -1.0}}})

        def full(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(SamsError, match="No space left on device.*unchanged"):
            save_bundle(target, b.model, {**b.manifest, "metrics": {}})
        monkeypatch.undo()
        assert read_manifest(target)["metrics"] == {"test": {"iwelbo": -1.0}}
        assert sorted(p.name for p in tmp_path.iterdir() if ".partial" in p.name) == []


@pytest.mark.parametrize("case", ["empty", "under a file", "existing file", "foreign folder", "folder as .sams"])
def test_out_checked_before_training(tmp_path, capsys, case):
    """``--out`` problems end the command at once: the screen named is not even read."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"x")
    (tmp_path / "dir.sams").mkdir()
    out, message = {
        "empty": ("", "No output path"),
        "under a file": (str(notes / "m.sams"), "Cannot write the bundle"),
        "existing file": (str(notes), "is a file, not a bundle folder"),
        "foreign folder": (str(folder), "holding other files"),
        "folder as .sams": (str(tmp_path / "dir.sams"), "is a folder, not a .sams file"),
    }[case]
    rc, err = run_cli("train", "--data", str(tmp_path / "missing.h5ad"), "--out", out, capsys=capsys)
    assert rc == 2 and message in err, err
    assert notes.read_text() == "mine" and (folder / "cat.jpg").exists()


def test_an_existing_non_bundle_sams_file_is_not_overwritten(tmp_path):
    p = tmp_path / "m.sams"
    p.write_text("my notes")
    with pytest.raises(SamsError, match="is not a SAMS bundle"):
        check_output(p)


# ---- shared deployments ----------------------------------------------------------------------------
def test_paths_read_only_under_the_data_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "screen.h5ad").write_bytes(b"x")
    (root / "escape.h5ad").symlink_to("/etc/hostname")
    s = Settings(assets=ROOT / "assets", cache_dir=tmp_path, home=tmp_path, data_root=root)
    assert readable_path(root / "screen.h5ad", s) == (root / "screen.h5ad").resolve()
    assert readable_path(ROOT / "assets" / "demo" / "screen.h5ad", s)  # the shipped assets always
    messages = set()
    for outside in ("/etc/passwd", "/etc/no-such-file", "/dev/zero", str(root / ".." / "x"), str(root / "escape.h5ad")):
        with pytest.raises(SamsError, match="outside the data folder") as e:
            readable_path(outside, s)
        messages.add(str(e.value).replace(outside, "PATH"))
    assert len(messages) == 1, "an existing and a missing path must read alike"


def test_the_app_refuses_a_url_path_outside_the_root(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    import sams_core.io.paths as paths

    monkeypatch.setattr(paths, "SETTINGS", Settings(assets=ROOT / "assets", cache_dir=tmp_path, home=tmp_path, data_root=tmp_path))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params["dataset"] = "path"
    at.query_params["data_path"] = "/etc/passwd"
    at.run()
    assert not at.exception
    assert any("outside the data folder" in e.value for e in at.error)


def test_read_only_mode_hides_files_on_disk_and_training(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({str(ROOT / 'app.py')!r}, default_timeout=120).run()
        assert not at.exception, at.exception
        print(list(at.sidebar.radio[0].options))
        from explorer.nav import visible_pages
        from sams_core.settings import SETTINGS
        print([p.title for p in visible_pages(SETTINGS.read_only)])
        from explorer import jobs
        try:
            jobs.submit({str(tmp_path)!r}, jobs.JobSpec(name="x", data="x.h5ad"))
        except Exception as e:
            print(type(e).__name__, e)
    """)
    env = {**os.environ, "SAMS_READ_ONLY": "1", "SAMS_HOME": str(tmp_path), "SAMS_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    lines = out.stdout.splitlines()
    assert lines and "Files on disk" not in lines[0] and "path" not in lines[0], out.stdout + out.stderr[-2000:]
    assert "'Train'" not in lines[1] and "'Differential expression'" in lines[1], lines[1]
    assert "SamsError" in lines[2] and "read-only" in lines[2]


def test_users_see_no_tracebacks():
    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["client"]["showErrorDetails"] == "none"  # false would still show the stack trace
    assert 0 < cfg["server"]["maxUploadSize"] <= 1000


def test_caches_follow_the_file_content(bundle_path, tmp_path):
    """A bundle rewritten in place shows its new manifest (cache keyed by size and mtime)."""
    from explorer import state as S

    b = load_bundle(bundle_path)
    target = tmp_path / "m.sams"
    save_bundle(target, b.model, {**b.manifest, "metrics": {"test": {"iwelbo": -1.0}}})
    assert S._manifest(str(target))["metrics"]["test"]["iwelbo"] == -1.0
    time.sleep(0.01)
    save_bundle(target, b.model, {**b.manifest, "metrics": {"test": {"iwelbo": -2.0}}})
    assert S._manifest(str(target))["metrics"]["test"]["iwelbo"] == -2.0
    assert S._bundle(str(target)).metrics["test"]["iwelbo"] == -2.0


def test_same_seed_same_model_when_jobs_overlap(screen, tmp_path):
    """Two in-process jobs with one seed started together (two slots): identical weights."""
    import torch

    from explorer import jobs

    path = tmp_path / "s.h5ad"
    screen[0].write_h5ad(path)
    spec = jobs.JobSpec(name="a", data=str(path), hparams={"n_latent": 3, "n_hidden": 8},
                        split={"kind": "random"}, config={"epochs": 2, "batch_size": 256, "seed": 3})
    made = [jobs.create(tmp_path / "runs", spec) for _ in range(2)]
    threads = [threading.Thread(target=jobs.run, args=(j.path,), kwargs={"max_parallel": 2, "handle_signals": False}) for j in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    a, b = (load_bundle(j.model_path).model.state_dict() for j in made)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- bad screens and arguments --------------------------------------------------------------
def _relabel(screen, fn) -> ad.AnnData:
    a = screen[0].copy()
    a.obs["perturbation"] = [fn(x) for x in a.obs["perturbation"].astype(str)]
    return a


def test_empty_labels_refused(screen):
    with pytest.raises(SamsError, match="empty label"):
        from_anndata(_relabel(screen, lambda x: "" if x == "control" else x))


def test_nan_text_label_refused(screen):
    with pytest.raises(SamsError, match="labelled 'nan'.*missing value"):
        from_anndata(_relabel(screen, lambda x: "nan" if x == "KLF1" else x))


def test_counts_in_raw_are_not_ignored(screen):
    a = screen[0].copy()
    a.raw = a.copy()
    x = a.X.toarray()
    a.X = np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32)
    with pytest.raises(SamsError, match=r"adata.raw holds raw counts.*layers\['counts'\] = adata.raw"):
        from_anndata(a)
    a.layers["counts"] = a.raw[:, a.var_names].X  # the advice given
    assert from_anndata(a).is_counts


@pytest.mark.parametrize("sep", ["_", "|"])
def test_pairs_with_another_separator_get_advice_that_works(screen, tmp_path, sep):
    a = _relabel(screen, lambda x: x.replace("+", sep))
    path = tmp_path / "pairs.h5ad"
    a.write_h5ad(path)
    with pytest.raises(SamsError, match=re.escape(f"separators=['{sep}'] (command line: --separator '{sep}'")):
        read_h5ad(path)
    data = read_h5ad(path, separators=[sep])
    assert set(data.combinations()) == {"GATA1+KLF1", "CEBPA+SPI1", "RUNX1+TAL1"}


def test_counts_model_refused_on_log_normalised_data(bundle_path, screen, tmp_path, capsys):
    a = screen[0].copy()
    x = a.X.toarray()
    a.X = np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32)
    path = tmp_path / "lognorm.h5ad"
    a.write_h5ad(path)
    rc, err = run_cli("evaluate", str(bundle_path), "--data", str(path), "--samples", "2", capsys=capsys)
    assert rc == 2 and "trained on raw counts" in err and "log-normalised" in err, err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--epochs", "0", "at least 1"), ("--epochs", "-3", "at least 1"), ("--latent", "0", "at least 1"),
        ("--lr", "nan", "finite number above 0"), ("--lr", "inf", "finite number"), ("--hidden", "0", "at least 1"),
        ("--val-fraction", "-0.1", "at least 0"), ("--fraction", "2", "at most 1"), ("--batch-size", "0", "at least 1"),
    ],
)
def test_train_numbers_refused_at_once(tmp_path, capsys, flag, value, message):
    rc, err = run_cli("train", "--data", str(tmp_path / "s.h5ad"), "--out", str(tmp_path / "m.sams"), flag, value, capsys=capsys)
    assert rc == 2 and flag in err and message in err, err


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("samples", ["0", "-5"])
def test_samples_at_least_one(bundle_path, tmp_path, capsys, command, samples):
    extra = ["--perturbations", "KLF1"] if command == "predict" else ["--data", str(tmp_path / "s.h5ad")]
    rc, err = run_cli(command, str(bundle_path), *extra, "--samples", samples, capsys=capsys)
    assert rc == 2 and "--samples" in err and "at least 1" in err, err


@pytest.mark.parametrize(("dose", "message"), [("nan", "not a number"), ("inf", "not a number"),
                                                ("-1", "outside 0 to 10"), ("1e9", "outside 0 to 10")])
def test_dosages_refused_or_bounded(bundle_path, capsys, dose, message):
    rc, err = run_cli("predict", str(bundle_path), "--perturbations", f"KLF1:{dose}", "--samples", "100", capsys=capsys)
    assert rc == 2 and message in err, err
    rc, _ = run_cli("predict", str(bundle_path), "--perturbations", "KLF1:2.5", "--samples", "100", capsys=capsys)
    assert rc == 0


# ---- cold start ------------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="Debian chromium not installed")
def test_no_cold_start_race(tmp_path):
    """A freshly started server, Masks and Home opened at the same moment: neither shows an
    exception (before: 'partially initialized module pandas' on Home in 18 of 20 tries), and a
    first visit to a page's own URL still gets the app's navigation (Home first, no "app" entry
    of Streamlit's pages-folder mode)."""
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SAMS_CACHE_DIR": str(tmp_path / "cache"), "SAMS_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.25)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                pages = [browser.new_page() for _ in range(2)]
                for page, path in zip(pages, ("Masks", ""), strict=True):
                    page.goto(f"{url}/{path}", wait_until="commit")
                for page in pages:
                    page.wait_for_selector("h1", timeout=120_000)
                for page in pages:
                    page.wait_for_timeout(500)
                    assert not page.query_selector_all('[data-testid="stException"]'), page.url
                    text = page.inner_text("body")
                    assert "partially initialized" not in text and "Traceback" not in text, page.url
                    page.wait_for_selector('[data-testid="stSidebarNav"] a', timeout=60_000)
                    page.wait_for_timeout(1000)
                    links = [t.split("\n")[-1] for t in page.locator('[data-testid="stSidebarNav"] a').all_inner_texts()]
                    assert links[0] == "Home" and "app" not in links, links
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
