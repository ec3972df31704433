"""Model bundles: a trained model with everything needed to use it again, without pickle.

A bundle is one ``.sams`` file (a zip archive) or a folder holding ``manifest.json`` (model
family, hyper-parameters, gene and perturbation names, data-contract settings, the split,
training history, metrics, format version, SHA-256 of the weights, and ``bundle_sha256``: the
SHA-256 of the canonical manifest without that field, so one value covers manifest and weights)
and ``weights.safetensors`` (tensors only). Loading reads JSON and raw tensors within size caps,
validates the manifest, checks the tensor names and shapes in the safetensors header against
the model its hyper-parameters describe (built on PyTorch's meta device, so nothing is
allocated) and only then rebuilds the model; a bundle whose checksum, format or shapes do not
match is refused. A bundle is trusted like any file you open: the checksum detects damage and
edits, it is not a signature.

Saves are atomic: the bundle is written to a temporary sibling (``.NAME.partial-PID``), flushed
to disk and renamed over the target (a folder is swapped in with one exchange), so a kill or a
full disk at any moment leaves the old bundle or the new one, never a mix; partial files of
earlier, interrupted saves are removed by the next save to the same path.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import hashlib
import json
import os
import secrets
import shutil
import struct
import zipfile
from collections.abc import Mapping, Sequence
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
    CHECKSUM_FIELD,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    manifest_checksum,
    model_label,
    read_bundle,
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
        """Whether the model was trained on counts (negative-binomial likelihood) rather than on
        log-normalised values."""
        return bool((self.manifest.get("data") or {}).get("is_counts", True))

    @property
    def notes(self) -> list[str]:
        """What loading found worth saying (e.g. a bundle saved before manifests were checksummed)."""
        return list(self.manifest.get("load_notes", []))

    @property
    def covariates(self) -> dict[str, list[str]]:
        """The covariates the model conditions on: column → levels, primary first ({} for none)."""
        levels = self.manifest.get("data", {}).get("covariate_levels") or {}
        keys = self.manifest.get("data", {}).get("covariate_keys") or list(levels)
        return {str(k): [str(v) for v in levels.get(k, [])] for k in keys}

    def level_index(self, level: str | None) -> int | None:
        """Index of ``level`` among the primary covariate's levels (None stays None: pooled);
        :class:`SamsError` naming the known levels for a level the model never saw."""
        if level is None:
            return None
        cov = self.covariates
        if not cov:
            raise SamsError(f"{self.label} was trained without covariates, so it predicts no level ({level!r}). Leave the level empty.")
        key, levels = next(iter(cov.items()))
        if str(level) not in levels:
            raise SamsError(
                f"The model never saw {key} = {level!r} (it knows {', '.join(levels)}). Pick one of its levels."
            )
        return levels.index(str(level))

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
        return dict(self.manifest.get("split") or {})

    @property
    def history(self) -> list[dict[str, Any]]:
        return list((self.manifest.get("training") or {}).get("history") or [])

    def mask_settling_note(self) -> str | None:
        """Whether the masks were still switching as training ended (:func:`mask_settling_note`
        on this bundle's history); None when they had settled or the model has no masks."""
        probs = self.mask_probabilities()
        return None if probs is None else mask_settling_note(self.history, probs.size)

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.manifest.get("metrics") or {})

    def checksum(self) -> str:
        """Short hash of the weights (from the manifest, or computed for an unsaved model)."""
        if "weights_sha256" not in self.manifest:
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            self.manifest["weights_sha256"] = hashlib.sha256(st_save(state)).hexdigest()
        return str(self.manifest["weights_sha256"])[:16]


