"""The model families SAMS Explorer knows: each declared once, with its name and label.

The registry loads without PyTorch (labels are needed by pages that never touch a model); a
family's class is imported the first time a model of that family is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sams_core.errors import SamsError

if TYPE_CHECKING:
    from sams_core.models.base import PerturbationModel

FAMILY_LABELS: dict[str, str] = {
    "sams_vae": "SAMS-VAE",
    "cpa_vae": "CPA-VAE",
    "conditional_vae": "Conditional VAE",
    "vae": "VAE",
    "svae_plus": "sVAE+",
}
_CLASSES: dict[str, str] = {
    "sams_vae": "sams_core.models.sams_vae:SAMSVAE",
    "cpa_vae": "sams_core.models.cpa_vae:CPAVAE",
    "conditional_vae": "sams_core.models.conditional_vae:ConditionalVAE",
    "vae": "sams_core.models.vae:VAE",
    "svae_plus": "sams_core.models.svae:SVAEPlus",
}
FAMILIES: tuple[str, ...] = tuple(_CLASSES)


def model_class(family: str) -> type[PerturbationModel]:
    """The ``torch.nn.Module`` class of ``family``."""
    if family not in _CLASSES:
        raise SamsError(f"Unknown model family {family!r}. Choose one of: {', '.join(FAMILIES)}.")
    module, name = _CLASSES[family].split(":")
    return getattr(importlib.import_module(module), name)


def build_model(family: str, **hparams: Any) -> PerturbationModel:
    """A fresh model of ``family`` from its hyper-parameters (as stored in ``model.hparams``)."""
    return model_class(family)(**hparams)
