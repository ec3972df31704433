"""Seconds for interactive queries: predicted effect of a combination (cold and warm).

    python bench/interpret_speed.py            # 2,000-gene SAMS-VAE (untrained weights: timing only)

Target (issue: interpretation API): warm call < 200 ms on CPU for a 2,000-gene model.
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

from sams_core.bundle import ModelBundle, make_manifest  # noqa: E402
from sams_core.interpret import predict_effect  # noqa: E402
from sams_core.models import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--perturbations", type=int, default=105)
    ap.add_argument("--latent", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=350)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
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
    print(f"{args.genes} genes, K={args.latent}, hidden {args.hidden}, 100 global draws × 10 cells, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
