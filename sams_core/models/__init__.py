"""Model families, one file each, behind the common :class:`PerturbationModel` interface."""

from __future__ import annotations

from typing import Any

from sams_core.errors import SamsError
from sams_core.manifest import FAMILY_LABELS
from sams_core.models.base import Batch, LossOutput, PerturbationModel
from sams_core.models.conditional_vae import ConditionalVAE
from sams_core.models.cpa_vae import CPAVAE
from sams_core.models.sams_vae import GUIDES, SAMSVAE
from sams_core.models.svae import SVAEPlus
from sams_core.models.vae import VAE

FAMILIES: dict[str, type[PerturbationModel]] = {
    cls.family: cls for cls in (SAMSVAE, CPAVAE, ConditionalVAE, VAE, SVAEPlus)
}


def build_model(family: str, **hparams: Any) -> PerturbationModel:
    """A fresh model of ``family`` from its hyper-parameters (as stored in ``model.hparams``)."""
    if family not in FAMILIES:
        raise SamsError(f"Unknown model family {family!r}. Choose one of: {', '.join(FAMILIES)}.")
    return FAMILIES[family](**hparams)


__all__ = [
    "Batch", "LossOutput", "PerturbationModel", "SAMSVAE", "CPAVAE", "ConditionalVAE", "VAE",
    "SVAEPlus", "FAMILIES", "FAMILY_LABELS", "GUIDES", "build_model",
]
