"""What the Train page's form derives from a model's manifest: "same split as model X".

Pure functions of manifests and settings (no Streamlit), so the page stays a layout and the
derivations are tested on their own.
"""

from __future__ import annotations

from typing import Any

from sams_core.errors import SamsError

#: SplitSpec fields copied from a bundle's recorded split.
SPLIT_FIELDS = ("kind", "fraction", "val_fraction", "test_fraction", "seed", "level")


def same_split(manifest: dict[str, Any]) -> dict[str, Any]:
    """The job split (``sams_core.pipeline.SplitSpec`` fields) that recreates the bundle's split:
    its kind, fractions, seed and level, and its held-out set named exactly (its recorded
    (condition, level) pairs for ``heldout-covariate``, its test conditions for the held-out
    combination/perturbation splits), so the new run is scored on the very same test cells.

    Raises :class:`SamsError` when the bundle records no split.
    """
    rec = manifest.get("split") or {}
    if not rec.get("kind"):
        raise SamsError("This model records no split, so its split cannot be reused. Choose another model or a split kind.")
    out = {k: rec[k] for k in SPLIT_FIELDS if k in rec}
    if rec["kind"] == "heldout-covariate" and rec.get("test_pairs"):
        out["heldout"] = [list(p) for p in rec["test_pairs"]]
    elif rec["kind"] in ("heldout-combos", "heldout-perturbations") and rec.get("test_conditions"):
        out["heldout"] = [str(c) for c in rec["test_conditions"]]
    return out


def split_summary(split: dict[str, Any]) -> str:
    """One line saying what a job split holds out."""
    held = split.get("heldout")
    what = f"{len(held)} held-out {'(condition, cell type) pairs' if split.get('kind') == 'heldout-covariate' else 'conditions'}" if held else \
        f"fraction {split.get('fraction')}, seed {split.get('seed')}"
    return f"{split.get('kind')} · {what}"


def settings_mismatch(manifest: dict[str, Any], read_kwargs: dict[str, Any]) -> str | None:
    """What differs between how the bundle read its screen and the sidebar's data settings
    (perturbation column, separators, covariates), or None: a run with other settings may not
    recreate the split, nor join the model's Compare table."""
    d = manifest.get("data") or {}
    diffs = []
    if d.get("perturbation_key") and d["perturbation_key"] != read_kwargs.get("perturbation_key"):
        diffs.append(f"perturbation column {d['perturbation_key']!r}")
    if list(d.get("separators") or ["+"]) != list(read_kwargs.get("separators") or ["+"]):
        diffs.append(f"separators {' '.join(d.get('separators') or ['+'])}")
    if list(d.get("covariate_keys") or []) != list(read_kwargs.get("covariate_keys") or []):
        diffs.append(f"covariates {', '.join(d.get('covariate_keys') or []) or 'none'}")
    if not diffs:
        return None
    return ("That model read the screen with " + "; ".join(diffs) + ". Set the same in the sidebar's Data settings, "
            "or the new run may not hold out the same cells nor join its Compare table.")
