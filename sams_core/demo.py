"""The shipped demos: a real Perturb-seq screen and a small simulated one, each with model bundles.

``build_demo()`` (also ``python -m sams_core build-demo``) rebuilds both deterministically:

- ``assets/demo_real/`` — the real screen (PerturBench's development subset of Norman 2019 K562
  CRISPRa and McFaline-Figueroa 2023 glioma lines, 5,961 cells × 500 genes), copied byte for
  byte from ``../shared/data`` with its BSD-3 licence notice and a provenance record
  (``provenance.json`` and ``README.md``: source, commit, SHA-256, contents, the CRISPRa/CRISPRi
  trap, the held-out conditions), and bundles of SAMS-VAE (the paper's model, the default) and
  the baselines, trained on a split that holds out some Norman pairs (and, when the library has
  covariates, one glioma line's perturbations);
- ``assets/demo/`` — the simulated SAMS-style screen and five bundles trained on it (the
  simulator's suggested held-out pairs).

The catalogue (:data:`DEMOS`, :data:`DEFAULT_DEMO`, and for the simulated demo ``DEMO_DIR``,
``DEMO_MODELS``) loads without PyTorch for the dashboard; the builders import the training stack
when they run (function-level imports are allowed here for that reason).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sams_core.errors import SamsError
from sams_core.settings import SETTINGS

DATA_FILE = "screen.h5ad"
#: The Latent space page's default number of cells (a seeded subsample above it): layouts of that
#: many cells ship too, so the page opens on a larger screen without computing a UMAP.
PAGE_LAYOUT_CELLS = 2000
PROVENANCE_FILE = "provenance.json"
LICENSE_FILE = "LICENSE.perturbench.txt"


@dataclass(frozen=True)
class Demo:
    """One shipped demo: its key, the name the sidebar shows, its folder and its bundles
    (name -> (family, hyper-parameters), in the order the app lists them)."""

    key: str
    label: str
    folder: Path
    models: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def data_path(self) -> Path:
        """The demo's screen."""
        return self.folder / DATA_FILE

    def bundle_paths(self) -> dict[str, Path]:
        """name -> path of the demo's bundles that exist on disk."""
        return {n: self.folder / f"{n}.sams" for n in self.models if (self.folder / f"{n}.sams").exists()}


# ---------------------------------------------------------------------------------------------
# the simulated demo (assets/demo)
DEMO_DIR = SETTINGS.demo_dir
# name -> (family, hyper-parameters); the order is the order shown in the app
DEMO_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "sams_vae_mean_field": ("sams_vae", {"guide": "mean-field"}),
    "sams_vae_correlated": ("sams_vae", {"guide": "correlated", "embed_hidden": 64}),
    "cpa_vae": ("cpa_vae", {}),
    "conditional_vae": ("conditional_vae", {}),
    "svae_plus": ("svae_plus", {}),
}
SIM_ARGS = dict(n_perturbations=12, n_latent=6, n_genes=150, n_combinations=16, cells_per_perturbation=60, seed=0)
SPLIT = ("heldout-combos", 0.25, 0)
N_LATENT = 6
N_HIDDEN = 64
SIM_EPOCHS = 200

