"""Seconds for interactive queries: predicted effect of a combination (cold and warm).

    python bench/interpret_speed.py            # 2,000-gene SAMS-VAE (untrained weights: timing only)

Targets: effect prediction warm < 200 ms on CPU for a 2,000-gene model; UMAP of 100k cells
< 60 s the first time and < 1 s cached. Also times enrichment of every unit against GO BP.

The first UMAP after installation also compiles umap-learn (numba), later processes load the
compiled code from disk. ``--numba-cache DIR`` points that cache at DIR: an empty DIR times the
first run after installation, a second run with the same DIR the first run in a new process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sams_core.io.bundle import ModelBundle, make_manifest
from sams_core.interpret.effects import predict_effect
from sams_core.models.registry import build_model


def enrichment_and_umap(bundle, model, args) -> list[dict]:
    """Time unit enrichment against GO BP and a UMAP of many cells (first and cached)."""
    import tempfile

    from sams_core.data.screen import PerturbationData
    from sams_core.interpret.embed import umap_embedding
    from sams_core.interpret.genesets import load_shipped
    from sams_core.interpret.programs import unit_enrichment

    rows = []
    go = load_shipped("go_bp")
    genes = sorted(go.genes())[: args.genes]  # real symbols so that the sets overlap the model's genes
    rng = np.random.default_rng(0)
    loadings = pd.DataFrame(rng.normal(size=(args.latent, len(genes))), columns=genes)
    for method in ("rank", "hypergeometric"):
        t = time.perf_counter()
        unit_enrichment(loadings, go, method)
        rows.append({"query": f"enrichment, {args.latent} units × GO BP ({len(go)} sets), {method}", "cold s": time.perf_counter() - t, "warm ms (median)": float("nan")})
    if args.umap_cells:
        # the UMAP works on the latents: a 100-gene model keeps the input small
        n, g = args.umap_cells, 100
        small = build_model("sams_vae", n_genes=g, n_perturbations=args.perturbations, n_latent=args.latent, n_hidden=args.hidden).eval()
        bundle = ModelBundle(small, make_manifest(small, [f"g{i}" for i in range(g)], bundle.perturbations, {"is_counts": True}))
        x = rng.poisson(2.0, size=(n, g)).astype(np.float32)
        d = np.zeros((n, args.perturbations), np.float32)
        d[np.arange(n), rng.integers(0, args.perturbations, n)] = 1.0
        data = PerturbationData(X=x, is_counts=True, library=x.sum(1) + 1, dosages=d,
                                labels=np.array(["x"] * n, dtype=object), perturbations=bundle.perturbations, genes=bundle.genes,
                                obs=pd.DataFrame(index=[str(i) for i in range(n)]))
        with tempfile.TemporaryDirectory() as cache:
            t = time.perf_counter()
            umap_embedding(bundle, data, max_cells=n, cache_dir=cache)
            first = time.perf_counter() - t
            t = time.perf_counter()
            umap_embedding(bundle, data, max_cells=n, cache_dir=cache)
            rows.append({"query": f"UMAP of {n} cells (first, cached)", "cold s": first, "warm ms (median)": 1e3 * (time.perf_counter() - t)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--perturbations", type=int, default=105)
    ap.add_argument("--latent", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=350)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--umap-cells", type=int, default=100_000, help="cells for the UMAP timing (0 skips it)")
    ap.add_argument("--numba-cache", default=None, help="numba's compile cache directory (see above)")
    args = ap.parse_args()
    if args.numba_cache:
        import os

        os.environ["NUMBA_CACHE_DIR"] = args.numba_cache  # before anything imports numba
    torch.manual_seed(0)
    model = build_model("sams_vae", n_genes=args.genes, n_perturbations=args.perturbations,
                        n_latent=args.latent, n_hidden=args.hidden).eval()
    perts = [f"P{i}" for i in range(args.perturbations)]
    bundle = ModelBundle(model, make_manifest(model, [f"g{i}" for i in range(args.genes)], perts, {"is_counts": True}))
    rows = []
    for label, kw in [("expected expression (default)", {}), ("sampled counts", {"sample_counts": True})]:
        t = time.perf_counter()
        predict_effect(bundle, "P0+P1", **kw)
        cold = time.perf_counter() - t
        times = []
        for r in range(args.repeats):
            t = time.perf_counter()
            predict_effect(bundle, f"P{r + 2}+P{r + 3}", **kw)
            times.append(time.perf_counter() - t)
        rows.append({"query": f"effect of a pair, {label}", "cold s": cold, "warm ms (median)": 1e3 * float(np.median(times))})
    rows += enrichment_and_umap(bundle, model, args)
    print(f"{args.genes} genes, K={args.latent}, hidden {args.hidden}, 100 global draws × 10 cells, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
