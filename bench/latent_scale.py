"""How large are SAMS-VAE's learned shifts against the simulator's, and how much of a
perturbation does the encoder put in the basal state instead?

On one simulated screen (default: sVAE-style) this trains SAMS-VAE under several schedules and
prints, per schedule, medians over the single perturbations of:

- |shift| / |true|: the norm of the model's expected shift E[m ⊙ e] over the norm of the
  simulator's shift (rotation-free, so no matching of units is needed);
- |z| / |true|: the same for the posterior mean of the full latent z = z_b + shift, averaged over
  the perturbation's training cells minus the controls' average, i.e. how far the *encoder* puts
  the perturbation from the controls;
- |mean z_b|: the norm of the basal state's average over the perturbation's training cells (0
  when the shift carries the whole perturbation);
- the calibration slope of predicted on observed ATE (all genes, held-out cells).

A shift well below the encoder's distance means the encoder absorbs part of the perturbation into
z_b, which the prediction of an effect (z_b drawn from the prior, plus the shift) does not see.

    python bench/latent_scale.py --seed 0                    # sVAE-style screen, ≈ 2.5 min
    python bench/latent_scale.py --seed 0 --epochs 600         # ≈ 10 min

Use choosing seeds (0-2): this is a diagnosis, and it looks at the answer key.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effect_shrinkage import screen_from_args  # noqa: E402  (beside this script)
from sams_core.evaluation.metrics import calibration, data_ate, model_ate
from sams_core.interpret.embed import cell_latents
from sams_core.pipeline import SplitSpec, train_bundle
from sams_core.simulate import simulate_svae_screen
from sams_core.training.trainer import TrainConfig

#: screens whose held-out cells include every single (a random split of the cells)
SCREENS = {"svae": (simulate_svae_screen, SplitSpec("random", test_fraction=0.2))}
SCHEDULES = {
    "default (masks restart at 0.82)": {},
    "masks restart at 0.5": {"align_mask_logit": 0.0},
    "masks restart at 0.95": {"align_mask_logit": 3.0},
    "aligned, masks restart at 0.95, no pruning phase": {"align_mask_logit": 3.0, "sparsify_for": 0.0},
    "paper ELBO, no alignment": {"align_at": None},
}


def latent_scale(bundle, data, split: np.ndarray, true_shift: np.ndarray, seed: int) -> dict[str, float]:
    """Medians over the singles of the shift, encoder and basal-state sizes, and the slope."""
    model = bundle.model
    names = list(data.perturbations)
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    observed = data_ate(data, test)
    singles = [p for p in names if p in observed.index]
    predicted = model_ate(model, singles, names, data.is_counts, n_samples=1000, seed=seed)
    slope, _ = calibration(observed.loc[singles].to_numpy(), predicted.loc[singles].to_numpy())
    with torch.no_grad():
        shifts = model.expected_shift_table().cpu().numpy()
    basal = cell_latents(bundle, data, train, "basal")
    full = cell_latents(bundle, data, train, "full")
    labels = np.asarray(data.labels)[train]
    controls = full[labels == "control"].mean(0)
    rows = []
    for t, name in enumerate(names):
        cells = labels == name
        if name not in singles or not cells.any():
            continue
        size = np.linalg.norm(true_shift[t])
        rows.append({"shift": np.linalg.norm(shifts[t]) / size,
                     "encoder": np.linalg.norm(full[cells].mean(0) - controls) / size,
                     "basal": np.linalg.norm(basal[cells].mean(0))})
    table = pd.DataFrame(rows)
    return {"|shift| / |true|": table["shift"].median(), "|z| / |true|": table["encoder"].median(),
            "|mean z_b|": table["basal"].median(), "slope": slope}


def main() -> None:
    t0 = time.perf_counter()
    args, truth, data, spec, split = screen_from_args(__doc__, SCREENS)
    order = [list(truth.perturbations).index(p) for p in data.perturbations]
    true_shift = np.asarray(truth.embeddings)[order]
    rows = []
    for label, hp in SCHEDULES.items():
        bundle, _, _ = train_bundle(data, "sams_vae", spec, TrainConfig(epochs=args.epochs, seed=args.seed), None,
                                    evaluate=False, n_latent=truth.n_latent, n_hidden=args.hidden, **hp)
        rows.append({"schedule": label, **latent_scale(bundle, data, split, true_shift, args.seed)})
        print(f"  {label}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"\n{args.kind} screen, seed {args.seed}, {args.epochs} epochs (medians over the singles)\n")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
