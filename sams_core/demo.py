"""The shipped demo: a small simulated SAMS-style screen and five model bundles trained on it.

``build_demo()`` (also ``python -m sams_core build-demo``) rebuilds ``assets/demo/``
deterministically: ``screen.h5ad`` plus one ``<name>.sams`` bundle per model family, all
trained on the same held-out-combinations split (the simulator's suggested held-out pairs).
The catalogue (``DEMO_DIR``, ``DEMO_MODELS``) loads without PyTorch for the dashboard; the
builders import the training stack when they run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sams_core.settings import SETTINGS

DEMO_DIR = SETTINGS.demo_dir
DATA_FILE = "screen.h5ad"

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


def demo_paths(out_dir: str | Path = DEMO_DIR) -> tuple[Path, dict[str, Path]]:
    """The demo screen and the demo bundles (name -> path) that exist in ``out_dir``."""
    out = Path(out_dir)
    return out / DATA_FILE, {n: out / f"{n}.sams" for n in DEMO_MODELS if (out / f"{n}.sams").exists()}


def build_demo(
    out_dir: str | Path = DEMO_DIR,
    epochs: int = 200,
    models: list[str] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Path]:
    """Simulate the demo screen, train the demo bundles, write them to ``out_dir``.

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
    adata.write_h5ad(data_path, compression="gzip")
    data = from_anndata(adata)
    heldout = [str(c) for c in np.asarray(adata.uns["sams_truth"]["heldout_combinations"]).tolist()]
    kind, fraction, seed = SPLIT
    spec = _HeldoutSpec(kind, fraction, seed=seed, heldout=heldout)
    written: dict[str, Path] = {"data": data_path}
    say(f"screen: {data.n_cells} cells x {data.n_genes} genes, {len(heldout)} held-out combinations ({time.perf_counter() - t0:.1f} s)")
    for name in models or list(DEMO_MODELS):
        family, hp = DEMO_MODELS[name]
        torch.manual_seed(0)
        t1 = time.perf_counter()
        cfg = TrainConfig(epochs=epochs, batch_size=256, seed=0, device="cpu")
        path = out / f"{name}.sams"
        bundle, _, ev = train_bundle(data, family, spec, cfg, path, n_ate_samples=500, n_latent=N_LATENT, n_hidden=N_HIDDEN, **hp)
        written[name] = path
        say(f"{name}: {bundle.label}, {time.perf_counter() - t1:.1f} s")
    written.update(build_demo_embeddings(out, log=say))
    say(f"demo built in {time.perf_counter() - t0:.1f} s -> {out}")
    return written


def build_demo_embeddings(out_dir: str | Path = DEMO_DIR, log: Callable[[str], None] | None = print) -> dict[str, Path]:
    """UMAP layouts (full and basal latents, every cell) of each demo bundle, written to
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
        for latent in ("full", "basal"):
            t = time.perf_counter()
            umap_embedding(bundle, data, latent=latent, max_cells=data.n_cells, shipped_dirs=(), cache_dir=target)
            say(f"{name}: UMAP of {latent} latents, {time.perf_counter() - t:.1f} s")
    for f in sorted(target.glob("umap_*.npz")):
        written[f"embedding:{f.stem}"] = f
    return written


class _HeldoutSpec:
    """A SplitSpec that holds out the given combinations (the simulator's suggestion)."""

    def __init__(self, kind: str, fraction: float, seed: int, heldout: list[str]):
        from sams_core.pipeline import SplitSpec

        self._spec = SplitSpec(kind, fraction, seed=seed)
        self._heldout = heldout

    def make(self, data, heldout=None):
        return self._spec.make(data, heldout if heldout is not None else self._heldout)

    def as_dict(self) -> dict[str, Any]:
        return self._spec.as_dict()


def build_demo_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sams_core build-demo",
        description="Rebuild the shipped demo (a simulated screen and five model bundles) deterministically.",
    )
    p.add_argument("--out", default=str(DEMO_DIR), help="output folder (default: assets/demo)")
    p.add_argument("--epochs", type=int, default=200, help="training epochs per model (default 200)")
    p.add_argument("--models", nargs="*", choices=list(DEMO_MODELS), help="only these bundles (default: all)")
    p.add_argument("--embeddings-only", action="store_true",
                   help="only recompute the shipped UMAP layouts of the bundles already in --out")
    args = p.parse_args(argv)
    if args.embeddings_only:
        build_demo_embeddings(args.out)
        return 0
    build_demo(args.out, args.epochs, args.models)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(build_demo_main())