def mask_settling_note(history: Sequence[Mapping[str, Any]], n_entries: int) -> str | None:
    """A warning when the masks were still switching on (or off) as training ended, else None.

    Reads a training history (``TrainResult.history_table()`` or :attr:`ModelBundle.history`) of a
    model with ``n_entries`` mask entries (rows × units). It looks at the second half of the last
    schedule phase, the objective the delivered state was trained on. If the number of masks at
    P ≥ 0.5 changed by at least 2 and by at least 5 % over that half, the objective had not
    settled its masks: entries near the threshold may still change, and their number was still
    drifting. On the reference simulator at the published size this is what happens under the
    paper's ELBO (``bench/mask_gains.py``). With fewer than 4 epochs in that phase the masks had no
    time to settle (after SAMS-VAE's alignment they restart at probability 0.82, so a short run
    shows nearly every mask on), and the warning says so. None for histories without masks, and
    when the masks had settled.
    """
    recs = [r for r in history if r.get("mask_frac_high") is not None]
    if not recs or n_entries <= 0:
        return None
    phase = recs[-1].get("phase")
    tail: list[Mapping[str, Any]] = []
    for r in reversed(recs):
        if r.get("phase") != phase:
            break
        tail.append(r)
    tail.reverse()
    phased = len(tail) < len(recs) and phase
    if len(tail) < 4:
        epochs = f"{len(tail)} epoch{'s' if len(tail) > 1 else ''}"
        span = f"the {phase} phase had {epochs}" if phased else f"training had {epochs}"
        restart = " (after the alignment every mask restarts at the same probability)" if phased else ""
        return (
            f"Training was too short for the masks to settle: {span}, fewer than the 4 it takes to tell settled masks "
            f"from moving ones. Mask probabilities say little yet{restart}. Train for more epochs before reading masks."
        )
    first, last = tail[len(tail) // 2], tail[-1]
    on_first = round(float(first["mask_frac_high"]) * n_entries)
    on_last = round(float(last["mask_frac_high"]) * n_entries)
    change = on_last - on_first
    if abs(change) < max(2, 0.05 * max(on_first, 1)):
        return None
    where = f"the second half of the {phase} phase" if phased else "the second half of training"
    return (
        f"The masks were still switching {'on' if change > 0 else 'off'} when training ended: {on_first:,} masks at "
        f"P ≥ 0.5 at epoch {first['epoch']}, {on_last:,} at epoch {last['epoch']} ({where}). The objective had not "
        "settled them, so masks near the threshold may still change. Train for more epochs before reading "
        "masks one by one."
    )


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


# ---- saving -----------------------------------------------------------------------------------
def _partial_name(p: Path) -> str:
    return f".{p.name}.partial-"


def _probe_name(p: Path) -> str:
    return f".{p.name}.write-test-"


def _remove_stale_partials(p: Path) -> None:
    """Delete what interrupted saves to ``p`` left behind: ``.NAME.partial-PID-*`` siblings and
    write probes ``.NAME.write-test-PID-*`` whose process is gone, and the ``NAME.partial`` files
    of older versions."""
    parent = p.parent
    if not parent.is_dir():
        return
    legacy = parent / f"{p.name}.partial"
    candidates = [legacy] if os.path.lexists(legacy) else []
    with_pid = (_partial_name(p), _probe_name(p))
    candidates += [c for c in parent.iterdir() if c.name.startswith((*with_pid, f".{p.name}.old-"))]
    for c in candidates:
        prefix = next((w for w in with_pid if c.name.startswith(w)), None)
        pid = c.name[len(prefix):].split("-")[0] if prefix else ""
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another process is saving to the same path right now
        if c.is_dir() and not c.is_symlink():
            shutil.rmtree(c, ignore_errors=True)
        else:
            c.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_bundle_folder(p: Path) -> bool:
    return p.is_dir() and (p / MANIFEST).is_file()


def check_output(path: str | Path) -> Path:
    """``path`` as a place a bundle can be saved, checked before any training: a ``.sams`` file or
    a folder that does not exist yet or holds a bundle (it is replaced), in a folder that can be
    created and written. Raises :class:`SamsError` naming the problem and the fix."""
    if str(path).strip() == "":
        raise SamsError("No output path given. Name the bundle, e.g. --out model.sams (one file) or --out model/ (a folder).")
    p = Path(path)
    if p.suffix == ".sams":
        if p.is_dir():
            raise SamsError(f"{p} is a folder, not a .sams file. Choose another name, or drop the .sams ending to save a folder bundle.")
        if p.exists() and not _is_bundle_file(p):
            raise SamsError(f"{p} exists and is not a SAMS bundle, so it is not overwritten. Choose another name, or move the file away.")
    else:
        if p.exists() and not p.is_dir():
            raise SamsError(f"{p} exists and is a file, not a bundle folder. Choose another name, or end it in .sams to save one file.")
        if p.is_dir():
            extra = sorted(c.name for c in p.iterdir() if c.name not in (MANIFEST, WEIGHTS))
            if extra and not _is_bundle_folder(p):
                raise SamsError(
                    f"{p} is a folder holding other files ({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}), not a bundle. "
                    "Choose a new folder name: saving replaces the whole folder."
                )
            if extra:
                raise SamsError(
                    f"The bundle folder {p} also holds {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}, which saving "
                    "would remove (the folder is replaced as a whole). Move them away or choose another name."
                )
    parent = p.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f"{_probe_name(p)}{os.getpid()}-{secrets.token_hex(3)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SamsError(f"Cannot write the bundle to {parent} ({exc.strerror or exc}). Choose a folder you can write to.") from None
    return p


def _is_bundle_file(p: Path) -> bool:
    try:
        with zipfile.ZipFile(p) as z:
            return MANIFEST in z.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def save_bundle(path: str | Path, model: PerturbationModel, manifest: dict[str, Any]) -> Path:
    """Write ``model`` and ``manifest`` to ``path``: a ``.sams`` zip file, or a folder otherwise.

    The save is atomic (a temporary sibling renamed over the target), records the weights'
    SHA-256 and the manifest's checksum, and refuses a target that is not a bundle
    (:func:`check_output`). On a full disk or any other failure the old bundle is left as it was.
    """
    p = check_output(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = st_save(state)
    man = {k: v for k, v in manifest.items() if k not in ("load_notes", CHECKSUM_FIELD)}
    man["format_version"] = FORMAT_VERSION
    man["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    man["weights_bytes"] = len(weights)
    man = json.loads(json.dumps(_jsonable(man), allow_nan=False))  # exactly what a reader will parse
    man[CHECKSUM_FIELD] = manifest_checksum(man)
    text = json.dumps(man, indent=1, allow_nan=False)
    _remove_stale_partials(p)
    tmp = p.with_name(f"{_partial_name(p)}{os.getpid()}-{secrets.token_hex(3)}")
    try:
        if p.suffix == ".sams":
            with open(tmp, "wb") as f:
                with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
                    z.writestr(MANIFEST, text)
                    z.writestr(WEIGHTS, weights)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        else:
            tmp.mkdir()
            _write_synced(tmp / WEIGHTS, weights)
            _write_synced(tmp / MANIFEST, text.encode("utf-8"))
            _fsync_dir(tmp)
            if p.is_dir():
                if _exchange(tmp, p):  # the new folder in place, the old one at tmp, in one step
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    old = p.with_name(f".{p.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
                    os.rename(p, old)
                    os.rename(tmp, p)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, p)
        _fsync_dir(p.absolute().parent)
    except OSError as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise SamsError(
            f"Could not save the bundle to {p} ({exc.strerror or exc}); the previous file there, if any, is unchanged. "
            "Free disk space or choose another folder."
        ) from exc
    return p


# ---- loading ----------------------------------------------------------------------------------
def _header_shapes(weights: bytes) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor names, dtypes and shapes from a safetensors header, read without the tensors."""
    if len(weights) < 8:
        raise SamsError("The bundle's weights are truncated. Re-export it from the trained model.")
    (n,) = struct.unpack("<Q", weights[:8])
    if n > min(len(weights) - 8, 100 * 1024**2):
        raise SamsError("The bundle's weights have a damaged header. Re-export it from the trained model.")
    try:
        header = json.loads(weights[8 : 8 + n])
        return {k: (str(v["dtype"]), tuple(int(d) for d in v["shape"])) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SamsError(f"The bundle's weights have a damaged header ({exc}). Re-export it from the trained model.") from exc


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8"}


def _meta_shapes(manifest: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """Name → (safetensors dtype, shape, bytes) of every tensor of the manifest's model, from a
    model built on PyTorch's meta device (nothing allocated)."""
    family, hparams = manifest["family"], manifest["hparams"]
    if family not in registry.FAMILY_LABELS:
        raise SamsError(
            f"Unknown model family {family!r} in the bundle. Known: {', '.join(registry.FAMILY_LABELS)}. "
            "Register the family (sams_core.models.registry.register) before loading, or update sams_core."
        )
    try:
        with torch.device("meta"):
            meta = registry.build_model(family, **hparams)
    except SamsError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise SamsError(f"The bundle's hyper-parameters do not describe a {family} model ({exc}). Re-export it from the trained model.") from exc
    return {
        k: (_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape), v.numel() * v.element_size())
        for k, v in meta.state_dict().items()
    }


def _weights_cap(manifest: dict[str, Any]) -> int:
    """The most bytes the manifest's model can need: its tensors plus a generous header."""
    shapes = _meta_shapes(manifest)
    return sum(b for _, _, b in shapes.values()) + 1024 * (len(shapes) + 64)


def _check_shapes(manifest: dict[str, Any], weights: bytes) -> None:
    """The tensors in the weights' header are exactly those of the manifest's model (built on the
    meta device, so no memory is taken), compared by name and shape."""
    family = manifest["family"]
    want = _meta_shapes(manifest)
    have = _header_shapes(weights)
    if set(want) != set(have):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise SamsError(
            f"The bundle's weights do not fit a {family} model with its hyper-parameters "
            f"(missing: {', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(extra[:3]) or 'none'}). Re-export it from the trained model."
        )
    bad = [k for k in want if want[k][1] != have[k][1]]
    if bad:
        k = bad[0]
        raise SamsError(
            f"The bundle's weights do not fit a {family} model with its hyper-parameters: {k} has shape "
            f"{list(have[k][1])}, the model {list(want[k][1])}. Re-export it from the trained model."
        )


def load_bundle(source: str | Path | bytes, device: str | torch.device | None = None) -> ModelBundle:
    """Read a bundle (path to a ``.sams`` file or folder, or the bytes of one).

    Nothing from the file is executed; every read is bounded, the manifest is validated and its
    checksum verified, the weights' checksum verified, and the tensor shapes checked against
    the hyper-parameters before the model is allocated. Raises :class:`SamsError` for a missing,
    truncated, tampered or incompatible bundle.
    """
    manifest, weights, path = read_bundle(source, weights_cap=_weights_cap)
    assert weights is not None
    digest = hashlib.sha256(weights).hexdigest()
    if digest != manifest.get("weights_sha256"):
        raise SamsError(
            "The bundle was modified after it was saved: its weights do not match the checksum in its manifest "
            "(edited or truncated). Re-export it from the trained model."
        )
    family, hparams = manifest["family"], manifest["hparams"]
    _check_shapes(manifest, weights)
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
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise SamsError(f"The bundle's weights do not fit a {family} model with its hyper-parameters ({exc}).") from exc
    if len(manifest["genes"]) != model.n_genes or len(manifest["perturbations"]) != model.n_perturbations:
        raise SamsError("The bundle's gene or perturbation names do not match the model's size. The file is damaged.")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    model.to(dev).eval()
    return ModelBundle(model=model, manifest=manifest, path=path)


__all__ = ["FORMAT_VERSION", "ModelBundle", "check_output", "load_bundle", "make_manifest", "save_bundle"]
