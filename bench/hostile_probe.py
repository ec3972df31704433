"""Hostile inputs against the library and the command line: how many get a clear message.

Each case feeds one malformed screen, argument or bundle to the public entry points and sorts
the outcome:

- ``message``: refused with a :class:`~sams_core.errors.SamsError` (or the command line's
  ``error:`` line / an argparse usage error), i.e. a message that names the problem;
- ``documented``: accepted, with the behaviour the README documents (checked by the case);
- ``silent``: accepted without a word although it is wrong (or the documented behaviour fails);
- ``traceback``: any other exception.

Four cases run in a child process and report time and peak memory: a bundle path to
``/dev/zero`` (as a bundle and as a screen) and small zips whose manifest or weights expand
to 1 GiB.

    python bench/hostile_probe.py            # the table, then the memory of the two cases
    python bench/hostile_probe.py --verbose  # one line per case with its outcome and message

Takes about a minute on two CPU cores (it trains two tiny models).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SAMS_CACHE_DIR", tempfile.mkdtemp(prefix="probe-cache-"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sams_core.cli import main as cli  # noqa: E402
from sams_core.errors import SamsError  # noqa: E402
from sams_core.io.bundle import load_bundle  # noqa: E402
from sams_core.io.manifest import MANIFEST, WEIGHTS, metrics_table  # noqa: E402
from tests.conftest import toy_screen  # noqa: E402

torch.set_num_threads(2)
Case = tuple[str, str, Callable[[], str | None]]


def run_cli(*argv: str) -> str | None:
    """The command line in this process: exit 2 (or argparse's usage error) is a message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli(list(argv))
        except SystemExit as e:  # argparse refuses a malformed value with exit 2
            rc = e.code
    if rc != 0:
        raise SamsError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {rc}")
    return None


def use_bundle(src) -> str | None:
    """Load a bundle and touch what the dashboard's Home shows."""
    b = load_bundle(src)
    _ = (b.label, b.is_counts, b.history, b.split_spec, b.genes, b.perturbations)
    metrics_table(b.manifest)
    return None


class Probe:
    def __init__(self, work: Path):
        self.work = work
        adata, _ = toy_screen(n_per=40, n_genes=30)
        self.adata = adata
        self.screen = work / "screen.h5ad"
        adata.write_h5ad(self.screen)
        self.bundle = work / "model.sams"
        run_cli("train", "--data", str(self.screen), "--epochs", "1", "--latent", "3", "--hidden", "16",
                "--no-eval", "--out", str(self.bundle))
        with zipfile.ZipFile(self.bundle) as z:
            self.manifest = json.loads(z.read(MANIFEST))
            self.weights = z.read(WEIGHTS)

    # ---- bundles ---------------------------------------------------------------------------
    def zipped(self, name: str, manifest: dict | bytes | None = None, weights: bytes | None = None) -> Path:
        p = self.work / f"{name}.sams"
        m = manifest if manifest is not None else self.manifest
        with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(MANIFEST, m if isinstance(m, bytes) else json.dumps(m))
            z.writestr(WEIGHTS, weights if weights is not None else self.weights)
        return p

    def edited(self, name: str, **changes) -> Path:
        m = json.loads(json.dumps(self.manifest))
        for key, value in changes.items():
            *path, last = key.split("__")
            d = m
            for k in path:
                d = d[k]
            d[last] = value
        return self.zipped(name, m)

    def patched_zip(self, name: str, offset_fn: Callable[[bytes], bytes]) -> Path:
        p = self.work / f"{name}.sams"
        p.write_bytes(offset_fn(self.bundle.read_bytes()))
        return p

    def bundle_cases(self) -> list[Case]:
        m = self.manifest
        cases: list[Case] = []

        def add(name, fn):
            cases.append(("bundle", name, fn))

        add("n_hidden edited to 10^6", lambda: use_bundle(self.edited("hid", hparams__n_hidden=1_000_000)))
        add("n_latent edited to 0", lambda: use_bundle(self.edited("lat0", hparams__n_latent=0)))
        add("n_latent edited to 'four'", lambda: use_bundle(self.edited("latstr", hparams__n_latent="four")))
        add("data: null", lambda: use_bundle(self.edited("datanull", data=None)))
        add("metrics list-valued", lambda: use_bundle(self.edited("metlist", metrics={"test": [1, 2]})))
        add("metrics a string", lambda: use_bundle(self.edited("metstr", metrics="good")))
        add("history not a list", lambda: use_bundle(self.edited("hist", training={"history": 3})))
        add("genes rotated", lambda: use_bundle(self.edited("rot", genes=m["genes"][1:] + m["genes"][:1])))
        add("perturbations reversed", lambda: use_bundle(self.edited("rev", perturbations=m["perturbations"][::-1])))
        add("family renamed", lambda: use_bundle(self.edited("fam", family="evil")))
        add("format_version '1' (text)", lambda: use_bundle(self.edited("fv", format_version="1")))
        add("checksum removed", lambda: use_bundle(self.zipped("nosum", {k: v for k, v in m.items() if k != "weights_sha256"})))
        add("manifest not JSON", lambda: use_bundle(self.zipped("nojson", b"{not json")))
        add("manifest a list", lambda: use_bundle(self.zipped("list", b"[1, 2]")))
        add("weights truncated", lambda: use_bundle(self.zipped("trunc", weights=self.weights[: len(self.weights) // 2])))
        add("weights of another size", lambda: use_bundle(self.zipped("other", weights=self.other_weights())))
        add("weights bytes flipped", lambda: use_bundle(self.zipped("flip", weights=self.weights[:-8] + b"\0" * 8)))
        add("zip truncated", lambda: use_bundle(self.patched_zip("ztrunc", lambda b: b[: len(b) // 2])))
        add("zip member encrypted (flag bit)", lambda: use_bundle(self.flagged_zip("enc")))
        add("zip member unsupported compression", lambda: use_bundle(self.compress_zip("cmp")))
        add("zip bad CRC", lambda: use_bundle(self.bad_crc_zip("crc")))
        add("zip with 20,000 members", lambda: use_bundle(self.many_members("many")))
        add("zip with an extra member declaring 4 GB", lambda: use_bundle(self.declared_large("big")))
        add("folder weights link to /dev/zero", lambda: use_bundle(self.linked_folder("/dev/zero")))
        add("folder manifest is a link to a file", lambda: use_bundle(self.linked_folder(None)))
        add("folder weights a FIFO", lambda: use_bundle(self.fifo_folder()))
        add("path is a folder of nothing", lambda: use_bundle(self.empty_folder()))
        add("empty file", lambda: use_bundle(self.empty_file()))
        add("not a zip (text file)", lambda: use_bundle(self.text_file()))
        add("uploaded bytes of nothing", lambda: use_bundle(b""))
        return cases

    def other_weights(self) -> bytes:
        other = self.work / "other.sams"
        if not other.exists():
            run_cli("train", "--data", str(self.screen), "--epochs", "1", "--latent", "4", "--hidden", "8",
                    "--no-eval", "--out", str(other))
        with zipfile.ZipFile(other) as z:
            return z.read(WEIGHTS)

    def flagged_zip(self, name: str) -> Path:
        """The manifest's local and central headers say 'encrypted' (flag bit 0)."""
        p = self.zipped(name)
        b = bytearray(p.read_bytes())
        for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            i = b.find(sig)
            b[i + off] |= 1
        p.write_bytes(bytes(b))
        return p

    def compress_zip(self, name: str) -> Path:
        """The manifest's compression method is 99 (AES, not supported by zipfile)."""
        p = self.zipped(name)
        b = bytearray(p.read_bytes())
        for sig, off in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
            i = b.find(sig)
            b[i + off: i + off + 2] = (99).to_bytes(2, "little")
        p.write_bytes(bytes(b))
        return p

    def bad_crc_zip(self, name: str) -> Path:
        p = self.work / f"{name}.sams"
        with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
            z.writestr(MANIFEST, json.dumps(self.manifest))
            z.writestr(WEIGHTS, self.weights)
        b = bytearray(p.read_bytes())
        i = b.find(b'"format"')
        b[i + 1] = ord("F")  # one byte of the stored manifest changed, CRC unchanged
        p.write_bytes(bytes(b))
        return p

    def many_members(self, name: str) -> Path:
        p = self.zipped(name)
        with zipfile.ZipFile(p, "a") as z:
            for k in range(20_000):
                z.writestr(f"x/{k}", b"")
        return p

    def declared_large(self, name: str) -> Path:
        """A member declaring 9 GB uncompressed (headers edited; the data is small)."""
        p = self.zipped(name)
        with zipfile.ZipFile(p, "a") as z:
            z.writestr("pad.bin", b"x" * 100)
        b = bytearray(p.read_bytes())
        i = b.rfind(b"PK\x01\x02")  # central header of pad.bin: uncompressed size at +24
        b[i + 24: i + 28] = (0xFFFFFFF0).to_bytes(4, "little")
        p.write_bytes(bytes(b))
        return p

    def linked_folder(self, target: str | None) -> Path:
        d = Path(tempfile.mkdtemp(dir=self.work))
        real = self.work / "real_manifest.json"
        real.write_text(json.dumps(self.manifest))
        if target is None:
            (d / MANIFEST).symlink_to(real)
            (d / WEIGHTS).write_bytes(self.weights)
        else:
            (d / MANIFEST).write_text(json.dumps(self.manifest))
            (d / WEIGHTS).symlink_to(target)
        return d

    def fifo_folder(self) -> Path:
        d = Path(tempfile.mkdtemp(dir=self.work))
        (d / MANIFEST).write_text(json.dumps(self.manifest))
        os.mkfifo(d / WEIGHTS)
        return d

    def empty_folder(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.work))

    def empty_file(self) -> Path:
        p = self.work / "empty.sams"
        p.write_bytes(b"")
        return p

    def text_file(self) -> Path:
        p = self.work / "text.sams"
        p.write_text("hello")
        return p

    # ---- screens ---------------------------------------------------------------------------
    def screen_with(self, name: str, labels: Callable[[list[str]], list[str]] | None = None, raw: bool = False) -> Path:
        a = self.adata.copy()
        if labels is not None:
            a.obs["perturbation"] = labels(list(a.obs["perturbation"].astype(str)))
        if raw:
            a.raw = a.copy()
            x = a.X.toarray()
            a.X = np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32)
        p = self.work / f"{name}.h5ad"
        a.write_h5ad(p)
        return p

    def screen_cases(self) -> list[Case]:
        cases: list[Case] = []

        def add(name, fn):
            cases.append(("screen", name, fn))

        def read(p: Path, **kw):
            from sams_core.data.screen import read_h5ad

            return read_h5ad(p, **kw)

        def empty_labels(ls):
            return ["" if x == "control" and i % 2 else x for i, x in enumerate(ls)]

        def nan_labels(ls):
            return ["nan" if x == "KLF1" else x for x in ls]

        def under(ls):
            return [x.replace("+", "_") for x in ls]

        def pipe(ls):
            return [x.replace("+", "|") for x in ls]

        add("empty-string labels", lambda: (read(self.screen_with("empty", empty_labels)), None)[1])
        add("'nan' as a label", lambda: (read(self.screen_with("nanlab", nan_labels)), None)[1])

        def raw_counts():
            d = read(self.screen_with("raw", raw=True))
            if d.is_counts and d.settings.get("counts_source") == "raw.X":
                return "documented: counts read from raw.X and recorded as the counts source"
            return None

        add("counts only in .raw (X log-normalised)", raw_counts)

        def pair_train(sep_fn, name):
            p = self.screen_with(name, sep_fn)
            run_cli("train", "--data", str(p), "--epochs", "1", "--latent", "3", "--hidden", "8", "--no-eval",
                    "--out", str(self.work / f"{name}.sams"))
            return None

        add("A_B pair labels (default separator)", lambda: pair_train(under, "under"))
        add("A|B pair labels (default separator)", lambda: pair_train(pipe, "pipe"))

        def counts_model_on_lognorm():
            a = self.adata.copy()
            x = a.X.toarray()
            a.X = np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32)
            p = self.work / "lognorm.h5ad"
            a.write_h5ad(p)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                run_cli("evaluate", str(self.bundle), "--data", str(p), "--samples", "2", "--ate-samples", "10")
            return None

        add("counts model evaluated on log-normalised data", counts_model_on_lognorm)
        return cases

    # ---- command line ----------------------------------------------------------------------
    def cli_cases(self) -> list[Case]:
        cases: list[Case] = []
        s, b = str(self.screen), str(self.bundle)

        def train(name, *extra, out=None):
            o = out if out is not None else str(self.work / f"cli_{len(cases)}.sams")
            cases.append(("cli", name, lambda: run_cli("train", "--data", s, "--latent", "3", "--hidden", "8",
                                                        "--no-eval", "--out", o, *(extra or ("--epochs", "1"))) ))

        train("--epochs 0", "--epochs", "0")
        train("--epochs -3", "--epochs", "-3")
        train("--steps 0", "--steps", "0", "--epochs", "1")
        train("--latent 0", "--latent", "0", "--epochs", "1")
        train("--hidden 0", "--hidden", "0", "--epochs", "1")
        train("--layers -1", "--layers", "-1", "--epochs", "1")
        train("--lr nan", "--lr", "nan", "--epochs", "1")
        train("--lr -1", "--lr", "-1", "--epochs", "1")
        train("--batch-size 0", "--batch-size", "0", "--epochs", "1")
        train("--particles 0", "--particles", "0", "--epochs", "1")
        train("--fraction 2", "--fraction", "2", "--epochs", "1")
        train("--val-fraction -0.1", "--val-fraction", "-0.1", "--epochs", "1")
        train("--grad-clip nan", "--grad-clip", "nan", "--epochs", "1")
        train("--early-stopping 0", "--early-stopping", "0", "--epochs", "1")
        train("--chunk-size 0 --backed", "--chunk-size", "0", "--backed", "--epochs", "1")
        train("--out in an unwritable folder", out="/proc/nope/model.sams")
        existing = self.work / "notes.txt"
        existing.write_text("my notes")
        train("--out an existing file that is not a bundle", out=str(existing))
        folder = self.work / "photos"
        folder.mkdir()
        (folder / "cat.jpg").write_bytes(b"x")
        train("--out an existing folder that is not a bundle", out=str(folder))
        train("--out an empty name", out="")

        def predict(name, *extra):
            cases.append(("cli", name, lambda: run_cli("predict", b, *extra)))

        p0 = self.manifest["perturbations"][0]
        for dose in ("nan", "inf", "-1", "1e9"):
            predict(f"dosage {p0}:{dose}", "--perturbations", f"{p0}:{dose}", "--samples", "200")
        predict("--samples 0 (predict)", "--perturbations", p0, "--samples", "0")
        predict("--samples -5 (predict)", "--perturbations", p0, "--samples", "-5")
        predict("--level nan", "--perturbations", p0, "--level", "nan", "--samples", "200")
        predict("unknown perturbation", "--perturbations", "NOPE", "--samples", "200")
        predict("empty perturbation label", "--perturbations", "", "--samples", "200")
        cases.append(("cli", "--samples 0 (evaluate)", lambda: run_cli("evaluate", b, "--data", s, "--samples", "0")))
        cases.append(("cli", "--samples -5 (evaluate)", lambda: run_cli("evaluate", b, "--data", s, "--samples", "-5")))
        cases.append(("cli", "--max-cells 0 (evaluate)", lambda: run_cli("evaluate", b, "--data", s, "--max-cells", "0", "--samples", "2")))
        return cases


def classify(fn: Callable[[], str | None]) -> tuple[str, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            note = fn()
    except SamsError as e:
        return "message", str(e).splitlines()[0][:160] if str(e) else "(empty message)"
    except Exception as e:  # noqa: BLE001
        return "traceback", f"{type(e).__name__}: {str(e)[:140]}"
    if note and note.startswith("documented"):
        return "documented", note
    return "silent", note or "accepted"


def build_bombs(work: Path) -> dict[str, str]:
    """The memory cases' code, reading zip bombs built once in ``work`` (so only reading is timed)."""
    manifest_bomb, weights_bomb = work / "manifest_bomb.sams", work / "weights_bomb.sams"
    chunk = b" " * 2**24
    with zipfile.ZipFile(manifest_bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open(MANIFEST, "w", force_zip64=True) as f:
            f.write(b"{")
            for _ in range(64):
                f.write(chunk)
            f.write(b"}")
        z.writestr(WEIGHTS, b"")
    with zipfile.ZipFile(weights_bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr(MANIFEST, json.dumps({"format": "sams-bundle", "format_version": 1}))
        with z.open(WEIGHTS, "w", force_zip64=True) as f:
            for _ in range(64):
                f.write(b"\0" * 2**24)
    shipped = sorted((ROOT / "assets").rglob("*.sams"))[0]
    with zipfile.ZipFile(shipped) as z:
        real = json.loads(z.read(MANIFEST))
    real["weights_bytes"] = 2**30  # a plausible manifest that declares 1 GiB of weights
    declared_bomb = work / "declared_bomb.sams"
    with zipfile.ZipFile(declared_bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr(MANIFEST, json.dumps(real))
        with z.open(WEIGHTS, "w", force_zip64=True) as f:
            for _ in range(64):
                f.write(b"\0" * 2**24)
    return {
        f"zip of {declared_bomb.stat().st_size / 1e6:.1f} MB, a real manifest, weights of 1 GiB": (
            f"from sams_core.io.bundle import load_bundle\nload_bundle({str(declared_bomb)!r})"),
        "/dev/zero as a bundle path": "from sams_core.io.bundle import load_bundle\nload_bundle('/dev/zero')",
        "/dev/zero as the screen path": "from sams_core.data.screen import read_h5ad\nread_h5ad('/dev/zero')",
        f"zip of {manifest_bomb.stat().st_size / 1e6:.1f} MB whose manifest expands to 1 GiB": (
            f"from sams_core.io.bundle import load_bundle\nload_bundle({str(manifest_bomb)!r})"),
        f"zip of {weights_bomb.stat().st_size / 1e6:.1f} MB whose weights expand to 1 GiB": (
            f"from sams_core.io.bundle import load_bundle\nload_bundle({str(weights_bomb)!r})"),
    }


def memory_case(code: str) -> tuple[str, float, float]:
    """Outcome, seconds and peak memory growth (MB, over the process after importing sams_core) of
    ``code`` in a child process (3 GB address-space cap, 180 s including imports)."""
    wrapper = (
        "import resource, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 * 1024**3, 3 * 1024**3))\n"
        "from sams_core.errors import SamsError\n"
        "import sams_core.io.bundle, sams_core.data.screen\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "t0 = time.perf_counter()\n"
        "try:\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "    out = 'silent'\n"
        "except SamsError as e:\n"
        "    out = 'message: ' + str(e)[:100]\n"
        "except BaseException as e:\n"
        "    out = 'traceback: ' + type(e).__name__\n"
        "print(out, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, sep='\\t')\n"
    )
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=180, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "killed after 180 s", 180.0, float("nan")
    lines = [ln for ln in r.stdout.splitlines() if "\t" in ln]
    if not lines:
        return f"crashed (exit {r.returncode}): {r.stderr.strip()[-120:]}", time.perf_counter() - t0, float("nan")
    out, secs, mb = lines[-1].split("\t")
    return out, float(secs), float(mb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="one line per case")
    ap.add_argument("--json", default=None, help="write the outcomes to this JSON file")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Probe(Path(tmp))
        cases = probe.bundle_cases() + probe.screen_cases() + probe.cli_cases()
        results = []
        for group, name, fn in cases:
            outcome, detail = classify(fn)
            results.append({"group": group, "case": name, "outcome": outcome, "detail": detail})
            if args.verbose:
                print(f"{group:7} {outcome:10} {name:48} {detail}")
    counts = Counter(r["outcome"] for r in results)
    print(f"\n| inputs tried | clear messages | documented | silent | tracebacks |\n|---|---|---|---|---|\n"
          f"| {len(results)} | {counts['message']} | {counts['documented']} | {counts['silent']} | {counts['traceback']} |")
    for group in ("bundle", "screen", "cli"):
        c = Counter(r["outcome"] for r in results if r["group"] == group)
        print(f"  {group}: {sum(c.values())} tried, {c['message']} messages, {c['documented']} documented, "
              f"{c['silent']} silent, {c['traceback']} tracebacks")
    print("\n| memory case | outcome | seconds | peak growth MB |\n|---|---|---|---|")
    mem = []
    with tempfile.TemporaryDirectory() as tmp:
        cases_mem = build_bombs(Path(tmp))
        for name, code in cases_mem.items():
            out, secs, mb = memory_case(code)
            mem.append({"case": name, "outcome": out, "seconds": secs, "peak_mb": mb})
            print(f"| {name} | {out[:90]} | {secs:.2f} | {mb:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": results, "memory": mem}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
