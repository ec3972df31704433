"""The bundle file format without the model: locating the parts of a ``.sams`` bundle and
reading its manifest (family, hyper-parameters, genes, perturbations, split, training history,
metrics).

This module needs neither PyTorch nor the model code (only the torch-free family registry), so a caller that only shows what a bundle
holds (the dashboard's first screen, a file listing) does not pay for loading them.
:func:`sams_core.io.bundle.load_bundle` builds the model on top of it.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from sams_core.errors import SamsError
from sams_core.models import registry

FORMAT = "sams-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
#: Largest manifest and weights a bundle may hold; anything larger is refused before it is read.
MAX_MANIFEST_BYTES = 64 * 1024**2
MAX_WEIGHTS_BYTES = 8 * 1024**3


def _regular(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (not a device, pipe or folder); SamsError otherwise."""
    if not path.is_file():
        raise SamsError(f"{path} is not a regular file, so it cannot be {what}. Give the path of a .sams file or bundle folder.")
    return path


def _capped(size: int, cap: int, part: str, where: str) -> None:
    if size > cap:
        raise SamsError(
            f"{where}: its {part} is {size / 1024**2:,.0f} MB, more than a bundle may hold ({cap / 1024**2:,.0f} MB). "
            "The file is damaged or not a SAMS model bundle."
        )


def _read_capped(path: Path, cap: int, part: str) -> bytes:
    """The bytes of a regular file no larger than ``cap`` (checked before reading)."""
    _regular(path, f"a bundle's {part}")
    _capped(path.stat().st_size, cap, part, str(path.parent))
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    _capped(len(data), cap, part, str(path.parent))  # a file that grew while being read
    return data


def _open(source: str | Path | bytes) -> tuple[Any, str, Path | None]:
    """What to hand to ``zipfile`` (or a folder path), how to name it in messages, its path."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source), "the uploaded bundle", None
    path = Path(source)
    if not path.exists():
        raise SamsError(f"Bundle not found: {path}. Check the path.")
    if not path.is_dir():
        _regular(path, "a model bundle")
    return path, str(path), path


def read_parts(source: str | Path | bytes, weights: bool = True) -> tuple[bytes, bytes | None, Path | None]:
    """The raw manifest and weights of a bundle (``.sams`` zip, folder, or the bytes of a zip).

    With ``weights=False`` the weights are not read (returned as None). Raises
    :class:`SamsError` for a missing, truncated or foreign file.
    """
    buf, where, path = _open(source)
    if path is not None and path.is_dir():
        m, w = path / MANIFEST, path / WEIGHTS
        if not m.exists() or not w.exists():
            raise SamsError(f"{path} is a folder without {MANIFEST} and {WEIGHTS}: not a model bundle.")
        return (_read_capped(m, MAX_MANIFEST_BYTES, "manifest"),
                (_read_capped(w, MAX_WEIGHTS_BYTES, "weights") if weights else None), path)
    try:
        with zipfile.ZipFile(buf) as z:
            names = set(z.namelist())
            if MANIFEST not in names or WEIGHTS not in names:
                raise SamsError(f"{where} lacks {MANIFEST} or {WEIGHTS}: not a SAMS model bundle.")
            # the sizes the archive declares are checked before anything is decompressed
            _capped(z.getinfo(MANIFEST).file_size, MAX_MANIFEST_BYTES, "manifest", where)
            _capped(z.getinfo(WEIGHTS).file_size, MAX_WEIGHTS_BYTES, "weights", where)
            return z.read(MANIFEST), (z.read(WEIGHTS) if weights else None), path
    except zipfile.BadZipFile as exc:
        raise SamsError(
            f"{where} is truncated or not a SAMS model bundle ({exc}). Re-export it from the trained model."
        ) from exc
    except (OSError, EOFError, ValueError) as exc:  # damaged archive members
        if isinstance(exc, SamsError):
            raise
        raise SamsError(f"{where} is damaged ({exc}). Re-export it from the trained model.") from exc


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """A bundle's manifest from its raw bytes, checked to be a SAMS bundle this version reads."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SamsError(f"The bundle's manifest is not valid JSON ({exc}). The file is damaged.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SamsError("The manifest does not describe a SAMS model bundle (format field missing).")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SamsError(
            f"Bundle format version {version!r} is newer than this software reads ({FORMAT_VERSION}). "
            "Update sams_core."
        )
    return manifest


def read_manifest(source: str | Path | bytes) -> dict[str, Any]:
    """The manifest of a bundle, without reading its weights or building its model.

    The weights' checksum is verified only when the model is loaded
    (:func:`sams_core.io.bundle.load_bundle`).
    """
    raw, _, _ = read_parts(source, weights=False)
    return parse_manifest(raw)


def model_label(manifest: dict[str, Any]) -> str:
    """Human name of a bundle's model, e.g. "SAMS-VAE (correlated)" (the family's label from the
    registry, with the options it shows; an unknown family by its name)."""
    return registry.label(manifest)


def metrics_table(manifest: dict[str, Any], digits: int | None = 4) -> list[list[str]]:
    """The bundle's recorded metrics as text rows: a header (``metric`` then one column per split)
    and one row per metric, values to ``digits`` significant digits (None: all; "" where a split
    lacks the metric)."""
    metrics = manifest.get("metrics") or {}
    splits = list(metrics)
    names = sorted({name for values in metrics.values() for name in values})
    rows = [["metric", *splits]]
    for name in names:
        rows.append([name, *(_fmt(metrics[s].get(name), digits) for s in splits)])
    return rows


def _fmt(value: Any, digits: int | None) -> str:
    if value is None:
        return ""
    try:
        return repr(float(value)) if digits is None else f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


def markdown_table(rows: list[list[str]]) -> str:
    """Text rows (header first) as a Markdown table."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(rows[0]), "|" + "---|" * len(rows[0]), *(line(r) for r in rows[1:])])


def csv_text(rows: list[list[str]]) -> str:
    """Text rows (header first) as CSV."""
    import csv

    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "WEIGHTS",
    "csv_text",
    "markdown_table",
    "metrics_table",
    "model_label",
    "parse_manifest",
    "read_manifest",
    "read_parts",
]
