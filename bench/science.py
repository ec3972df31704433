"""Do the models recover the truth? One simulated screen, every model, one table.

Table 1: a SAMS-style screen (``simulate_sams_screen``) split by the simulator's suggested
held-out combinations; SAMS-VAE (both guides), CPA-VAE, conditional VAE and sVAE+ trained on
the same split. Columns: held-out-combination IWELBO, ATE r / R² (all genes and top-20 DE genes)
on the held-out combinations, cosine-logFC rank, mask F1, latent MCC, training seconds.

Table 2: an sVAE-style screen with held-out perturbations; sVAE+ and SAMS-VAE: target
recovery (F1 and exact target sets) over the trained perturbations, latent MCC, IWELBO of the
held-out perturbations' cells under the prior and, for sVAE+, after fitting their shifts with
the networks frozen (the paper's out-of-domain protocol).

    python bench/science.py                      # defaults (CPU, about 20 minutes)
    python bench/science.py --epochs 50          # a quick look
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

from sams_core.data.screen import from_anndata
from sams_core.data.splits import make_split
from sams_core.interpret.embed import cell_latents
from sams_core.io.bundle import ModelBundle, make_manifest
from sams_core.evaluation.metrics import evaluate_model, iwelbo
from sams_core.simulate import simulate_sams_screen, simulate_svae_screen, truth_from_adata, truth_masks_for  # noqa: E402
from sams_core.training.trainer import TrainConfig, train
from sams_core.training.new_conditions import fit_new_conditions
from sams_core.interpret.programs import effect_enrichment, program_collection, unit_enrichment, unit_loadings
from sams_core.interpret.effects import predict_effect
from sams_core.evaluation.truth import latent_mcc, mask_scores, match_units, target_recovery

MODELS = [
    ("SAMS-VAE (mean-field)", "sams_vae", {"guide": "mean-field"}),
    ("SAMS-VAE (correlated)", "sams_vae", {"guide": "correlated", "embed_hidden": 128}),
    ("CPA-VAE", "cpa_vae", {}),
    ("conditional VAE", "conditional_vae", {}),
    ("sVAE+", "svae_plus", {}),
]


def _bundle(model, data) -> ModelBundle:
    return ModelBundle(model, make_manifest(model, data.genes, data.perturbations, {"is_counts": data.is_counts}))


def _mask_rows(model, data, names: list[str]) -> np.ndarray | None:
    """Mask probabilities with rows in the order of ``names`` (singles), None without masks."""
    p = model.mask_probs()
    if p is None:
        return None
    p = p.detach().cpu().numpy()
    if model.family == "svae_plus":
        rows = {tuple(r): i for i, r in enumerate(model.cond_dosages.cpu().numpy().astype(int).tolist())}
        idx = []
        for n in names:
            key = tuple(np.eye(data.n_perturbations, dtype=int)[data.perturbations.index(n)].tolist())
            if key not in rows:
                return None
            idx.append(rows[key])
        return p[idx]
    return p[[data.perturbations.index(n) for n in names]]


def _fit(family: str, hp: dict, data, split, n_latent: int, args: argparse.Namespace):
    """Train one model on the split; returns (model, seconds)."""
    extra = dict(hp)
    if family == "sams_vae":
        extra.update({k: v for k, v in (("global_weight", args.global_weight), ("align_at", args.align_at)) if v is not None})
    t0 = time.perf_counter()
    model, _ = train(data, family, split, TrainConfig(epochs=args.epochs, seed=args.seed), n_latent=n_latent, n_hidden=args.hidden, **extra)
    return model, time.perf_counter() - t0


def program_recovery(model, data, adata, truth, cells: np.ndarray) -> dict:
    """Do the gene programs of the latent units name the true programs?

    Units are matched to true units by the correlation of cell latents (Hungarian). ``unit top
    set`` is the fraction of truly targeted units whose most enriched set (rank test on the
    unit's |loadings|) is the program that unit truly drives; ``effect top sets`` the fraction of
    single perturbations whose predicted effect (its size per gene) has, among its n most enriched sets (n = its
    number of true targets), at least one program of a unit it truly targets; ``effect all``
    the fraction where the top n sets are exactly its targets' programs.
    """
    bundle = _bundle(model, data)
    coll = program_collection(adata)
    program_of = {u: name for name, u in truth.unit_of_program.items()}
    inferred = cell_latents(bundle, data, cells, "full")
    match = match_units(adata.obsm["X_true_latent"][cells], inferred, method="correlation")
    enr = unit_enrichment(unit_loadings(bundle, data), coll, "rank")
    targeted = [k for k in range(truth.n_latent) if truth.masks[:, k].any() and k in program_of]
    hits = 0
    for k in targeted:
        rows = enr[enr["unit"] == int(match[k])].sort_values("p")
        hits += int(len(rows) > 0 and rows.iloc[0]["set"] == program_of[k])
    any_hit = all_hit = 0
    names = list(truth.perturbations)
    for t, name in enumerate(names):
        want = {program_of[k] for k in np.flatnonzero(truth.masks[t]) if k in program_of}
        top = set(effect_enrichment(predict_effect(bundle, name, n_globals=50, n_per_global=5), coll, absolute=True).sort_values("p")["set"].head(len(want)))
        any_hit += int(bool(top & want))
        all_hit += int(top == want)
    return {"unit top set": hits / max(len(targeted), 1), "effect top sets": any_hit / len(names), "effect all": all_hit / len(names)}


def table_sams(args: argparse.Namespace) -> pd.DataFrame:
    adata = simulate_sams_screen(seed=args.seed)
    truth = truth_from_adata(adata)
    data = from_anndata(adata)
    split = make_split(data, "heldout-combos", heldout=truth.heldout_combinations, seed=args.seed)
    tm = truth_masks_for(truth, data.perturbations)
    rows = []
    for name, family, hp in MODELS:
        model, secs = _fit(family, hp, data, split, truth.n_latent, args)
        ev = evaluate_model(model, data, split, n_ate_samples=1000, seed=args.seed, splits=("test",)).metrics.loc["test"]
        probs = _mask_rows(model, data, data.perturbations)
        f1 = mask_scores(tm, probs)["f1"] if probs is not None else np.nan
        cells = np.flatnonzero(split != "test")
        mcc = latent_mcc(adata.obsm["X_true_latent"][cells], cell_latents(_bundle(model, data), data, cells, "full"))["mcc"]
        programs = program_recovery(model, data, adata, truth, cells) if family in ("sams_vae", "cpa_vae") else {}
        rows.append({
            "model": name, "heldout IWELBO": ev["iwelbo"], "ATE r": ev["ate_r"], "ATE R2": ev["ate_r2"],
            "ATE r top20": ev["ate_r_top20"], "ATE R2 top20": ev["ate_r2_top20"], "cos rank": ev["cosine_rank"],
            "mask F1": f1, "MCC": mcc, "train s": secs, **programs,
        })
        print(f"  {name}: done in {secs:.0f} s", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def table_svae(args: argparse.Namespace) -> pd.DataFrame:
    adata = simulate_svae_screen(seed=args.seed)
    truth = truth_from_adata(adata)
    data = from_anndata(adata)
    split = make_split(data, "heldout-perturbations", fraction=0.2, seed=args.seed)
    trained = sorted({str(x) for x in data.labels[split == "train"]} - {"control"})
    tm = truth_masks_for(truth, trained)
    rows = []
    for name, family, hp in [MODELS[4], MODELS[0]]:
        model, secs = _fit(family, hp, data, split, truth.n_latent, args)
        probs = _mask_rows(model, data, trained)
        tr = target_recovery(tm, probs)
        cells = np.flatnonzero(split != "test")
        mcc = latent_mcc(adata.obsm["X_true_latent"][cells], cell_latents(_bundle(model, data), data, cells, "full"))["mcc"]
        test = np.flatnonzero(split == "test")
        held = iwelbo(model, data, test, 100, args.seed).mean()
        fitted = np.nan
        if family == "svae_plus":  # the paper's protocol: frozen networks, fit the new shifts
            ext, _ = fit_new_conditions(model, data, test, TrainConfig(epochs=50, lr=1e-2, global_lr_scale=1.0, seed=args.seed))
            fitted = iwelbo(ext, data, test, 100, args.seed).mean()
        rows.append({"model": name, "target F1": tr["f1"], "exact target sets": tr["exact"], "MCC": mcc,
                     "heldout IWELBO (prior)": held, "heldout IWELBO (shifts fitted)": fitted, "train s": secs})
        print(f"  {name}: done in {secs:.0f} s", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--global-weight", type=float, default=None, help="SAMS-VAE weight of the global prior terms after alignment (default: the model's)")
    ap.add_argument("--align-at", type=float, default=None, help="SAMS-VAE: fraction of the budget after which the latent basis is aligned (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the figures depend on the reduction order, so a fixed count makes them reproducible)")
    ap.add_argument("--only", choices=["sams", "svae"], default=None, help="run only one of the two tables")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    if args.only != "svae":
        print(f"SAMS-style screen, held-out combinations, {args.epochs} epochs, SAMS-VAE global weight "
              f"{args.global_weight or 'default'}, alignment at {args.align_at or 'default'}")
        print(table_sams(args).to_string(index=False, float_format=fmt), flush=True)
    if args.only != "sams":
        print(f"\nsVAE-style screen, held-out perturbations (20 %), {args.epochs} epochs")
        print(table_svae(args).to_string(index=False, float_format=fmt))


if __name__ == "__main__":
    main()
