"""The bundle file format without the model: locating the parts of a ``.sams`` bundle and
reading its manifest (family, hyper-parameters, genes, perturbations, split, training history,
metrics).

This module needs neither PyTorch nor the model code (only the torch-free family registry), so a caller that only shows what a bundle
holds (the dashboard's first screen, a file listing) does not pay for loading them.
:func:`sams_core.io.bundle.load_bundle` builds the model on top of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from sams_core.errors import SamsError
from sams_core.models import registry

FORMAT = "sams-bundle"
#: Format 2 adds ``bundle_sha256`` (a checksum over the canonical manifest, which holds the
#: weights' SHA-256); format 1 bundles are read with their weights verified and a note.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
CHECKSUM_FIELD = "bundle_sha256"
#: Largest manifest and weights a bundle may hold; anything larger is refused before it is read.
MAX_MANIFEST_BYTES = 64 * 1024**2
MAX_WEIGHTS_BYTES = 8 * 1024**3
#: Largest ``.sams`` file, most members and largest total uncompressed size of its archive.
MAX_FILE_BYTES = MAX_MANIFEST_BYTES + MAX_WEIGHTS_BYTES + 1024**2
MAX_MEMBERS = 16
MAX_TOTAL_BYTES = MAX_MANIFEST_BYTES + MAX_WEIGHTS_BYTES
#: Bounds of the size hyper-parameters a manifest may declare (a larger value would allocate a
#: model no screen needs, so it is taken as damage and refused before anything is built).
SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "n_genes": (1, 200_000),
    "n_perturbations": (1, 1_000_000),
    "n_conditions": (1, 1_000_000),
    "n_latent": (1, 4096),
    "n_hidden": (1, 65_536),
    "n_layers": (0, 64),
    "embed_hidden": (1, 65_536),
    "embed_layers": (0, 64),
    "n_covariates": (0, 100_000),
}
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_DAMAGED = "The file is damaged or was edited; re-export it from the trained model."


def _capped(size: int, cap: int, part: str, where: str) -> None:
    if size > cap:
        raise SamsError(
            f"{where}: its {part} is {size / 1024**2:,.0f} MB, more than a bundle may hold ({cap / 1024**2:,.0f} MB). "
            "The file is damaged or not a SAMS model bundle."
        )


def _open_regular(path: Path, what: str, follow: bool = True) -> BinaryIO:
    """``path`` opened for reading once it is a regular file (not a device, pipe, socket or
    folder; not a link either unless ``follow``). Opening never blocks (a FIFO is refused)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
        if path.is_symlink():
            raise SamsError(
                f"{path} is a link, so it cannot be {what}: a bundle's parts must be regular files inside its folder. "
                "Copy the file in place of the link."
            )
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SamsError(f"Bundle not found: {path}. Check the path.") from None
    except OSError as exc:
        raise SamsError(f"{path} cannot be opened as {what} ({exc.strerror}). Give the path of a .sams file or bundle folder.") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SamsError(f"{path} is not a regular file, so it cannot be {what}. Give the path of a .sams file or bundle folder.")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_capped(path: Path, cap: int, part: str, expected: int | None = None) -> bytes:
    """The bytes of a regular file (no link) no larger than ``cap`` (checked before reading), and
    of ``expected`` size when given."""
    with _open_regular(path, f"a bundle's {part}", follow=False) as f:
        size = os.fstat(f.fileno()).st_size
        _capped(size, cap, part, str(path.parent))
        if expected is not None and size != expected:
            raise SamsError(f"{path.parent}: its {part} hold {size:,} bytes where the manifest says {expected:,}. {_DAMAGED}")
        data = f.read(cap + 1)
    _capped(len(data), cap, part, str(path.parent))  # a file that grew while being read
    return data


