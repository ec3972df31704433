"""Why does SAMS-VAE switch extra masks on at the published reference size? Do the masks the
paper's ELBO keeps on, true or false, actually raise the ELBO, and how far is the fitted model from
the simulator's own?

On one reference screen (``simulate_reference_screen``, published design, ``--cells`` per single)
this trains SAMS-VAE with the default schedule and prints:

1. **The schedule's trace**: masks on, mask precision / recall / F1 (units matched to the truth)
   and the validation −ELBO at the end of each phase (warm-up, pruning, final ELBO) and at the
   delivered state.
2. **The ELBO gain of every mask that is on**, split into true and false positives: the training
   ELBO (all cells of that perturbation, 32 particles, common random numbers) with the mask on as
   trained, minus the same with q(m = 1) = 0 and its embedding entry at the prior. Positive means
   the paper's ELBO, given the fitted networks, prefers the mask on; nothing is re-fitted, so a
   positive gain is a lower bound on what switching the mask off would cost.
3. **Fit against the truth** on the validation cells (never trained on): the model's IWELBO and an
   importance-sampling lower bound on the simulator's own log p(x) (proposal N(true latent, σ²),
   the best of several σ). The gap is how much the networks leave unexplained per cell; a mask
   that fits part of it gains in proportion to the perturbation's cells.

    python bench/mask_gains.py --seed 0 --cells 700            # about 10 min on one core
    python bench/mask_gains.py --seed 0 --cells 200

Use choosing seeds (0-2): this is a diagnosis, and it looks at the answer key.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import logsumexp
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sams_core.data.batches import DeviceData
from sams_core.data.screen import from_anndata
from sams_core.evaluation.metrics import iwelbo
from sams_core.evaluation.truth import mask_scores
from sams_core.pipeline import SplitSpec
from sams_core.simulate import simulate_reference_screen, truth_from_adata
from sams_core.simulate.common import decode
from sams_core.simulate.truth import truth_masks_for
from sams_core.training.build import build_for_data
from sams_core.training.trainer import TrainConfig, condition_ids, fit


def schedule_trace(model: Any, true: np.ndarray) -> tuple[list[dict[str, Any]], Any]:
    """A progress callback recording masks on and mask precision / recall / F1 after every epoch."""
    rows: list[dict[str, Any]] = []

    def record(rec: Any) -> None:
        s = mask_scores(true, model.mask_probs().detach().cpu().numpy())
        rows.append({"epoch": rec.epoch, "phase": rec.phase, "masks_on": s["tp"] + s["fp"], "precision": s["precision"],
                     "recall": s["recall"], "f1": s["f1"], "val_neg_elbo": rec.val_loss})

    return rows, record


def phase_ends(rows: list[dict[str, Any]], delivered: dict[str, Any]) -> pd.DataFrame:
    """The trace's last row of each phase, and the delivered state."""
    table = pd.DataFrame(rows)
    ends = table.groupby("phase", sort=False).tail(1).copy()
    ends["state"] = ["end of " + p for p in ends["phase"]]
    out = pd.concat([ends, pd.DataFrame([{**delivered, "state": "delivered"}])], ignore_index=True)
    return out[["state", "epoch", "masks_on", "precision", "recall", "f1", "val_neg_elbo"]]


@torch.no_grad()
def mask_gains(model: Any, data: Any, split: np.ndarray, particles: int = 32) -> pd.DataFrame:
    """ELBO gain (nats, summed over the perturbation's training cells) of every mask that is on."""
    train_idx = np.flatnonzero(split == "train")
    src = DeviceData(data, train_idx, model.input_mean.device, condition_ids(model, data))
    dos = data.dosages[train_idx]
    dos = dos.toarray() if hasattr(dos, "toarray") else np.asarray(dos)

    def total_elbo(pos: np.ndarray) -> float:
        torch.manual_seed(123)  # the same noise for on and off: common random numbers
        total = 0.0
        for i in range(0, len(pos), 512):
            b = src.batch(torch.as_tensor(pos[i : i + 512], device=model.input_mean.device))
            total += -model.loss(b, n_particles=particles).terms["neg_elbo"].item() * b.size
        return total

    on = np.argwhere(model.mask_probs().cpu().numpy() >= 0.5)
    out = []
    for t, k in tqdm(on, desc="mask gains", file=sys.stderr):
        pos = np.flatnonzero(dos[:, t] > 0)
        with_mask = total_elbo(pos)
        kept = (model.mask_logits[t, k].item(), model.e_mean[t, k].item(), model.e_log_std[t, k].item())
        model.mask_logits[t, k] = -30.0
        model.e_mean[t, k] = 0.0
        model.e_log_std[t, k] = model.log_s
        without = total_elbo(pos)
        model.mask_logits[t, k], model.e_mean[t, k], model.e_log_std[t, k] = kept
        out.append({"perturbation": int(t), "unit": int(k), "gain": with_mask - without, "abs_e": abs(kept[1]), "cells": len(pos)})
    return pd.DataFrame(out, columns=["perturbation", "unit", "gain", "abs_e", "cells"])


