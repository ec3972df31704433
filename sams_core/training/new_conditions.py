"""sVAE+'s out-of-domain protocol: fit the shifts of conditions the model has not seen.
"""

from __future__ import annotations

import numpy as np
import torch

from sams_core.data.screen import PerturbationData
from sams_core.data.splits import TEST, TRAIN
from sams_core.errors import SamsError
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
    bigger.aligned = True  # the basis is the trained model's: it stays fixed with the networks
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