def _open(source: str | Path | bytes) -> tuple[Any, str, Path | None]:
    """What to hand to ``zipfile`` (or a folder path), how to name it in messages, its path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        _capped(len(source), MAX_FILE_BYTES, "archive", "the uploaded bundle")
        return io.BytesIO(bytes(source)), "the uploaded bundle", None
    if not isinstance(source, (str, os.PathLike)):
        raise SamsError(f"A bundle is a path or the bytes of a .sams file, not {type(source).__name__}.")
    if str(source) == "":
        raise SamsError("No bundle path given. Give the path of a .sams file or bundle folder.")
    path = Path(source)
    if path.is_dir():
        return path, str(path), path
    f = _open_regular(path, "a model bundle")
    try:
        _capped(os.fstat(f.fileno()).st_size, MAX_FILE_BYTES, "archive", str(path))
    except SamsError:
        f.close()
        raise
    return f, str(path), path


def _member(z: zipfile.ZipFile, name: str, cap: int, where: str, expected: int | None = None) -> bytes:
    """One archive member read within ``cap`` bytes, refused before decompressing when it is
    encrypted, compressed by a method this reader lacks, or declared too large."""
    info = z.getinfo(name)
    if info.flag_bits & 0x1:
        raise SamsError(f"{where}: its {name} is encrypted. SAMS bundles are never encrypted; re-export it from the trained model.")
    if info.compress_type not in _ZIP_METHODS:
        raise SamsError(
            f"{where}: its {name} uses zip compression method {info.compress_type}, which this reader does not support "
            "(SAMS bundles use deflate). Re-export it from the trained model."
        )
    _capped(info.file_size, cap, name, where)
    if expected is not None and info.file_size != expected:
        raise SamsError(f"{where}: its {name} holds {info.file_size:,} bytes where the manifest says {expected:,}. {_DAMAGED}")
    return z.read(name)


def read_bundle(
    source: str | Path | bytes, weights: bool = True, weights_cap: Callable[[dict[str, Any]], int] | None = None
) -> tuple[dict[str, Any], bytes | None, Path | None]:
    """The validated manifest and the raw weights of a bundle (``.sams`` zip, folder, or the bytes
    of a zip), every read bounded.

    Only regular files are read (no devices, pipes or links inside a folder); the manifest is
    read within :data:`MAX_MANIFEST_BYTES` and validated (:func:`parse_manifest`: schema and
    checksum) before the weights, whose size must be the one the manifest records. An archive
    is refused before decompressing when it has more than :data:`MAX_MEMBERS` members or any but
    the manifest and the weights, declares more than :data:`MAX_TOTAL_BYTES`, or holds encrypted
    or unsupported members. ``weights_cap`` gives the largest weights the validated manifest can
    need (e.g. from its model's tensor shapes), checked before they are read. With
    ``weights=False`` the weights are not read (None). Raises :class:`SamsError` for a missing,
    truncated, foreign or edited bundle.
    """
    buf, where, path = _open(source)
    if path is not None and path.is_dir():
        m, w = path / MANIFEST, path / WEIGHTS
        if not os.path.lexists(m) or not os.path.lexists(w):
            raise SamsError(f"{path} is a folder without {MANIFEST} and {WEIGHTS}: not a model bundle.")
        manifest = parse_manifest(_read_capped(m, MAX_MANIFEST_BYTES, "manifest"))
        cap = min(MAX_WEIGHTS_BYTES, weights_cap(manifest)) if weights and weights_cap else MAX_WEIGHTS_BYTES
        raw_w = _read_capped(w, cap, "weights", manifest.get("weights_bytes")) if weights else None
        return manifest, raw_w, path
    try:
        with buf, zipfile.ZipFile(buf) as z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            if len(infos) > MAX_MEMBERS:
                raise SamsError(f"{where} holds {len(infos):,} files; a bundle holds {MANIFEST} and {WEIGHTS}. Not a SAMS model bundle.")
            if MANIFEST not in names or WEIGHTS not in names:
                raise SamsError(f"{where} lacks {MANIFEST} or {WEIGHTS}: not a SAMS model bundle.")
            if len(set(names)) != len(names):
                raise SamsError(f"{where} holds a file twice under one name. {_DAMAGED}")
            extra = sorted(set(names) - {MANIFEST, WEIGHTS})
            if extra:
                raise SamsError(f"{where} holds files other than {MANIFEST} and {WEIGHTS} ({', '.join(extra[:3])}). {_DAMAGED}")
            _capped(sum(i.file_size for i in infos), MAX_TOTAL_BYTES, "content", where)
            # the sizes the archive declares are checked before anything is decompressed
            manifest = parse_manifest(_member(z, MANIFEST, MAX_MANIFEST_BYTES, where))
            cap = min(MAX_WEIGHTS_BYTES, weights_cap(manifest)) if weights and weights_cap else MAX_WEIGHTS_BYTES
            raw_w = _member(z, WEIGHTS, cap, where, manifest.get("weights_bytes")) if weights else None
            return manifest, raw_w, path
    except SamsError:
        raise
    except zipfile.BadZipFile as exc:
        raise SamsError(f"{where} is truncated or not a SAMS model bundle ({exc}). Re-export it from the trained model.") from exc
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zlib.error, zipfile.LargeZipFile) as exc:
        raise SamsError(f"{where} is damaged ({type(exc).__name__}: {exc}). Re-export it from the trained model.") from exc


def read_parts(source: str | Path | bytes, weights: bool = True) -> tuple[bytes, bytes | None, Path | None]:
    """The manifest (canonical JSON bytes, validated) and raw weights of a bundle; see :func:`read_bundle`."""
    manifest, raw_w, path = read_bundle(source, weights)
    return canonical_bytes(manifest, keep_checksum=True), raw_w, path


# ---- the manifest's schema and checksum ------------------------------------------------------
def canonical_bytes(manifest: dict[str, Any], keep_checksum: bool = False) -> bytes:
    """The manifest as canonical JSON (sorted keys, no spaces, UTF-8), without its checksum field
    unless ``keep_checksum``: the text the checksum is taken over."""
    body = manifest if keep_checksum else {k: v for k, v in manifest.items() if k != CHECKSUM_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical manifest without its checksum field. The manifest records the
    weights' SHA-256, so this one value covers the manifest and the weights together."""
    return hashlib.sha256(canonical_bytes(manifest)).hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) or v is None


