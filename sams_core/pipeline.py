"""The end-to-end workflows the command line and the app share: train a bundle, reopen its data.

:func:`train_bundle` goes from a screen to a saved, evaluated model bundle; :func:`data_for_bundle`
reads a screen the way a bundle was trained on it (same settings, same gene order) and
:func:`split_for_bundle` recreates the bundle's split on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sams_core.data.contract import check_same_kind
from sams_core.data.screen import PerturbationData, from_anndata, read_h5ad
from sams_core.data.splits import TEST, TRAIN, heldout_pairs, make_split
from sams_core.errors import SamsError
from sams_core.evaluation.metrics import FULL_EVALUATION, QUICK_EVALUATION, Evaluation, evaluate_model
from sams_core.io.bundle import ModelBundle, check_output, load_bundle, make_manifest, save_bundle
from sams_core.training.trainer import ProgressFn, TrainConfig, TrainResult, train


@dataclass
class SplitSpec:
    """How a split was made, so that it can be made again on the same data.

    ``level``: for ``heldout-covariate``, hold perturbations out at this level of the primary
    covariate only (e.g. one cell line); None draws (condition, level) pairs at any level.
    ``heldout``: the test set named exactly (conditions, or (condition, level) pairs for
    ``heldout-covariate``), e.g. another bundle's recorded test set so that a new run is scored on
    the same held-out cells; None draws it from ``fraction`` and ``seed``.
    """

    kind: str = "heldout-combos"
    fraction: float = 0.25
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    level: str | None = None
    heldout: list[Any] | None = None

    def make(self, data: PerturbationData, heldout: list[Any] | None = None) -> np.ndarray:
        """Each cell's set; ``heldout`` (else the spec's own) names the test set."""
        chosen = heldout if heldout is not None else self.heldout
        split = make_split(
            data, self.kind, self.fraction, self.val_fraction, self.test_fraction, self.seed, chosen, self.level
        )
        if heldout is None and self.heldout is not None:
            # the seeded split, when it holds out the very same cells, gives the same validation cells too
            try:
                seeded = make_split(
                    data, self.kind, self.fraction, self.val_fraction, self.test_fraction, self.seed, None, self.level
                )
            except SamsError:
                return split
            if np.array_equal(seeded == TEST, split == TEST):
                return seeded
        return split

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if d.get("heldout") is None:
            d.pop("heldout", None)
        return d


def split_record(spec: SplitSpec, data: PerturbationData, split: np.ndarray) -> dict[str, Any]:
    """What a bundle stores about its split: the spec, the test conditions, the data checksum, and
    on a screen with covariates the exact (condition, level) pairs of the test set."""
    test_labels = sorted({str(lab) for lab in data.labels[split == "test"]})
    extra: dict[str, Any] = {}
    if data.covariates:
        extra = {"covariate": data.primary_covariate, "test_pairs": [list(p) for p in heldout_pairs(data, split)]}
    return {
        **spec.as_dict(),
        **extra,
        "test_conditions": test_labels,
        "n_train": int((split == "train").sum()),
        "n_val": int((split == "val").sum()),
        "n_test": int((split == "test").sum()),
        "data_checksum": data.checksum(),
    }


def train_bundle(
    data: PerturbationData,
    family: str,
    spec: SplitSpec,
    config: TrainConfig,
    out: str | Path | None = None,
    progress: ProgressFn | None = None,
    evaluate: bool = True,
    n_ate_samples: int | None = None,
    full_evaluation: bool = False,
    **hparams: Any,
) -> tuple[ModelBundle, TrainResult, Evaluation | None]:
    """Train a ``family`` model on ``data`` split by ``spec``, evaluate it, save it to ``out``.

    On a screen with covariates (``data.covariates``, e.g. read with ``covariate_keys=["cell_type"]``)
    the model conditions on them; its levels are in the manifest (``data.covariate_levels``) and
    its metrics per level of the primary covariate in ``manifest["metrics_per_level"]``
    (split → level → scores). Pass ``data.without_covariates()`` for a model without covariates.
    """
    if out is not None:
        check_output(out)  # an unusable destination is said before training, not after
    split = spec.make(data)
    model, result = train(data, family, split, config, progress, **hparams)
    # the quick evaluation by default (seconds to a minute at Norman scale), the full protocol on request
    settings = {**(FULL_EVALUATION if full_evaluation else QUICK_EVALUATION), **({} if n_ate_samples is None else {"n_ate_samples": n_ate_samples})}
    evaluation = evaluate_model(model, data, split, seed=config.seed, **settings) if evaluate else None
    metrics: dict[str, Any] = {}
    if evaluation is not None and not evaluation.metrics.empty:
        metrics = {
            split_name: {k: (None if pd.isna(v) else float(v)) for k, v in row.items()}
            for split_name, row in evaluation.metrics.iterrows()
        }
    conditions = model.vocabulary(data.labels[split == TRAIN])
    manifest = make_manifest(
        model,
        genes=data.genes,
        perturbations=data.perturbations,
        data_settings={**data.settings, "is_counts": data.is_counts, "n_cells": data.n_cells, "checksum": data.checksum()},
        split=split_record(spec, data, split),
        training={
            "config": config.as_dict(),
            "history": result.history_table(),
            "best_epoch": result.best_epoch,
            "best_phase": result.best_phase,
            "notes": list(result.notes),
            "compiled": result.compiled,
            "cuda_graphs": result.cuda_graphs,
            "seconds": result.seconds,
            "stopped_early": result.stopped_early,
        },
        metrics=metrics,
        conditions=conditions,
    )
    if evaluation is not None and not evaluation.per_level.empty:
        per_level: dict[str, dict[str, Any]] = {}
        for (split_name, level), row in evaluation.per_level.iterrows():
            per_level.setdefault(str(split_name), {})[str(level)] = {
                k: (None if pd.isna(v) else float(v)) for k, v in row.items()
            }
        manifest["metrics_per_level"] = per_level
        if evaluation.notes:
            manifest["metrics_notes"] = list(evaluation.notes)
    if out is not None:
        path = save_bundle(out, model, manifest)
        bundle = load_bundle(path, device=str(model.input_mean.device))
    else:
        bundle = ModelBundle(model=model, manifest=manifest)
    return bundle, result, evaluation


def data_for_bundle(bundle: ModelBundle, source: str | Path | Any) -> PerturbationData:
    """Read a screen (path or AnnData) with the bundle's data settings, genes in the bundle's order.

    Covariates are the bundle's, coded with its levels (a bundle without recorded covariates reads
    none): a cell at a level the model never saw is refused. Raises :class:`SamsError` when genes
    or perturbations of the bundle are missing from it.
    """

    s = bundle.manifest.get("data", {})
    levels = s.get("covariate_levels") or {}
    kwargs = {
        "perturbation_key": s.get("perturbation_key"),
        "separators": s.get("separators", ["+"]),
        "covariate_keys": list(s.get("covariate_keys") or []),
        "covariate_levels": {str(k): [str(x) for x in v] for k, v in levels.items()},
    }
    data = read_h5ad(source, **kwargs) if isinstance(source, (str, Path)) else from_anndata(source, **kwargs)
    return align_to_bundle(data, bundle)


def align_to_bundle(data: PerturbationData, bundle: ModelBundle) -> PerturbationData:
    """The screen restricted to the bundle's genes and re-indexed to its perturbation order
    (count data take library sizes over the bundle's genes, as in training)."""
    genes = bundle.genes
    pos = {g: i for i, g in enumerate(data.genes)}
    missing = [g for g in genes if g not in pos]
    if missing:
        raise SamsError(
            f"{len(missing)} of the model's {len(genes)} genes are not in this data (e.g. {', '.join(missing[:3])}). "
            "Load the data the model was trained on."
        )
    perts = bundle.perturbations
    unknown = [p for p in data.perturbations if p not in perts]
    if unknown:
        raise SamsError(
            f"The data has perturbations the model never saw: {', '.join(unknown[:5])}. "
            "Load the data the model was trained on, or train a model on this data."
        )
    check_same_kind(bundle.is_counts, data.is_counts, str(data.settings.get("counts_source") or "X"))
    return data.subset(genes=genes).with_perturbations(perts)


def split_for_bundle(bundle: ModelBundle, data: PerturbationData) -> np.ndarray:
    """The bundle's train/val/test split recreated on ``data`` (the same screen)."""
    rec = bundle.split_spec
    if not rec:
        raise SamsError("The bundle records no split. Retrain it with this version of sams_core.")
    spec = SplitSpec(**{k: rec[k] for k in ("kind", "fraction", "val_fraction", "test_fraction", "seed", "level") if k in rec})
    split = spec.make(data)
    pairs = rec.get("test_pairs")
    if spec.kind == "heldout-covariate" and pairs is not None:
        if sorted(map(list, heldout_pairs(data, split))) != sorted(map(list, pairs)):
            lv = set(zip(map(str, data.labels), map(str, data.level_of_cells())))
            present = [tuple(p) for p in pairs if tuple(p) in lv]
            if present:
                split = spec.make(data, present)
        return split
    recorded = rec.get("test_conditions")
    if recorded is not None and spec.kind in ("heldout-combos", "heldout-perturbations"):
        made = sorted({str(lab) for lab in data.labels[split == "test"]})
        if made != sorted(recorded):
            # not the very same screen: hold out the recorded conditions that it has
            present = set(map(str, data.labels))
            heldout = [c for c in recorded if c in present]
            if heldout:
                split = spec.make(data, heldout)
    return split


def load_data_and_bundle(bundle_path: str | Path, data_path: str | Path) -> tuple[ModelBundle, PerturbationData, np.ndarray]:
    """A bundle, its screen read as it was trained, and its split."""
    bundle = load_bundle(bundle_path)
    data = data_for_bundle(bundle, data_path)
    return bundle, data, split_for_bundle(bundle, data)
