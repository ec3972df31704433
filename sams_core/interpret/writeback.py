"""Results written back into an AnnData for scanpy: latents, masks, embeddings, loadings.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from sams_core.data.batches import DeviceData, condition_ids
from sams_core.data.screen import PerturbationData
from sams_core.errors import SamsError
from sams_core.io.bundle import ModelBundle


# ---------------------------------------------------------------------------------------------
# results back into AnnData
@torch.no_grad()
def write_back(adata, bundle: ModelBundle, data: PerturbationData, loadings: pd.DataFrame | None = None, key: str = "X_sams"):
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
    uns: dict = {"family": bundle.family, "label": bundle.label, "mask_rows": np.array(bundle.mask_rows, dtype=str)}
    p = model.mask_probs()
    if p is not None:
        uns["mask_probs"] = p.cpu().numpy()
    if hasattr(model, "embedding_means"):
        uns["embeddings"] = model.embedding_means().cpu().numpy()
    if loadings is not None:
        uns["unit_loadings"] = loadings.to_numpy()
        uns["unit_loading_genes"] = np.array(loadings.columns, dtype=str)
    adata.uns["sams"] = uns
    return adata