def _names(manifest: dict[str, Any], key: str, required: bool = True) -> None:
    v = manifest.get(key)
    if v is None and not required:
        return
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise SamsError(f"The bundle's manifest field {key!r} is not a list of names. {_DAMAGED}")
    if len(set(v)) != len(v):
        raise SamsError(f"The bundle's manifest lists a name twice in {key!r}. {_DAMAGED}")


def validate_manifest(manifest: Any) -> dict[str, Any]:
    """``manifest`` once it has the schema of a bundle manifest: every field of the right type,
    size hyper-parameters within :data:`SIZE_LIMITS` and matching the name lists, metrics
    numbers, history a list of records. Raises :class:`SamsError` naming the first bad field."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SamsError("The manifest does not describe a SAMS model bundle (format field missing).")
    version = manifest.get("format_version")
    if not _is_int(version) or version < 1:
        raise SamsError(f"The bundle's format version {version!r} is not a version number. {_DAMAGED}")
    if version > FORMAT_VERSION:
        raise SamsError(f"Bundle format version {version} is newer than this software reads ({FORMAT_VERSION}). Update sams_core.")
    if not isinstance(manifest.get("family"), str):
        raise SamsError(f"The bundle's manifest names no model family. {_DAMAGED}")
    hp = manifest.get("hparams")
    if not isinstance(hp, dict):
        raise SamsError(f"The bundle's manifest has no hyper-parameters. {_DAMAGED}")
    for key, value in hp.items():
        if not isinstance(value, (str, int, float, bool, type(None), list)):
            raise SamsError(f"The bundle's hyper-parameter {key!r} is not a plain value. {_DAMAGED}")
        if key in SIZE_LIMITS:
            lo, hi = SIZE_LIMITS[key]
            if not _is_int(value) or not lo <= value <= hi:
                raise SamsError(
                    f"The bundle's hyper-parameter {key} = {value!r} is not a whole number between {lo:,} and {hi:,}. {_DAMAGED}"
                )
        elif isinstance(value, float) and not math.isfinite(value):
            raise SamsError(f"The bundle's hyper-parameter {key!r} is not a finite number. {_DAMAGED}")
    _names(manifest, "genes")
    _names(manifest, "perturbations")
    _names(manifest, "conditions", required=False)
    for key, names in (("n_genes", "genes"), ("n_perturbations", "perturbations"), ("n_conditions", "conditions")):
        if key in hp and manifest.get(names) is not None and hp[key] != len(manifest[names]):
            raise SamsError(f"The bundle's manifest lists {len(manifest[names]):,} {names} for a model of {hp[key]:,}. {_DAMAGED}")
    for key in ("data", "split", "training", "metrics"):
        if not isinstance(manifest.get(key, {}), dict):
            raise SamsError(f"The bundle's manifest field {key!r} is not a table of settings. {_DAMAGED}")
    if manifest.get("training_state") is not None and not isinstance(manifest["training_state"], dict):
        raise SamsError(f"The bundle's manifest field 'training_state' is not a table of settings. {_DAMAGED}")
    if not isinstance(manifest.get("data", {}).get("is_counts", True), bool):
        raise SamsError(f"The bundle's manifest field data.is_counts is not true or false. {_DAMAGED}")
    for split, values in manifest.get("metrics", {}).items():
        if not isinstance(values, dict) or not all(isinstance(k, str) and _is_num(v) for k, v in values.items()):
            raise SamsError(f"The bundle's metrics for {split!r} are not a table of numbers. {_DAMAGED}")
    history = manifest.get("training", {}).get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise SamsError(f"The bundle's training history is not a list of epoch records. {_DAMAGED}")
    sha, size = manifest.get("weights_sha256"), manifest.get("weights_bytes")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise SamsError(f"The bundle's manifest lacks the weights' checksum. {_DAMAGED}")
    if size is not None and (not _is_int(size) or not 0 < size <= MAX_WEIGHTS_BYTES):
        raise SamsError(f"The bundle's manifest records an impossible weights size ({size!r}). {_DAMAGED}")
    return manifest


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """A bundle's manifest from its raw bytes, checked to be a SAMS bundle this version reads: its
    schema (:func:`validate_manifest`) and, from format 2 on, its checksum. A format 1 manifest
    (saved before manifests were checksummed) is read with a note in ``manifest['load_notes']``
    (never saved back)."""
    try:
        manifest = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SamsError(f"The bundle's manifest is not valid JSON ({exc}). The file is damaged.") from exc
    validate_manifest(manifest)
    recorded = manifest.get(CHECKSUM_FIELD)
    if recorded is None and manifest["format_version"] < 2:
        manifest.setdefault("load_notes", []).append(
            "This bundle was saved before manifests were checksummed: its weights are verified, its manifest is not. "
            "Save it again (e.g. python -m sams_core build-demo for the demo) to protect both."
        )
    elif recorded != manifest_checksum(manifest):
        raise SamsError(
            "The bundle was modified after it was saved: its manifest does not match the checksum recorded with it. "
            "Re-export it from the trained model (an edit of the manifest or the weights is refused)."
        )
    return manifest


def _no_constant(name: str) -> Any:
    raise SamsError(f"The bundle's manifest holds {name}, which is not JSON. The file is damaged.")


def read_manifest(source: str | Path | bytes) -> dict[str, Any]:
    """The manifest of a bundle (schema and checksum verified), without reading its weights or
    building its model.

    The weights are checked against the manifest when the model is loaded
    (:func:`sams_core.io.bundle.load_bundle`).
    """
    return read_bundle(source, weights=False)[0]


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
    "CHECKSUM_FIELD",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "WEIGHTS",
    "canonical_bytes",
    "csv_text",
    "manifest_checksum",
    "markdown_table",
    "metrics_table",
    "model_label",
    "parse_manifest",
    "read_manifest",
    "read_bundle",
    "read_parts",
    "validate_manifest",
]