# ---------------------------------------------------------------------------------------------
# the real demo (assets/demo_real)
REAL_DIR = SETTINGS.demo_real_dir
#: Where the real screen is read from: ``../shared/data`` beside the repository.
REAL_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_SOURCE_FILE = "perturbench_devel.h5ad"
REAL_SHA256 = "220998f5630c813228c8661c86dd52244b9ac87127511289af90e0d900d8429b"
REAL_ORIGIN = {
    "project": "PerturBench (altoslabs/perturbench)",
    "url": "https://github.com/altoslabs/perturbench",
    "path": "src/perturbench/data/resources/devel.h5ad",
    "commit": "d357dfa",
    "licence": "BSD 3-Clause (full text in LICENSE.perturbench.txt)",
    "studies": [
        "Norman et al. 2019 (PerturBench's norman19) — K562 cells, CRISPRa (activation), singles and pairs",
        "McFaline-Figueroa et al. 2023 (PerturBench's mcfaline23) — glioma lines A172, T98G, U87MG, CRISPRi/knock-out",
    ],
}
REAL_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "sams_vae": ("sams_vae", {}),
    "cpa_vae": ("cpa_vae", {}),
    "conditional_vae": ("conditional_vae", {}),
    "svae_plus": ("svae_plus", {}),
}
#: Norman pairs held out of training (both members of each were measured alone, so the pair's
#: effect is a fair question for a model of composition).
REAL_HELDOUT_PAIRS = ["KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+SLC38A2", "MAPK1+TGFBR2"]
#: The glioma line whose perturbations are held out (predicted from the other two lines) when
#: the library trains with covariates.
REAL_HELDOUT_LEVEL = ("cell_type", "U87MG")
REAL_COVARIATES = ["cell_type"]
REAL_N_LATENT = 10
REAL_N_HIDDEN = 64
REAL_EPOCHS = 40
REAL_LABEL = "Real screen: Norman 2019 K562 CRISPRa + McFaline-Figueroa 2023 glioma lines, 5,961 cells"
SIM_LABEL = "Simulated SAMS screen: 12 perturbations, 16 pairs, 150 genes (synthetic gene names)"

DEMOS: dict[str, Demo] = {
    "real": Demo("real", REAL_LABEL, REAL_DIR, REAL_MODELS),
    "simulated": Demo("simulated", SIM_LABEL, DEMO_DIR, DEMO_MODELS),
}
#: The demo the dashboard opens first.
DEFAULT_DEMO = "real"


def demo_paths(out_dir: str | Path = DEMO_DIR) -> tuple[Path, dict[str, Path]]:
    """The demo screen in ``out_dir`` and the demo bundles (name -> path) that exist there,
    in catalogue order (the bundles of either demo)."""
    out = Path(out_dir)
    names = list(dict.fromkeys([*DEMO_MODELS, *REAL_MODELS]))
    return out / DATA_FILE, {n: out / f"{n}.sams" for n in names if (out / f"{n}.sams").exists()}


