"""Model bundles: a trained model with everything needed to use it again, without pickle.

A bundle is one ``.sams`` file (a zip archive) or a folder holding ``manifest.json`` (model
family, hyper-parameters, gene and perturbation names, data-contract settings, the split,
training history, metrics, format version, SHA-256 of the weights) and ``weights.safetensors``
(tensors only). Loading reads JSON and raw tensors, rebuilds the model from the registered
families, and refuses a bundle whose checksum, format or shapes do not match.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sams_core import __version__
from sams_core.errors import SamsError
from sams_core.io.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    model_label,
    parse_manifest,
    read_parts,
)
from sams_core.models import registry
from sams_core.models.base import PerturbationModel


@dataclass
class ModelBundle:
    """A loaded model and its manifest."""

    model: PerturbationModel
    manifest: dict[str, Any]
    path: Path | None = None

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def label(self) -> str:
        """Human name of the model, e.g. "SAMS-VAE (correlated)"."""
        return model_label(self.manifest)

    @property
    def genes(self) -> list[str]:
        return list(self.manifest["genes"])

    @property
    def perturbations(self) -> list[str]:
        return list(self.manifest["perturbations"])

    @property
    def mask_rows(self) -> list[str]:
        """Names of the rows of :meth:`PerturbationModel.mask_probs` (perturbations or conditions)."""
        return list(self.manifest.get("conditions") or self.manifest["perturbations"])

    @property
    def is_counts(self) -> bool:
        return bool(self.manifest["data"].get("is_counts", True))

    @property
    def n_latent(self) -> int:
        """Number of latent units."""
        return int(self.model.n_latent)

    def mask_probabilities(self) -> np.ndarray | None:
        """P(m = 1) per row of :attr:`mask_rows` and latent unit; None for families without masks."""
        with torch.no_grad():
            p = self.model.mask_probs()
        return None if p is None else p.detach().cpu().numpy()

    def embedding_means(self) -> np.ndarray | None:
        """Posterior mean shift of each perturbation (rows of :attr:`perturbations`); None without embeddings."""
        if not hasattr(self.model, "embedding_means"):
            return None
        with torch.no_grad():
            return self.model.embedding_means().detach().cpu().numpy()

    @property
    def split_spec(self) -> dict[str, Any]:
        return dict(self.manifest.get("split", {}))

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("training", {}).get("history", []))

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.manifest.get("metrics", {}))

    def checksum(self) -> str:
        """Short hash of the weights (from the manifest, or computed for an unsaved model)."""
        if "weights_sha256" not in self.manifest:
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            self.manifest["weights_sha256"] = hashlib.sha256(st_save(state)).hexdigest()
        return str(self.manifest["weights_sha256"])[:16]


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def make_manifest(
    model: PerturbationModel,
    genes: list[str],
    perturbations: list[str],
    data_settings: dict[str, Any] | None = None,
    split: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    conditions: list[str] | None = None,
) -> dict[str, Any]:
    """The manifest of a bundle (without the weights checksum, added on save)."""
    if len(genes) != model.n_genes:
        raise SamsError(f"{len(genes)} gene names for a model of {model.n_genes} genes.")
    if len(perturbations) != model.n_perturbations:
        raise SamsError(f"{len(perturbations)} perturbation names for a model of {model.n_perturbations}.")
    return _jsonable(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sams_core_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "family": model.family,
            "hparams": dict(model.hparams),
            # where the training schedule stands (phase, prior weight in force, alignment, N_t):
            # with the hyper-parameters and weights, what reproduces the training objective
            "training_state": model.training_state(),
            "genes": list(genes),
            "perturbations": list(perturbations),
            "conditions": conditions,
            "data": dict(data_settings or {}),
            "split": dict(split or {}),
            "training": dict(training or {}),
            "metrics": dict(metrics or {}),
        }
    )


def save_bundle(path: str | Path, model: PerturbationModel, manifest: dict[str, Any]) -> Path:
    """Write ``model`` and ``manifest`` to ``path``: a ``.sams`` zip file, or a folder otherwise."""
    p = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = st_save(state)
    man = dict(manifest)
    man["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    man["weights_bytes"] = len(weights)
    text = json.dumps(_jsonable(man), indent=1, allow_nan=False)
    if p.suffix == ".sams":
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".sams.partial")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(MANIFEST, text)
            z.writestr(WEIGHTS, weights)
        tmp.replace(p)
    else:
        p.mkdir(parents=True, exist_ok=True)
        (p / WEIGHTS).write_bytes(weights)
        (p / MANIFEST).write_text(text)
    return p


def load_bundle(source: str | Path | bytes, device: str | torch.device | None = None) -> ModelBundle:
    """Read a bundle (path to a ``.sams`` file or folder, or the bytes of one).

    Nothing from the file is executed. Raises :class:`SamsError` for a missing, truncated,
    tampered or incompatible bundle.
    """
    raw_manifest, weights, path = read_parts(source)
    manifest = parse_manifest(raw_manifest)
    digest = hashlib.sha256(weights).hexdigest()
    if digest != manifest.get("weights_sha256"):
        raise SamsError(
            "The bundle's weights do not match the checksum in its manifest: the file was modified or "
            "truncated. Re-export it from the trained model."
        )
    family = manifest.get("family")
    if family not in registry.FAMILY_LABELS:
        raise SamsError(
            f"Unknown model family {family!r} in the bundle. Known: {', '.join(registry.FAMILY_LABELS)}. "
            "Register the family (sams_core.models.registry.register) before loading, or update sams_core."
        )
    hparams = manifest.get("hparams")
    if not isinstance(hparams, dict):
        raise SamsError("The bundle's manifest has no hyper-parameters. The file is damaged.")
    try:
        state = st_load(weights)
    except Exception as exc:  # safetensors raises its own error type for bad headers
        raise SamsError(f"The bundle's weights cannot be read ({exc}). The file is damaged.") from exc
    try:
        model = registry.build_model(family, **hparams)
        model.load_state_dict(state, strict=True)
        recorded = manifest.get("training_state")
        # bundles written before the state was recorded were saved after their schedule had run
        model.restore_training_state(recorded if isinstance(recorded, dict) else {"phase": "final"})
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SamsError(f"The bundle's weights do not fit a {family} model with its hyper-parameters ({exc}).") from exc
    if len(manifest.get("genes", [])) != model.n_genes or len(manifest.get("perturbations", [])) != model.n_perturbations:
        raise SamsError("The bundle's gene or perturbation names do not match the model's size. The file is damaged.")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    model.to(dev).eval()
    return ModelBundle(model=model, manifest=manifest, path=path)


__all__ = ["FORMAT_VERSION", "ModelBundle", "load_bundle", "make_manifest", "save_bundle"]