def true_log_px_bound(adata: Any, truth: Any, cells: np.ndarray, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Mean over ``cells`` of an importance-sampling lower bound on the simulator's log p(x), with
    proposal N(true latent, σ²); the best σ among a few, and that σ."""
    X = np.asarray(adata.X, dtype=np.float64)
    Z, Zb = adata.obsm["X_true_latent"], adata.obsm["X_true_basal"]
    noise_sd = np.asarray(truth.noise_sd, dtype=np.float64)
    K = Z.shape[1]
    best = (-np.inf, np.nan)
    for sigma in (0.3, 0.5, 0.7, 1.0):
        rng = np.random.default_rng(seed)
        lls = []
        for i in cells:
            eps = rng.normal(size=(samples, K))
            z = Z[i] + sigma * eps
            mu = decode(truth.decoder, z)
            lpx = (-0.5 * ((X[i] - mu) / noise_sd) ** 2 - np.log(noise_sd) - 0.5 * np.log(2 * np.pi)).sum(1)
            lpz = (-0.5 * (z - (Z[i] - Zb[i])) ** 2 - 0.5 * np.log(2 * np.pi)).sum(1)
            lq = (-0.5 * eps**2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)).sum(1)
            lls.append(logsumexp(lpx + lpz - lq) - np.log(samples))
        best = max(best, (float(np.mean(lls)), sigma))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cells", type=int, default=700, help="cells per single (published: 700)")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--hp", default="{}", help='SAMS-VAE options as JSON, e.g. \'{"n_layers": 2}\'')
    ap.add_argument("--fit-cells", type=int, default=400, help="validation cells for the fit comparison")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    adata = simulate_reference_screen(seed=args.seed, cells_per_perturbation=args.cells)
    truth, data = truth_from_adata(adata), from_anndata(adata)
    split = SplitSpec("heldout-combos", 0.25, seed=args.seed).make(data)
    hp = {"n_latent": truth.n_latent, "n_hidden": args.hidden, **json.loads(args.hp)}
    model = build_for_data("sams_vae", data, split, **hp)
    true = truth_masks_for(truth, list(data.perturbations))
    rows, record = schedule_trace(model, true)
    result = fit(model, data, split, TrainConfig(epochs=args.epochs, seed=args.seed), record)
    s = mask_scores(true, model.mask_probs().detach().cpu().numpy())
    delivered = {"epoch": result.best_epoch, "masks_on": s["tp"] + s["fp"], "precision": s["precision"], "recall": s["recall"],
                 "f1": s["f1"], "val_neg_elbo": rows[result.best_epoch - 1]["val_neg_elbo"]}
    print(f"reference screen, seed {args.seed}, {args.cells} cells per single, {args.epochs} epochs, options {hp}; "
          f"true masks on: {int(true.sum())}")
    print("\n1. The schedule's trace\n")
    print(phase_ends(rows, delivered).to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    gains = mask_gains(model, data, split)
    inv = {int(c): kt for kt, c in enumerate(s["matching"]) if c >= 0}
    gains["true"] = [k in inv and bool(true[t, inv[k]]) for t, k in zip(gains["perturbation"], gains["unit"])]
    print("\n2. ELBO gain of each mask that is on (nats over the perturbation's training cells)\n")
    q = [0.0, 0.1, 0.5, 0.9, 1.0]
    summary = []
    for label, part in (("true positives", gains[gains["true"]]), ("false positives", gains[~gains["true"]])):
        if len(part):
            summary.append({"masks": label, "n": len(part), **{f"q{int(x * 100)}": part["gain"].quantile(x) for x in q},
                            "share < 0": float((part["gain"] < 0).mean()), "median |e|": part["abs_e"].median(),
                            "median cells": part["cells"].median()})
    print(pd.DataFrame(summary).to_string(index=False, float_format=lambda v: f"{v:.1f}"))

    val = np.flatnonzero(split == "val")
    cells = np.random.default_rng(args.seed).choice(val, min(args.fit_cells, val.size), replace=False)
    model_iw = float(iwelbo(model, data, cells, n_samples=200, seed=args.seed).mean())
    true_lb, sigma = true_log_px_bound(adata, truth, cells)
    print(f"\n3. Fit on {cells.size} validation cells (nats per cell)\n")
    print(pd.DataFrame([{"model IWELBO (200 samples)": model_iw, "simulator log p(x) ≥ (IS, σ = %.1f)" % sigma: true_lb,
                         "gap": true_lb - model_iw}]).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