def read_provenance(folder: str | Path = REAL_DIR) -> dict[str, Any]:
    """The real demo's provenance record (source, SHA-256, contents, held-out conditions, training)."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        raise SamsError(f"No {PROVENANCE_FILE} in {folder}. Rebuild the demo: python -m sams_core build-demo --only real")
    return json.loads(path.read_text())


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _atomic_write(dst: Path, text: str) -> None:
    tmp = dst.with_name(f".{dst.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, dst)


def _progress(epochs: int, desc: str, show: bool):
    from sams_core.training.trainer import tqdm_progress

    if not show:
        return None, (lambda: None)
    return tqdm_progress(epochs, desc=desc)


# ---------------------------------------------------------------------------------------------
def build_demo(
    out_dir: str | Path = DEMO_DIR,
    epochs: int = SIM_EPOCHS,
    models: list[str] | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
) -> dict[str, Path]:
    """Simulate the simulated demo's screen, train its bundles, write them to ``out_dir``.

    Returns name -> path of every file written (``"data"`` for the screen).
    """
    import torch

    from sams_core.data.screen import from_anndata
    from sams_core.pipeline import train_bundle
    from sams_core.simulate import simulate_sams_screen
    from sams_core.training.trainer import TrainConfig

    say = log or (lambda s: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    adata = simulate_sams_screen(**SIM_ARGS)
    data_path = out / DATA_FILE
    tmp = out / f".{DATA_FILE}.partial"
    adata.write_h5ad(tmp, compression="gzip")
    os.replace(tmp, data_path)
    data = from_anndata(adata)
    heldout = [str(c) for c in np.asarray(adata.uns["sams_truth"]["heldout_combinations"]).tolist()]
    kind, fraction, seed = SPLIT
    spec = _HeldoutSpec(kind, fraction, seed=seed, heldout=heldout)
    written: dict[str, Path] = {"data": data_path}
    say(f"simulated screen: {data.n_cells} cells x {data.n_genes} genes, {len(heldout)} held-out combinations ({time.perf_counter() - t0:.1f} s)")
    for name in models or list(DEMO_MODELS):
        family, hp = DEMO_MODELS[name]
        torch.manual_seed(0)
        t1 = time.perf_counter()
        cfg = TrainConfig(epochs=epochs, batch_size=256, seed=0, device="cpu")
        path = out / f"{name}.sams"
        update, close = _progress(epochs, name, progress)
        try:
            bundle, _, ev = train_bundle(data, family, spec, cfg, path, progress=update, n_ate_samples=500,
                                         n_latent=N_LATENT, n_hidden=N_HIDDEN, **hp)
        finally:
            close()
        written[name] = path
        say(f"{name}: {bundle.label}, {time.perf_counter() - t1:.1f} s")
    written.update(build_demo_embeddings(out, log=say))
    say(f"simulated demo built in {time.perf_counter() - t0:.1f} s -> {out}")
    return written


def real_heldout_pairs(data: Any) -> list[str]:
    """The (condition, cell type) pairs the real demo holds out, as ``"CONDITION@LEVEL"``: the Norman
    pairs of :data:`REAL_HELDOUT_PAIRS` in K562 and every perturbation of the glioma line
    :data:`REAL_HELDOUT_LEVEL` that is also measured in another line (predicted there from them)."""
    key, held_level = REAL_HELDOUT_LEVEL
    cell_type = data.obs[key].astype(str).to_numpy()
    labels = data.labels.astype(str)
    treated = labels != "control"
    pert = sorted(set(labels[treated & (cell_type == held_level)]))
    elsewhere = {lab for lab in pert if np.any(treated & (labels == lab) & (cell_type != held_level))}
    pairs_level = sorted(set(cell_type[np.isin(labels, REAL_HELDOUT_PAIRS)]))
    return [f"{p}@{lv}" for p in REAL_HELDOUT_PAIRS for lv in pairs_level] + [f"{p}@{held_level}" for p in pert if p in elsewhere]


def real_split_spec(data: Any, seed: int = 0) -> Any:
    """The real demo's split (``heldout-covariate`` with named pairs, recreated from the bundle's
    manifest by the app): :func:`real_heldout_pairs` are the test set."""
    return _HeldoutSpec("heldout-covariate", 1.0, seed=seed, heldout=real_heldout_pairs(data))


def build_real_demo(
    out_dir: str | Path = REAL_DIR,
    source: str | Path = REAL_SOURCE,
    epochs: int = REAL_EPOCHS,
    models: list[str] | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
) -> dict[str, Path]:
    """Copy the real screen from ``source`` (a folder holding ``perturbench_devel.h5ad`` and its
    licence) into ``out_dir`` with its provenance, train the real demo's bundles on it.

    Raises :class:`SamsError` when the source file is missing or is not the published one
    (its SHA-256 differs), since the provenance would then be false.
    """
    import torch

    from sams_core.data.screen import read_h5ad
    from sams_core.pipeline import train_bundle
    from sams_core.training.trainer import TrainConfig

    say = log or (lambda s: None)
    src = Path(source)
    src_file = src / REAL_SOURCE_FILE if src.is_dir() else src
    licence = src_file.parent / LICENSE_FILE
    if not src_file.is_file() or not licence.is_file():
        raise SamsError(
            f"The real screen's source {src_file} (with {LICENSE_FILE} beside it) was not found. "
            "Pass --real-source FOLDER holding perturbench_devel.h5ad and its licence, or build only the simulated demo (--only simulated)."
        )
    sha = file_sha256(src_file)
    if sha != REAL_SHA256:
        raise SamsError(
            f"{src_file} has SHA-256 {sha}, not the published subset's {REAL_SHA256}. "
            "Use the unmodified PerturBench devel.h5ad (commit d357dfa)."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data_path = out / DATA_FILE
    _atomic_copy(src_file, data_path)
    _atomic_copy(licence, out / LICENSE_FILE)
    written: dict[str, Path] = {"data": data_path, "licence": out / LICENSE_FILE}

    data = read_h5ad(data_path, covariate_keys=REAL_COVARIATES)
    spec = real_split_spec(data)
    say(f"real screen: {data.n_cells:,} cells x {data.n_genes} genes, covariates {data.covariate_keys}; "
        f"held out: {', '.join(spec.heldout)}")
    for name in models or list(REAL_MODELS):
        family, hp = REAL_MODELS[name]
        torch.manual_seed(0)
        t1 = time.perf_counter()
        cfg = TrainConfig(epochs=epochs, batch_size=256, seed=0, device="cpu")
        path = out / f"{name}.sams"
        update, close = _progress(epochs, name, progress)
        try:
            bundle, _, _ = train_bundle(data, family, spec, cfg, path, progress=update, n_ate_samples=500,
                                        n_latent=REAL_N_LATENT, n_hidden=REAL_N_HIDDEN, **hp)
        finally:
            close()
        written[name] = path
        say(f"{name}: {bundle.label}, {time.perf_counter() - t1:.1f} s")
    written.update(write_real_record(out))
    written.update(build_demo_embeddings(out, log=say))
    say(f"real demo built in {time.perf_counter() - t0:.1f} s -> {out}")
    return written


def write_real_record(out_dir: str | Path = REAL_DIR) -> dict[str, Path]:
    """Write the real demo's ``provenance.json`` and ``README.md`` from what is in ``out_dir``: the
    screen (its SHA-256, size, contents) and the bundles' manifests (split, covariates, epochs)."""
    import anndata as ad

    from sams_core.io.manifest import model_label, read_manifest

    out = Path(out_dir)
    data_path = out / DATA_FILE
    bundles = {n: out / f"{n}.sams" for n in REAL_MODELS if (out / f"{n}.sams").exists()}
    if not data_path.is_file() or not bundles:
        raise SamsError(f"{out} holds no real screen or no bundles. Rebuild it: python -m sams_core build-demo --only real")
    manifests = {n: read_manifest(p) for n, p in bundles.items()}
    first = next(iter(manifests.values()))
    record = _real_provenance(ad.read_h5ad(data_path, backed="r").obs, file_sha256(data_path), data_path.stat().st_size,
                              first, {n: model_label(m) for n, m in manifests.items()})
    _atomic_write(out / PROVENANCE_FILE, json.dumps(record, indent=1) + "\n")
    _atomic_write(out / "README.md", _real_readme(record))
    return {"provenance": out / PROVENANCE_FILE, "readme": out / "README.md"}


