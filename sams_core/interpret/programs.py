"""Gene programs of latent units: what each unit does to the genes, and which gene sets it moves.

:func:`unit_loadings` measures each latent unit's effect on every gene through the decoder,
:func:`top_genes` lists a unit's strongest genes, :func:`unit_enrichment` and
:func:`effect_enrichment` test gene sets (:mod:`sams_core.interpret.genesets`) against a unit's
loadings or a predicted effect, and :func:`program_collection` turns a simulation's true gene
programs into a gene-set collection to check them against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from sams_core.data.batches import DeviceData, condition_ids
from sams_core.data.screen import PerturbationData
from sams_core.errors import SamsError
from sams_core.interpret.effects import EffectPrediction
from sams_core.interpret.genesets import (
    GeneSetCollection,
    hypergeometric_enrichment,
    rank_enrichment,
)
from sams_core.io.bundle import ModelBundle
from sams_core.simulate import truth_from_adata

__all__ = ["effect_enrichment", "program_collection", "top_genes", "unit_enrichment", "unit_loadings"]


# ---------------------------------------------------------------------------------------------
# gene programs of latent units
@torch.no_grad()
def unit_loadings(bundle: ModelBundle, data: PerturbationData, n_cells: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Gene loadings of each latent unit [K × G]: the change of the decoder's expected log2
    expression when the unit moves up by one standard deviation around cells' latents,
    averaged over (up to ``n_cells``) cells of ``data``."""

    model = bundle.model
    rng = np.random.default_rng(seed)
    idx = np.arange(data.n_cells) if data.n_cells <= n_cells else np.sort(rng.choice(data.n_cells, n_cells, replace=False))
    dd = DeviceData(data, idx, model.input_mean.device, condition_ids(model, data))
    z = torch.cat([model.latent(b)["full"] for b in dd.batches(1024)])
    sd = z.std(0).clamp_min(1e-3)
    d = dd.dosage_rows(torch.arange(dd.n, device=dd.device))

    def log2_expr(zz: torch.Tensor) -> torch.Tensor:
        out = model.decode(zz, d).float()
        if model.likelihood.kind == "gaussian":
            return out / np.log(2)
        return torch.log_softmax(out, -1) / np.log(2)

    base = log2_expr(z)
    rows = []
    for k in range(model.n_latent):
        zk = z.clone()
        zk[:, k] += sd[k]
        rows.append((log2_expr(zk) - base).mean(0).cpu().numpy())
    return pd.DataFrame(np.vstack(rows), index=[f"unit {k}" for k in range(model.n_latent)], columns=bundle.genes)


def top_genes(loadings: pd.DataFrame, unit: int | str, n: int = 20) -> pd.DataFrame:
    """The ``n`` genes a unit drives most up and most down (gene, loading, direction)."""
    row = loadings.loc[unit] if isinstance(unit, str) else loadings.iloc[unit]
    up = row.sort_values(ascending=False).head(n)
    down = row.sort_values().head(n)
    return pd.concat([
        pd.DataFrame({"gene": up.index, "loading": up.values, "direction": "up"}),
        pd.DataFrame({"gene": down.index, "loading": down.values, "direction": "down"}),
    ], ignore_index=True)


# ---------------------------------------------------------------------------------------------
# enrichment of units and predicted effects
def unit_enrichment(
    loadings: pd.DataFrame,
    collection: GeneSetCollection,
    method: str = "rank",
    n_top: int = 50,
    units: Sequence[int] | None = None,
    min_size: int = 5,
    absolute: bool = True,
) -> pd.DataFrame:
    """Gene-set enrichment of each unit's loadings as one tidy table.

    ``rank``: rank-sum test of the whole loading vector — of |loading| by default (a program
    whose genes the unit drives strongly, in either direction: a unit's sign is arbitrary and
    a program can hold genes that go up and genes that go down), of the signed loadings with
    ``absolute=False`` (sets shifted up or down);
    ``hypergeometric``: over-representation among the unit's ``n_top`` genes by |loading|.
    Columns: unit, set, description, statistic, p, q (BH within each unit), overlap, ...
    """

    if method not in ("rank", "hypergeometric"):
        raise SamsError(f"Unknown enrichment method {method!r}: use 'rank' or 'hypergeometric'.")
    frames = []
    for k in units if units is not None else range(loadings.shape[0]):
        row = loadings.iloc[k]
        if method == "rank":
            t = rank_enrichment(row.abs() if absolute else row, collection, min_size=min_size)
        else:
            top = row.abs().sort_values(ascending=False).index[:n_top]
            t = hypergeometric_enrichment(list(top), list(row.index), collection, min_size=min_size)
        t.insert(0, "unit", int(k))
        frames.append(t)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def effect_enrichment(prediction: EffectPrediction, collection: GeneSetCollection, min_size: int = 5, absolute: bool = False) -> pd.DataFrame:
    """Rank-sum enrichment of a predicted effect over genes (which programs it moves): of the
    signed log2 fold changes (programs pushed up or down), or of their size with ``absolute``
    (programs moved in either direction, also when their genes go different ways)."""

    scores = pd.Series(prediction.mean, index=prediction.genes)
    return rank_enrichment(scores.abs() if absolute else scores, collection, min_size=min_size)


def program_collection(adata: Any) -> GeneSetCollection:
    """The simulator's true gene programs as a gene-set collection (simulated data only)."""

    truth = truth_from_adata(adata)
    if not truth.program_sets:
        raise SamsError("This simulation records no gene programs (sVAE-style screens have none).")
    return GeneSetCollection("simulated programs", dict(truth.program_sets), {k: f"genes driven by latent unit {v}" for k, v in truth.unit_of_program.items()})
