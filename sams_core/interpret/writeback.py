"""A model's results written back into the screen's AnnData, for scanpy and pertpy (DESIGN §4).

:func:`write_back` puts the cells' latents in ``obsm`` and the model's masks, embeddings and
(optionally) unit loadings in ``uns["sams"]``; :func:`write_h5ad` saves the annotated AnnData
atomically. From the command line: ``python -m sams_core write-back BUNDLE --data screen.h5ad
--out annotated.h5ad``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sams_core.data.batches import DeviceData, condition_ids
from sams_core.data.screen import PerturbationData
from sams_core.errors import SamsError
from sams_core.io.bundle import ModelBundle

__all__ = ["write_back", "write_h5ad"]


@torch.no_grad()
def write_back(adata: Any, bundle: ModelBundle, data: PerturbationData, loadings: pd.DataFrame | None = None, key: str = "X_sams") -> Any:
    """Write the model's results into ``adata`` (cells in the same order as ``data``).

    ``obsm[key]`` = full latent means, ``obsm[key + "_basal"]`` = basal latents; ``uns["sams"]``
    holds the mask probabilities, embedding means, the model's perturbation names and family,
    and (if given) the unit loadings. Returns ``adata``.
    """
    if adata.n_obs != data.n_cells:
        raise SamsError(f"The AnnData has {adata.n_obs} cells but the data {data.n_cells}. Write back into the same screen.")
    model = bundle.model
    dd = DeviceData(data, np.arange(data.n_cells), model.input_mean.device, condition_ids(model, data))
    lat = [model.latent(b) for b in dd.batches(2048)]
    adata.obsm[key] = torch.cat([x["full"] for x in lat]).cpu().numpy()
    adata.obsm[key + "_basal"] = torch.cat([x["basal"] for x in lat]).cpu().numpy()
    uns: dict[str, Any] = {"family": bundle.family, "label": bundle.label, "mask_rows": np.array(bundle.mask_rows, dtype=str)}
    p = bundle.mask_probabilities()
    if p is not None:
        uns["mask_probs"] = p
    e = bundle.embedding_means()
    if e is not None:
        uns["embeddings"] = e
    if loadings is not None:
        uns["unit_loadings"] = loadings.to_numpy()
        uns["unit_loading_genes"] = np.array(loadings.columns, dtype=str)
    adata.uns["sams"] = uns
    return adata


def write_h5ad(adata: Any, path: str | Path) -> Path:
    """Save ``adata`` to ``path`` (an ``.h5ad`` file) atomically: written to a temporary sibling
    file, then renamed over ``path``, so a reader never sees a half-written file and a failed
    write leaves any earlier file in place."""
    out = Path(path)
    if out.suffix.lower() != ".h5ad":
        raise SamsError(f"{out.name} does not end in .h5ad. Name the output file NAME.h5ad.")
    if not out.parent.is_dir():
        raise SamsError(f"The folder {out.parent} does not exist. Create it or write elsewhere.")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".partial.h5ad", dir=out.parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