def _real_provenance(obs: Any, sha: str, n_bytes: int, manifest: dict[str, Any], trained: dict[str, str]) -> dict[str, Any]:
    split, data_settings, config = manifest["split"], manifest["data"], manifest["training"]["config"]
    pairs = [f"{c}@{lv}" for c, lv in split.get("test_pairs", [])] or list(split.get("test_conditions", []))
    by_dataset = {
        str(ds): {
            "cells": int((obs["dataset"] == ds).sum()),
            "cell_types": sorted(map(str, obs.loc[obs["dataset"] == ds, "cell_type"].unique())),
            "perturbation_type": sorted(map(str, obs.loc[obs["dataset"] == ds, "perturbation_type"].unique())),
            "conditions": int(obs.loc[obs["dataset"] == ds, "condition"].nunique()),
        }
        for ds in sorted(map(str, obs["dataset"].unique()))
    }
    treated = obs["condition"].astype(str) != "control"
    per_ds = [set(obs.loc[treated & (obs["dataset"] == ds), "condition"].astype(str)) for ds in by_dataset]
    shared = sorted(set.intersection(*per_ds)) if per_ds else []
    return {
        "file": DATA_FILE,
        "sha256": sha,
        "bytes": int(n_bytes),
        "origin": REAL_ORIGIN,
        "contents": {
            "cells": int(obs.shape[0]),
            "genes": len(manifest["genes"]),
            "values": "log-normalised expression (no raw counts): Gaussian likelihood",
            "datasets": by_dataset,
            "cells_per_cell_type": {str(k): int(v) for k, v in obs["cell_type"].value_counts().sort_index().items()},
        },
        "trap": (
            f"The same gene label is a different intervention in the two studies: {', '.join(shared)} are "
            "activated (CRISPRa) in K562 and knocked down (CRISPRi) in the glioma lines. A model without "
            "covariates gives each label one effect."
        ),
        "shared_labels": shared,
        "split": {**{k: split[k] for k in ("kind", "fraction", "val_fraction", "seed", "level", "covariate") if k in split},
                  "heldout_pairs": pairs, "heldout_conditions": list(split.get("test_conditions", []))},
        "data_checksum": data_settings.get("checksum"),
        "training": {
            "epochs": int(config["epochs"]),
            "batch_size": int(config["batch_size"]),
            "seed": int(config["seed"]),
            "n_latent": int(manifest["hparams"].get("n_latent", REAL_N_LATENT)),
            "n_hidden": int(manifest["hparams"].get("n_hidden", REAL_N_HIDDEN)),
            "covariates": list(data_settings.get("covariate_keys") or []),
            "models": trained,
        },
        "rebuild": "python -m sams_core build-demo --only real",
    }


