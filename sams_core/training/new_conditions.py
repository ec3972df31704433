"""sVAE+'s out-of-domain protocol: fit the shifts of conditions the model has not seen.

:func:`fit_new_conditions` fits them on given cells; :func:`score_new_conditions` runs the
protocol as the paper scores it (DESIGN §3): half of each held-out condition's cells fit the new
shifts, the other half — never seen by the fit — are scored by the held-out IWELBO.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sams_core.data.screen import PerturbationData
from sams_core.data.splits import TEST, TRAIN
from sams_core.errors import SamsError
from sams_core.evaluation.metrics import iwelbo
from sams_core.models.registry import build_model
from sams_core.models.svae import SVAEPlus
from sams_core.training.trainer import TrainConfig, TrainResult, fit


def fit_new_conditions(
    model: SVAEPlus,
    data: PerturbationData,
    cells: np.ndarray,
    config: TrainConfig | None = None,
) -> tuple[SVAEPlus, TrainResult]:
    """sVAE+'s out-of-domain protocol: learn only the shift and mask of unseen conditions.

    The conditions of ``cells`` that the model does not know are added to its vocabulary; the
    encoder, decoder and the known conditions stay frozen while the new conditions' shifts and
    mask probabilities are fitted on ``cells``. Returns the extended model and its history.
    """
    if not isinstance(model, SVAEPlus):
        raise SamsError("Only sVAE+ fits new conditions this way; SAMS-VAE composes them from their members.")
    cells = np.asarray(cells)
    known = {row.tobytes() for row in model.cond_dosages.detach().cpu().numpy().astype(np.float32)}
    labels = data.labels[cells].astype(str)
    new = sorted({lab for lab in labels if lab != "control" and data.dosage_row(lab).astype(np.float32).tobytes() not in known})
    if not new:
        raise SamsError("These cells hold no condition the model does not already know.")
    A = model.n_conditions
    hp = dict(model.hparams)
    hp["n_conditions"] = A + len(new)
    bigger = build_model(SVAEPlus.family, **hp)
    # the basis is the trained model's: it stays fixed with the networks (no alignment to come)
    bigger.restore_training_state({**model.training_state(), "phase": "final"})
    state = model.state_dict()
    with torch.no_grad():
        for name, p in bigger.state_dict().items():
            old = state[name]
            if p.shape == old.shape:
                p.copy_(old)
            else:
                p[:A].copy_(old)
        rows = torch.as_tensor(np.stack([data.dosage_row(c) for c in new]))
        bigger.cond_dosages[A:].copy_(rows)
        bigger.cond_counts[A:].copy_(torch.as_tensor([(labels == c).sum() for c in new], dtype=torch.float32))
    for name, p in bigger.named_parameters():
        p.requires_grad_(name in ("shift", "pi_logits"))
    keep_old = torch.zeros(A + len(new), 1)
    keep_old[A:] = 1.0
    bigger.shift.register_hook(lambda g: g * keep_old.to(g.device))
    bigger.pi_logits.register_hook(lambda g: g * keep_old.to(g.device))
    split = np.full(data.n_cells, TEST, dtype=object)
    split[cells] = TRAIN
    cfg = config or TrainConfig(epochs=50, lr=1e-2, global_lr_scale=1.0)
    result = fit(bigger, data, split, cfg)
    for p in bigger.parameters():
        p.requires_grad_(True)
    return bigger, result


def split_new_condition_cells(data: PerturbationData, cells: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``cells`` into the cells that fit new conditions and the cells that score them: half of
    each condition's cells (drawn with ``seed``; the larger half scores when the count is odd, and
    a condition with one cell only scores) fit, the rest score. The two sets are disjoint."""
    cells = np.asarray(cells)
    rng = np.random.default_rng(seed)
    labels = data.labels[cells].astype(str)
    fit_parts, score_parts = [], []
    for lab in sorted(set(labels)):
        mine = rng.permutation(cells[labels == lab])
        n_fit = mine.size // 2
        fit_parts.append(mine[:n_fit])
        score_parts.append(mine[n_fit:])
    fit_cells = np.sort(np.concatenate(fit_parts)) if fit_parts else cells[:0]
    score_cells = np.sort(np.concatenate(score_parts)) if score_parts else cells[:0]
    return fit_cells, score_cells


@dataclass
class NewConditionScore:
    """The out-of-domain protocol's outcome: the extended model and its fit, the cells that fitted
    and the disjoint cells that scored it, and their held-out IWELBO (nats per cell) under the
    trained model's prior and after the new shifts were fitted."""

    model: SVAEPlus
    result: TrainResult
    fit_cells: np.ndarray
    score_cells: np.ndarray
    iwelbo_prior: float
    iwelbo_fitted: float


def score_new_conditions(
    model: SVAEPlus,
    data: PerturbationData,
    cells: np.ndarray,
    config: TrainConfig | None = None,
    n_samples: int = 100,
    seed: int = 0,
) -> NewConditionScore:
    """sVAE+'s out-of-domain protocol: fit the new conditions of ``cells`` on half of each
    condition's cells (:func:`split_new_condition_cells`) and score the other half."""
    fit_cells, score_cells = split_new_condition_cells(data, cells, seed)
    if fit_cells.size == 0 or score_cells.size == 0:
        raise SamsError("Too few held-out cells to fit on one half and score the other. Hold out more cells per condition.")
    before = float(iwelbo(model, data, score_cells, n_samples, seed).mean())
    ext, result = fit_new_conditions(model, data, fit_cells, config)
    after = float(iwelbo(ext, data, score_cells, n_samples, seed).mean())
    return NewConditionScore(ext, result, fit_cells, score_cells, before, after)
