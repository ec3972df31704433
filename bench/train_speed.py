"""Seconds per training epoch of every model family at the reference simulator size.

Reference configuration (DESIGN §6): 70,000 cells × 100 genes, K = 15, one 350-wide hidden
layer, batch 512, 5 particles, Gaussian likelihood, mean-field guide; validation excluded.

    python bench/train_speed.py                 # all families, 3 timed epochs each
    python bench/train_speed.py --families sams_vae --epochs 5 --precisions float32

Each model runs 1 warm-up epoch and ``--epochs`` timed epochs in float32 and in bf16-mixed
precision from the same initialisation; "val -ELBO" (5% of cells held out, evaluated in
float32) after those epochs shows whether bf16 costs accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sams_core.data.screen import PerturbationData
from sams_core.training.build import build_for_data
from sams_core.training.trainer import TrainConfig, fit


def reference_data(n_cells: int, n_genes: int, n_perts: int, seed: int = 0) -> PerturbationData:
    """Gaussian (log-normalised) data with the shape of the reference simulator."""
    rng = np.random.default_rng(seed)
    labels_idx = rng.integers(-1, n_perts, n_cells)
    d = np.zeros((n_cells, n_perts), dtype=np.float32)
    d[labels_idx >= 0, labels_idx[labels_idx >= 0]] = 1.0
    w = rng.normal(size=(n_perts, n_genes)).astype(np.float32)
    x = (rng.normal(size=(n_cells, n_genes)) + d @ w).astype(np.float32)
    labels = np.array(["control" if i < 0 else f"P{i}" for i in labels_idx], dtype=object)
    return PerturbationData(
        X=x, is_counts=False, library=np.ones(n_cells, np.float32), dosages=d, labels=labels,
        perturbations=[f"P{i}" for i in range(n_perts)], genes=[f"g{i}" for i in range(n_genes)],
        obs=pd.DataFrame(index=[str(i) for i in range(n_cells)]),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=70_000)
    ap.add_argument("--genes", type=int, default=100)
    ap.add_argument("--perturbations", type=int, default=100)
    ap.add_argument("--latent", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=350)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs (one more, untimed, warms up)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--precisions", nargs="+", default=["float32", "bf16-mixed"])
    ap.add_argument("--families", nargs="+", default=["sams_vae", "sams_vae:correlated", "cpa_vae", "conditional_vae", "vae", "svae_plus"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = reference_data(args.cells, args.genes, args.perturbations)
    split = np.full(data.n_cells, "train", dtype=object)
    split[np.random.default_rng(0).random(data.n_cells) < 0.05] = "val"  # for the ELBO check only
    rows = []
    for spec in args.families:
        family, _, guide = spec.partition(":")
        hp = {"n_latent": args.latent, "n_hidden": args.hidden, "likelihood": "gaussian"}
        if family in ("sams_vae", "cpa_vae"):
            hp["guide"] = guide or "mean-field"
        for precision in args.precisions:
            torch.manual_seed(0)
            model = build_for_data(family, data, split, **hp)
            cfg = {"device": "cpu", "precision": precision}
            fit(model, data, split, TrainConfig(epochs=1, **cfg))  # warm-up
            res = fit(model, data, split, TrainConfig(epochs=args.epochs, **cfg))
            # seconds per epoch exclude validation (timed separately inside fit)
            secs = [h.seconds - h.val_seconds for h in res.history]
            rows.append({
                "model": spec,
                "precision": precision,
                "s/epoch (median)": float(np.median(secs)),
                "s/epoch (min)": float(np.min(secs)),
                "cells/s": float((split == "train").sum() / np.median(secs)),
                "val -ELBO": res.history[-1].val_loss,
            })
            print(f"{spec} {precision}: {np.median(secs):.2f} s/epoch, val -ELBO {res.history[-1].val_loss:.2f}", file=sys.stderr)
    print(f"\n{args.cells} cells × {args.genes} genes, K={args.latent}, hidden {args.hidden}, batch 512, 5 particles, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
