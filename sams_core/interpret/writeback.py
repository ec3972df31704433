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
from sams_core.interpret.embed import umap_embedding
from sams_core.interpret.programs import unit_loadings
from sams_core.io.bundle import ModelBundle

__all__ = ["export_screen", "write_back", "write_h5ad"]


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


def export_screen(adata: Any, bundle: ModelBundle, data: PerturbationData, umap: bool = True, loadings: bool = True,
                  key: str = "X_sams", seed: int = 0) -> Any:
    """The screen with everything the model learned, ready for scanpy (a copy; ``adata`` is left
    as it was): :func:`write_back`'s latents in ``obsm[key]`` and ``obsm[key + "_basal"]``, masks
    and embeddings in ``uns["sams"]``, with ``umap`` a UMAP of all cells' latents in
    ``obsm["X_umap"]`` (scanpy's name, so ``sc.pl.umap`` draws it; an existing ``X_umap`` is kept
    and the model's goes to ``obsm[key + "_umap"]``), with ``loadings`` each unit's gene loadings,
    and what the model is (label, family, run, the data hash it was trained on) in ``uns["sams"]``.
    """
    out = adata.copy()
    write_back(out, bundle, data, unit_loadings(bundle, data) if loadings else None, key=key)
    if umap:
        emb = umap_embedding(bundle, data, latent="full", max_cells=data.n_cells, seed=seed)
        coords = np.full((data.n_cells, 2), np.nan, dtype=np.float32)
        coords[emb.cells] = emb.coords
        out.obsm[key + "_umap"] = coords
        if "X_umap" not in out.obsm:
            out.obsm["X_umap"] = coords
    uns = out.uns["sams"]
    uns["perturbations"] = np.array(bundle.perturbations, dtype=str)
    uns["n_latent"] = int(bundle.n_latent)
    manifest = bundle.manifest
    run = manifest.get("run") or {}
    uns["run"] = {k: str(v) for k, v in run.items()}
    uns["trained_on_checksum"] = str((manifest.get("data") or {}).get("checksum", ""))
    uns["model_checksum"] = bundle.checksum()
    return out


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