def _real_readme(rec: dict[str, Any]) -> str:
    o, c, tr = rec["origin"], rec["contents"], rec["training"]
    lines = [
        "# Shipped real-screen demo",
        "",
        "Written by `python -m sams_core build-demo` (do not edit by hand; rerun it).",
        "",
        f"`{rec['file']}` is a byte-for-byte copy of {o['project']} `{o['path']}` at commit {o['commit']} "
        f"({o['url']}), SHA-256 `{rec['sha256']}`, {rec['bytes']:,} bytes. Licence: {o['licence']}; "
        "keep that notice with any copy.",
        "",
        "Studies:",
        *[f"- {s}" for s in o["studies"]],
        "",
        f"Contents: {c['cells']:,} cells × {c['genes']} genes, {c['values']}.",
        "",
        "| dataset | cells | cell types | perturbation type | conditions |",
        "|---|---|---|---|---|",
        *[
            f"| {ds} | {v['cells']:,} | {', '.join(v['cell_types'])} | {', '.join(v['perturbation_type'])} | {v['conditions']} |"
            for ds, v in c["datasets"].items()
        ],
        "",
        f"**Mind the trap.** {rec['trap']}",
        "",
        "## Bundles",
        "",
        f"Split `{rec['split']['kind']}`; held out (never trained on), as condition@cell type: "
        f"{', '.join(rec['split']['heldout_pairs'])}. "
        f"Trained {tr['epochs']} epochs, batch {tr['batch_size']}, seed {tr['seed']}, {tr['n_latent']} latent units, "
        f"{tr['n_hidden']} hidden units, covariates: {', '.join(tr['covariates']) or 'none'}.",
        "",
        *[f"- `{n}.sams`: {label}" for n, label in tr["models"].items()],
        "",
        f"Rebuild: `{rec['rebuild']}`.",
        "",
    ]
    return "\n".join(lines)


