"""Every page's work on screens of the size users have (issue 18): Norman- and Replogle-shaped.

    python bench/app_scale.py                      # both shapes, full size (long on 2 cores)
    python bench/app_scale.py --scale 0.1          # a tenth of the cells, same perturbations and genes
    python bench/app_scale.py --shapes replogle --scale 0.1 --epochs 1

Two simulated screens (counts, CSR, written to a temporary ``.h5ad``):

- **norman**: 100 singles + 130 pairs + controls, ~109,500 cells × 5,000 genes, K = 20;
- **replogle**: ~2,000 singles × ~60 cells, 2,000 genes, controls, no pairs, K = 20.

``--scale`` multiplies the number of cells (cells per condition); the numbers of perturbations
and genes stay those of the real screens, because they drive the costs the views pay (heatmap
rows, pairs to rank, genes per effect). A short SAMS-VAE bundle is trained (``--epochs``, 1 by
default; ``--epochs 0`` builds it untrained) on a held-out split (held-out pairs for norman,
held-out perturbations for replogle), and each page's work is timed through the library
functions the page calls:

==========================  ================================================================
read screen                 ``read_h5ad`` (AnnData read + data contract)
Home counts                 ``screen_summary`` (uncached)
Masks figures               mask probabilities → ``heatmap_orders`` → ``mask_heatmap`` +
                            ``embedding_heatmap`` of the page's default view (figure JSON size
                            is what the browser receives)
Latent: import umap-learn   once per process (the app imports it in the background)
Latent: UMAP 2,000 cells    ``umap_embedding`` (no disk cache) + ``umap_scatter``
Compose: one pair           ``predict_effect`` + ``observed_effects`` + ``compare_with_data``
pair ranking                ``rank_unmeasured_pairs`` as the page calls it by default
Compare                     ``compare_on_heldout`` as the page calls it by default
train's evaluation          ``evaluate_model`` with the defaults ``train`` uses
==========================  ================================================================

Peak RSS is the process's (``ru_maxrss``) after each step. A step that would not finish in
``--step-limit`` seconds is not run when it can be predicted (e.g. ranking 2,000,000 pairs)
and reported as "skipped".
"""

from __future__ import annotations

import argparse
import gc
import inspect
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: singles, pairs, cells per condition, control cells, genes
    "norman": dict(singles=100, pairs=130, per_condition=455, controls=4850, genes=5000),
    "replogle": dict(singles=2000, pairs=0, per_condition=60, controls=4000, genes=2000),
}


def simulate(shape: str, scale: float, seed: int = 0):
    """A counts screen of the shape: low-rank condition effects on a log-normal gene baseline,
    Poisson-gamma counts (CSR float32), perturbations named ``P0001``..., pairs ``P0001+P0002``."""
    import anndata as ad
    import pandas as pd

    s = SHAPES[shape]
    rng = np.random.default_rng(seed)
    G, T, K = s["genes"], s["singles"], 20
    singles = [f"P{t:04d}" for t in range(T)]
    pairs: list[tuple[int, int]] = []
    seen = set()
    while len(pairs) < s["pairs"]:
        a, b = sorted(rng.choice(T, 2, replace=False).tolist())
        if (a, b) not in seen:
            seen.add((a, b))
            pairs.append((a, b))
    base = rng.normal(-1.0, 1.2, G)  # log mean per gene at library ~ G * e^-0.3
    load = rng.normal(0, 1, (K, G)) * (rng.random((K, G)) < 0.1)
    shift = rng.normal(0, 1.0, (T, K)) * (rng.random((T, K)) < 0.1)
    conds = [("control", np.zeros(K))] + [(p, shift[t]) for t, p in enumerate(singles)]
    conds += [(f"{singles[a]}+{singles[b]}", shift[a] + shift[b] + rng.normal(0, 0.3, K)) for a, b in pairs]
    per = max(2, int(round(s["per_condition"] * scale)))
    n_ctrl = max(20, int(round(s["controls"] * scale)))
    blocks, labels = [], []
    for name, sh in conds:
        n = n_ctrl if name == "control" else per
        zb = rng.normal(0, 0.3, (n, K))
        mu = np.exp(np.clip(base + (zb + sh) @ load * 0.3, -8, 6))
        lib = rng.lognormal(0, 0.3, (n, 1))
        x = rng.poisson(rng.gamma(5.0, mu * lib / 5.0)).astype(np.float32)
        x[x.sum(1) == 0, 0] = 1
        blocks.append(sp.csr_matrix(x))
        labels += [name] * n
    X = sp.vstack(blocks).tocsr()
    obs = pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"G{g:05d}" for g in range(G)])
    return ad.AnnData(X=X, obs=obs, var=var)


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kB


class StepTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise StepTimeout()


LIMIT = [600.0]


def timed(rows: list, shape: str, step: str, fn, note: str = "", limit: bool = True):
    """Run ``fn`` once and record its wall time and the peak RSS; a step still running after
    ``--step-limit`` seconds is stopped and reported as "> limit"."""
    gc.collect()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(LIMIT[0]) if limit else 0)
    t = time.perf_counter()
    try:
        out = fn()
    except StepTimeout:
        out = None
        note = f"stopped after {LIMIT[0]:.0f} s (> limit) {note}".strip()
    finally:
        signal.alarm(0)
    dt = time.perf_counter() - t
    rows.append({"shape": shape, "step": step, "seconds": dt, "peak_gb": peak_gb(), "note": note})
    print(f"  {shape:8s} {step:34s} {dt:8.2f} s  peak {peak_gb():.2f} GB  {note}", flush=True)
    return out


def run_shape(shape: str, scale: float, epochs: int, step_limit: float, tmp: Path, keep: Path | None = None) -> list[dict]:
    from sams_core import plots
    from sams_core.data.screen import read_h5ad
    from sams_core.data.summary import screen_summary
    from sams_core.evaluation import compare as compare_mod
    from sams_core.evaluation.baselines import observed_effects
    from sams_core.evaluation.metrics import evaluate_model
    from sams_core.interpret import effects
    from sams_core.interpret.embed import umap_embedding
    from sams_core.pipeline import SplitSpec, align_to_bundle, split_for_bundle, train_bundle
    from sams_core.training.trainer import TrainConfig

    rows: list[dict] = []
    t = time.perf_counter()
    adata = simulate(shape, scale)
    path = tmp / f"{shape}.h5ad"
    adata.write_h5ad(path)
    desc = f"{adata.n_obs:,} cells × {adata.n_vars:,} genes"
    print(f"{shape}: {desc} simulated in {time.perf_counter() - t:.1f} s", flush=True)
    del adata

    data = timed(rows, shape, "read screen (read_h5ad)", lambda: read_h5ad(path), desc, limit=False)
    timed(rows, shape, "Home: screen counts", lambda: screen_summary(path, cache_dir=None))

    kind = "heldout-combos" if SHAPES[shape]["pairs"] else "heldout-perturbations"
    spec = SplitSpec(kind=kind, fraction=0.1 if kind == "heldout-perturbations" else 0.25, seed=0)
    cfg = TrainConfig(epochs=max(epochs, 1), max_steps=None if epochs > 0 else 1, seed=0)
    bundle, _, _ = timed(rows, shape, f"train ({epochs} epoch{'s' if epochs != 1 else ''})",
                         lambda: train_bundle(data, "sams_vae", spec, cfg, evaluate=False, n_latent=20),
                         "untrained (1 step)" if epochs == 0 else "", limit=False)
    if keep is not None:
        from sams_core.io.bundle import save_bundle

        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / f"{shape}.h5ad")
        save_bundle(keep / f"{shape}.sams", bundle.model, bundle.manifest)
    data = align_to_bundle(data, bundle)
    split = split_for_bundle(bundle, data)

    # what `train` evaluates with: before, evaluate_model's defaults with 2,000 ATE samples; now its quick defaults
    eval_kw = {"n_ate_samples": 2000} if "full_evaluation" not in inspect.signature(train_bundle).parameters else {}
    timed(rows, shape, "train's evaluation (evaluate_model)",
          lambda: evaluate_model(bundle.model, data, split, seed=0, **eval_kw), "defaults")

    def masks():
        probs = bundle.mask_probabilities()
        emb = bundle.embedding_means()
        units = [f"unit {k}" for k in range(bundle.n_latent)]
        if hasattr(plots, "heatmap_rows"):  # the page's default view: top 60 by targeted units, clustered
            keep = plots.heatmap_rows(bundle.mask_rows, plots.row_scores("targeted units", probs, emb), "", plots.HEATMAP_ROWS)
        else:  # before: every row
            keep = np.arange(len(bundle.mask_rows))
        names = [bundle.mask_rows[i] for i in keep]
        orders = plots.heatmap_orders(probs[keep])
        figs = [plots.mask_heatmap(probs[keep], names, units, 0.5, orders=orders),
                plots.embedding_heatmap(emb[keep], names, units, orders=orders)]
        return sum(len(f.to_json()) for f in figs)

    size = timed(rows, shape, "Masks: heatmaps", masks)
    rows[-1]["note"] += f"figures {size / 1e6:.2f} MB JSON" if size else ""

    def load_umap():
        from explorer.preload import preload_umap
        from sams_core.interpret.embed import keep_umap_compilation

        preload_umap()
        keep_umap_compilation()

    if "umap" not in sys.modules:  # the app does this on a background thread once the first model is loaded
        timed(rows, shape, "Latent: import umap-learn", load_umap, "in the app: in the background at the first model")

    def latent():
        emb = umap_embedding(bundle, data, max_cells=2000, cache_dir=None, shipped_dirs=())
        lab = data.labels[emb.cells].astype(str)
        return len(plots.umap_scatter(emb.coords, lab, hover=lab).to_json())

    size = timed(rows, shape, "Latent: UMAP of 2,000 cells", latent)
    rows[-1]["note"] += f"figure {size / 1e6:.2f} MB JSON" if size else ""

    pair = [p for p in bundle.perturbations[:2]]
    obs = timed(rows, shape, "Compose: observed effects (cached)", lambda: observed_effects(data))
    if obs is not None:
        timed(rows, shape, "Compose: one pair's effect", lambda: effects.compare_with_data(effects.predict_effect(bundle, pair), obs))

    measured = sorted({str(x) for x in data.labels})
    n_singles = sum(1 for m in measured if m != "control" and "+" not in m)
    n_pairs = n_singles * (n_singles - 1) // 2 - sum(1 for m in measured if "+" in m)
    if "max_pairs" in inspect.signature(effects.rank_unmeasured_pairs).parameters:  # the page's defaults
        ranked = timed(rows, shape, "Compose: pair ranking (page default)", lambda: effects.rank_unmeasured_pairs(bundle, measured),
                       f"{n_pairs:,} candidate pairs")
        if ranked is not None:
            rows[-1]["note"] += f"; {len(ranked):,} scored, {int(ranked.refined.sum())} refined"
    elif n_pairs > 20_000:
        rows.append({"shape": shape, "step": "Compose: pair ranking (page default)", "seconds": float("nan"),
                     "peak_gb": peak_gb(), "note": f"skipped: {n_pairs:,} pairs (the issue: killed at 14 GB)"})
    else:
        timed(rows, shape, "Compose: pair ranking (page default)",
              lambda: effects.rank_unmeasured_pairs(bundle, measured), f"{n_pairs:,} pairs")

    ckw = dict(getattr(compare_mod, "QUICK_COMPARE", {"n_cells": 200, "n_ate_samples": 500}))  # what the Compare page asks for
    timed(rows, shape, "Compare (compare_on_heldout)", lambda: compare_mod.compare_on_heldout({"m": bundle}, data, split, **ckw),
          f"{len(set(data.labels[split == 'test']))} held-out conditions")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the real screens' cells (perturbations and genes kept)")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs of the bundle (0: untrained, one step)")
    ap.add_argument("--step-limit", type=float, default=600.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", default=None, help="a folder to keep each shape's screen (.h5ad) and bundle (.sams) in")
    args = ap.parse_args()
    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    LIMIT[0] = args.step_limit
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            rows += run_shape(shape, args.scale, args.epochs, args.step_limit, Path(tmp), Path(args.keep) if args.keep else None)
    t = pd.DataFrame(rows)
    print()
    print(f"scale {args.scale:g}, {args.epochs} training epoch(s), {args.threads} threads")
    print("| shape | step | seconds | peak RSS GB | note |")
    print("|---|---|---|---|---|")
    for r in t.itertuples():
        sec = "—" if not np.isfinite(r.seconds) else (f"> {r.seconds:.0f}" if "limit" in r.note else f"{r.seconds:.2f}")
        print(f"| {r.shape} | {r.step} | {sec} | {r.peak_gb:.2f} | {r.note} |")


if __name__ == "__main__":
    main()
