"""SAMS Explorer core: sparse-mechanism-shift models of single-cell perturbation screens.

The functions a user reaches for, one import away (``import sams_core as sc``)::

    data = sc.read_h5ad("screen.h5ad")                       # the data contract (DESIGN §4)
    bundle, history, metrics = sc.train(data, "sams_vae", sc.SplitSpec("heldout-combos", 0.25),
                                        sc.TrainConfig(epochs=100), "model.sams")
    bundle = sc.load_bundle("model.sams")
    sc.predict_effect(bundle, "KLF1+GATA1").table()          # per-gene effect with intervals
    sc.unit_enrichment(sc.unit_loadings(bundle, data), sc.load_gene_sets("go_bp"))
    sc.write_back(adata, bundle, data)                        # obsm['X_sams'] for scanpy
    adata = sc.simulate_sams_screen(n_perturbations=30, seed=0)  # a screen with its answer key

The package is laid out in wings, each importing only the wings below it (``tests/
test_architecture.py`` checks it): ``labels`` (the grammar of condition labels), ``models``
(families, registry, distributions), ``simulate``, ``plots``, ``io`` (bundles), ``data`` (the data
contract, screens, splits, device batches), ``evaluation``
(metrics, baselines, truth), ``training`` (the loop), ``interpret`` (effects, programs, gene sets,
UMAP, write-back), then ``pipeline``, ``demo`` and ``cli``. The names below load on first use, so
``import sams_core`` stays light (the dashboard's home page never loads PyTorch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sams_core.errors import SamsError

__version__ = "0.1.0"

# public name -> "module:attribute"
_PUBLIC: dict[str, str] = {
    "read_h5ad": "sams_core.data.screen:read_h5ad",
    "from_anndata": "sams_core.data.screen:from_anndata",
    "read_h5ad_backed": "sams_core.data.backed:read_h5ad_backed",
    "PerturbationData": "sams_core.data.screen:PerturbationData",
    "make_split": "sams_core.data.splits:make_split",
    "SplitSpec": "sams_core.pipeline:SplitSpec",
    "TrainConfig": "sams_core.training.trainer:TrainConfig",
    "train": "sams_core.pipeline:train_bundle",
    "train_bundle": "sams_core.pipeline:train_bundle",
    "fit": "sams_core.training.trainer:fit",
    "load_bundle": "sams_core.io.bundle:load_bundle",
    "ModelBundle": "sams_core.io.bundle:ModelBundle",
    "data_for_bundle": "sams_core.pipeline:data_for_bundle",
    "evaluate_model": "sams_core.evaluation.metrics:evaluate_model",
    "compare_on_heldout": "sams_core.evaluation.compare:compare_on_heldout",
    "predict_effect": "sams_core.interpret.effects:predict_effect",
    "rank_unmeasured_pairs": "sams_core.interpret.effects:rank_unmeasured_pairs",
    "unit_loadings": "sams_core.interpret.programs:unit_loadings",
    "top_genes": "sams_core.interpret.programs:top_genes",
    "unit_enrichment": "sams_core.interpret.programs:unit_enrichment",
    "load_gene_sets": "sams_core.interpret.genesets:load_shipped",
    "read_gmt": "sams_core.interpret.genesets:read_gmt",
    "umap_embedding": "sams_core.interpret.embed:umap_embedding",
    "write_back": "sams_core.interpret.writeback:write_back",
    "simulate_sams_screen": "sams_core.simulate:simulate_sams_screen",
    "simulate_svae_screen": "sams_core.simulate:simulate_svae_screen",
    "simulate_reference_screen": "sams_core.simulate:simulate_reference_screen",
    "truth_from_adata": "sams_core.simulate:truth_from_adata",
    "families": "sams_core.models.registry:families",
}

if TYPE_CHECKING:  # typed signatures for editors and type checkers; loaded lazily at run time
    from sams_core.data.backed import read_h5ad_backed
    from sams_core.data.screen import PerturbationData, from_anndata, read_h5ad
    from sams_core.data.splits import make_split
    from sams_core.evaluation.compare import compare_on_heldout
    from sams_core.evaluation.metrics import evaluate_model
    from sams_core.interpret.effects import predict_effect, rank_unmeasured_pairs
    from sams_core.interpret.embed import umap_embedding
    from sams_core.interpret.genesets import load_shipped as load_gene_sets
    from sams_core.interpret.genesets import read_gmt
    from sams_core.interpret.programs import top_genes, unit_enrichment, unit_loadings
    from sams_core.interpret.writeback import write_back
    from sams_core.io.bundle import ModelBundle, load_bundle
    from sams_core.models.registry import families
    from sams_core.pipeline import SplitSpec, data_for_bundle, train_bundle
    from sams_core.pipeline import train_bundle as train
    from sams_core.simulate import (
        simulate_reference_screen,
        simulate_sams_screen,
        simulate_svae_screen,
        truth_from_adata,
    )
    from sams_core.training.trainer import TrainConfig, fit


def __getattr__(name: str) -> Any:
    """Load a public name on first use (see the module docstring)."""
    target = _PUBLIC.get(name)
    if target is None:
        raise AttributeError(f"module 'sams_core' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = ["SamsError", "__version__", *_PUBLIC]