def build_demo_embeddings(out_dir: str | Path = DEMO_DIR, log: Callable[[str], None] | None = print) -> dict[str, Path]:
    """UMAP layouts (full and basal latents; every cell, and the Latent space page's default
    subsample of :data:`PAGE_LAYOUT_CELLS` cells) of each demo bundle, written to
    ``out_dir/embeddings`` so that the demo's Latent space page opens without computing them."""
    from sams_core.interpret.embed import umap_embedding
    from sams_core.io.bundle import load_bundle
    from sams_core.pipeline import data_for_bundle

    say = log or (lambda s: None)
    out = Path(out_dir)
    target = out / "embeddings"
    if target.exists():
        for old in target.glob("umap_*.npz"):
            old.unlink()
    data_path, bundles = demo_paths(out)
    written: dict[str, Path] = {}
    for name, path in bundles.items():
        bundle = load_bundle(path, device="cpu")
        data = data_for_bundle(bundle, data_path)
        for n_cells in sorted({data.n_cells, min(PAGE_LAYOUT_CELLS, data.n_cells)}):
            for latent in ("full", "basal"):
                t = time.perf_counter()
                umap_embedding(bundle, data, latent=latent, max_cells=n_cells, shipped_dirs=(), cache_dir=target)
                say(f"{name}: UMAP of {latent} latents, {n_cells} cells, {time.perf_counter() - t:.1f} s")
    for f in sorted(target.glob("umap_*.npz")):
        written[f"embedding:{f.stem}"] = f
    return written


class _HeldoutSpec:
    """A SplitSpec that holds out the given conditions (recorded in the bundle's split)."""

    def __init__(self, kind: str, fraction: float, seed: int, heldout: list[str], **extra: Any):
        from sams_core.pipeline import SplitSpec

        self._spec = SplitSpec(kind, fraction, seed=seed, **extra)
        self._heldout = heldout

    @property
    def heldout(self) -> list[str]:
        return list(self._heldout)

    def make(self, data, heldout=None):
        return self._spec.make(data, heldout if heldout is not None else self._heldout)

    def as_dict(self) -> dict[str, Any]:
        return self._spec.as_dict()


def build_demo_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sams_core build-demo",
        description="Rebuild the shipped demos deterministically: the real screen (assets/demo_real, copied from "
                    "../shared/data with its licence and provenance, and its bundles) and the simulated screen "
                    "(assets/demo and its five bundles).",
    )
    p.add_argument("--only", choices=list(DEMOS), help="build only this demo (default: both)")
    p.add_argument("--out", default=None, help="output folder of the simulated demo (default: assets/demo)")
    p.add_argument("--real-out", default=None, help="output folder of the real demo (default: assets/demo_real)")
    p.add_argument("--real-source", default=str(REAL_SOURCE),
                   help=f"folder holding {REAL_SOURCE_FILE} and {LICENSE_FILE} (default: ../shared/data beside the repository)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs per model (default {REAL_EPOCHS} for the real demo, {SIM_EPOCHS} for the simulated)")
    p.add_argument("--models", nargs="*", choices=sorted(set(DEMO_MODELS) | set(REAL_MODELS)),
                   help="only these bundles (default: all of each demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for training (default: PyTorch's)")
    p.add_argument("--embeddings-only", action="store_true",
                   help="only recompute the shipped UMAP layouts of the bundles already built")
    args = p.parse_args(argv)
    which = [args.only] if args.only else ["real", "simulated"]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    outs = {"real": Path(args.real_out or REAL_DIR), "simulated": Path(args.out or DEMO_DIR)}
    try:
        for key in which:
            if args.embeddings_only:
                build_demo_embeddings(outs[key])
                continue
            names = [m for m in (args.models or []) if m in DEMOS[key].models] or None
            if args.models and names is None:
                continue
            if key == "real":
                build_real_demo(outs[key], args.real_source, args.epochs or REAL_EPOCHS, names, progress=not args.no_progress)
            else:
                build_demo(outs[key], args.epochs or SIM_EPOCHS, names, progress=not args.no_progress)
    except SamsError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(build_demo_main())
