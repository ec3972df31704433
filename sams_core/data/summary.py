"""What a screen holds (cells, genes, perturbations, combinations, controls), remembered on disk.

The dashboard's home page shows this for the chosen ``.h5ad`` without loading a model. Reading a
screen takes AnnData and a pass over the perturbation labels; the result is a few numbers, so it
is kept in the user's cache directory keyed by the file's path, size and modification time, and
a later start of the app reads it back without opening the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sams_core.data.screen import from_anndata
from sams_core.errors import SamsError
from sams_core.settings import SETTINGS

#: Where derived results (screen summaries, UMAP layouts) are cached; ``SAMS_CACHE_DIR`` overrides.
DEFAULT_CACHE = SETTINGS.cache_dir


@dataclass(frozen=True)
class ScreenSummary:
    """Counts that describe a perturbation screen."""

    cells: int
    genes: int
    perturbations: int
    combinations: int
    control_cells: int
    simulated: bool  # the file carries the simulator's answer key (``uns['sams_truth']``)
    # the covariates the models would condition on (detected as the data contract does): column → levels
    covariates: dict[str, list[str]] = field(default_factory=dict)


def summarize(data, simulated: bool = False) -> ScreenSummary:
    """The summary of a loaded :class:`~sams_core.data.screen.PerturbationData`."""
    return ScreenSummary(
        cells=int(data.n_cells), genes=int(data.n_genes), perturbations=int(data.n_perturbations),
        combinations=len(data.combinations()), control_cells=int(data.control_mask.sum()), simulated=bool(simulated),
        covariates={k: list(v) for k, v in getattr(data, "covariates", {}).items()},
    )


def summarize_adata(adata) -> ScreenSummary:
    """The summary of an AnnData screen read with the data contract's defaults."""

    return summarize(from_anndata(adata), "sams_truth" in adata.uns)


def screen_summary(path: str | Path, cache_dir: str | Path | None = DEFAULT_CACHE) -> ScreenSummary:
    """The summary of the ``.h5ad`` file at ``path``, from the cache when the file is unchanged."""
    p = Path(path)
    if not p.is_file():
        raise SamsError(f"No data file at {path}. Give the path of an .h5ad file.")
    st = p.stat()
    key = hashlib.sha256(json.dumps([str(p.resolve()), st.st_size, st.st_mtime_ns, "covariates"]).encode()).hexdigest()[:24]
    cached = Path(cache_dir) / f"summary_{key}.json" if cache_dir is not None else None
    if cached is not None and cached.exists():
        try:
            return ScreenSummary(**json.loads(cached.read_text()))
        except (TypeError, ValueError):
            pass  # written by another version: recompute
    import anndata

    try:
        adata = anndata.read_h5ad(p, backed="r")
    except Exception as e:  # noqa: BLE001 - any reader failure means "not an h5ad we can read"
        raise SamsError(f"Could not read {p.name} as an .h5ad file ({type(e).__name__}: {e}).") from e
    try:
        summary = summarize_adata(adata)
    finally:
        if adata.isbacked:
            adata.file.close()
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".partial")
            tmp.write_text(json.dumps(asdict(summary)))
            tmp.replace(cached)
        except OSError:
            pass  # a read-only cache directory only costs the next start a re-read
    return summary
