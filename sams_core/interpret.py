"""Predicted effects of any combination, their interaction, and data-only baselines.

Effects are log2 fold changes against control on the ATE scale of DESIGN §3, from posterior
samples of the globals (mean and credible interval). Baselines need no model: no change, the
additive-in-data sum of observed single effects, and the observed effect where measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from sams_core.bundle import ModelBundle
from sams_core.data import PerturbationData, dosage_rows, split_label
from sams_core.errors import SamsError
from sams_core.evaluate import cosine_matrix, model_ate_draws

Combination = str | Mapping[str, float] | Sequence[str]


def _as_dict(combo: Combination) -> dict[str, float]:
    if isinstance(combo, str):
        return {m: 1.0 for m in split_label(combo)}
    if isinstance(combo, Mapping):
        return {str(k): float(v) for k, v in combo.items() if float(v) != 0.0}
    return {str(m): 1.0 for m in combo}


def combination_label(combo: Combination) -> str:
    """A readable label: "A+B", with dosages other than 1 as "A:0.5"."""
    d = _as_dict(combo)
    if not d:
        return "control"
    return "+".join(k if v == 1.0 else f"{k}:{v:g}" for k, v in d.items())


@dataclass
class EffectPrediction:
    """Predicted per-gene effect of one combination, its singles and their interaction."""

    label: str
    genes: list[str]
    mean: np.ndarray  # [G] posterior mean log2 fold change
    lower: np.ndarray  # [G] credible interval
    upper: np.ndarray
    latent_shift: np.ndarray  # [K] expected latent shift
    singles: dict[str, np.ndarray]  # member → its own predicted effect (at its dosage)
    interaction: np.ndarray | None  # [G] combination minus the sum of its singles (None for one member)
    level: float

    @property
    def interaction_score(self) -> float:
        """Size of the interaction relative to the combination's effect (0 = purely additive)."""
        if self.interaction is None:
            return 0.0
        denom = float(np.linalg.norm(self.mean))
        return float(np.linalg.norm(self.interaction) / denom) if denom > 0 else 0.0

    def table(self) -> pd.DataFrame:
        """One row per gene: effect, interval, interaction, and each single's effect."""
        t = pd.DataFrame({"gene": self.genes, "effect": self.mean, "lower": self.lower, "upper": self.upper})
        if self.interaction is not None:
            t["interaction"] = self.interaction
        for name, eff in self.singles.items():
            t[f"single_{name}"] = eff
        return t


def predict_effect(
    bundle: ModelBundle,
    combo: Combination,
    n_globals: int = 100,
    n_per_global: int = 10,
    level: float = 0.9,
    seed: int = 0,
    sample_counts: bool = False,
) -> EffectPrediction:
    """Predicted effect of ``combo`` (a label "A+B", a member list, or {name: dosage}).

    The combination and each of its members are predicted with the same draws of the globals,
    so the interaction (combination minus the sum of its singles) carries no Monte-Carlo
    difference between them. ``sample_counts`` draws counts from the likelihood before the
    ATE transform (slower; the default transforms the expected expression).
    """
    if not 0 < level < 1:
        raise SamsError(f"Credible level must be between 0 and 1, got {level}.")
    members = _as_dict(combo)
    if not members:
        raise SamsError("Pick at least one perturbation: the control has no effect to predict.")
    rows = [members] + ([{m: v} for m, v in members.items()] if len(members) > 1 else [])
    d = dosage_rows(rows, bundle.perturbations)
    draws = model_ate_draws(bundle.model, d, bundle.is_counts, n_globals, n_per_global, seed, sample_counts)
    q = (1 - level) / 2
    main = draws[:, 0]
    singles = {m: draws[:, i + 1].mean(0) for i, m in enumerate(members)} if len(members) > 1 else {next(iter(members)): main.mean(0)}
    interaction = None
    if len(members) > 1:
        interaction = (main - draws[:, 1:].sum(1)).mean(0)
    with torch.no_grad():
        dev = bundle.model.input_mean.device
        shift = bundle.model.latent_shift(torch.as_tensor(d[:1], device=dev))[0].cpu().numpy()
    return EffectPrediction(
        label=combination_label(members),
        genes=bundle.genes,
        mean=main.mean(0),
        lower=np.quantile(main, q, axis=0),
        upper=np.quantile(main, 1 - q, axis=0),
        latent_shift=shift,
        singles=singles,
        interaction=interaction,
        level=level,
    )


# ---------------------------------------------------------------------------------------------
# baselines from data alone
def observed_effects(data: PerturbationData, cells: np.ndarray | None = None) -> pd.DataFrame:
    """Observed effect (data ATE) of every measured condition; rows = condition labels."""
    from sams_core.evaluate import data_ate

    return data_ate(data, cells)


def additive_baseline(observed: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Additive-in-data prediction of combinations: the sum of the members' observed effects.

    (Observed A + observed B − control, on the log fold-change scale.) A combination with a
    member that was never measured alone gets a row of NaN.
    """
    out = []
    for lab in labels:
        members = split_label(lab)
        if all(m in observed.index for m in members) and members:
            out.append(observed.loc[members].sum(0).to_numpy())
        else:
            out.append(np.full(observed.shape[1], np.nan))
    return pd.DataFrame(np.vstack(out) if out else np.zeros((0, observed.shape[1])), index=list(labels), columns=observed.columns)


def mean_baseline(observed: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """No-change prediction: every condition looks like control (effect 0 for every gene)."""
    return pd.DataFrame(0.0, index=list(labels), columns=observed.columns)


def diversity_check(predicted: pd.DataFrame, threshold: float = 0.95) -> dict[str, float | bool]:
    """Flags a predictor whose effects are nearly the same for every perturbation (mode collapse).

    Returns the mean pairwise cosine similarity of the predicted effect vectors and
    ``collapsed`` = that similarity ≥ ``threshold``.
    """
    p = predicted.dropna().to_numpy(dtype=np.float64)
    if p.shape[0] < 2:
        return {"mean_pairwise_cosine": float("nan"), "collapsed": False}
    c = cosine_matrix(p, p)
    off = c[~np.eye(c.shape[0], dtype=bool)]
    m = float(off.mean())
    return {"mean_pairwise_cosine": m, "collapsed": bool(m >= threshold)}


# ---------------------------------------------------------------------------------------------
# which combination to measure next
def rank_unmeasured_pairs(
    bundle: ModelBundle,
    measured: Sequence[str],
    n_globals: int = 50,
    n_per_global: int = 4,
    seed: int = 0,
    chunk: int = 64,
) -> pd.DataFrame:
    """Unmeasured pairs of measured singles ranked by predicted interaction and uncertainty.

    ``measured`` lists the condition labels with cells. For every pair of measured singles that
    is not itself measured: the interaction score (norm of combination minus the sum of its
    singles, relative to the combination's norm), the mean width of the 90 % interval of the
    combination's effect (uncertainty), and their ranks (1 = strongest / most uncertain).
    """
    meas = set(map(str, measured))
    singles = [p for p in bundle.perturbations if p in meas]
    pairs = [(a, b) for i, a in enumerate(singles) for b in singles[i + 1 :]]
    pairs = [(a, b) for a, b in pairs if "+".join(sorted((a, b))) not in meas and f"{a}+{b}" not in meas and f"{b}+{a}" not in meas]
    cols = ["pair", "interaction_score", "uncertainty", "effect_norm", "rank_interaction", "rank_uncertainty"]
    if not pairs:
        return pd.DataFrame(columns=cols)
    single_rows = dosage_rows(singles, bundle.perturbations)
    sdraw = model_ate_draws(bundle.model, single_rows, bundle.is_counts, n_globals, n_per_global, seed)  # [S, n_singles, G]
    pos = {s: i for i, s in enumerate(singles)}
    out = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        d = dosage_rows([[a, b] for a, b in part], bundle.perturbations)
        draws = model_ate_draws(bundle.model, d, bundle.is_counts, n_globals, n_per_global, seed)
        for r, (a, b) in enumerate(part):
            eff = draws[:, r]
            inter = (eff - sdraw[:, pos[a]] - sdraw[:, pos[b]]).mean(0)
            mean = eff.mean(0)
            norm = float(np.linalg.norm(mean))
            width = float((np.quantile(eff, 0.95, axis=0) - np.quantile(eff, 0.05, axis=0)).mean())
            out.append({"pair": f"{a}+{b}", "interaction_score": float(np.linalg.norm(inter)) / norm if norm > 0 else 0.0, "uncertainty": width, "effect_norm": norm})
    t = pd.DataFrame(out)
    t["rank_interaction"] = t["interaction_score"].rank(ascending=False, method="min").astype(int)
    t["rank_uncertainty"] = t["uncertainty"].rank(ascending=False, method="min").astype(int)
    return t.sort_values(["rank_interaction", "rank_uncertainty"]).reset_index(drop=True)[cols]


# ---------------------------------------------------------------------------------------------
# perturbation similarity and heatmap orders
def perturbation_distances(bundle: ModelBundle, by: str = "mask") -> pd.DataFrame:
    """Distances between the model's mask rows: Jaccard-like on mask probabilities (``mask``) or
    Euclidean between expected latent shifts (``shift``)."""
    from scipy.spatial.distance import pdist, squareform

    names = bundle.mask_rows
    model = bundle.model
    with torch.no_grad():
        if by == "mask":
            p = model.mask_probs()
            if p is None:
                raise SamsError(f"{bundle.label} has no masks; compare perturbations by='shift' instead.")
            x = p.cpu().numpy()
            dist = squareform(pdist(x, lambda u, v: 1 - np.minimum(u, v).sum() / max(np.maximum(u, v).sum(), 1e-12)))
        elif by == "shift":
            if model.composes:
                x = model.latent_shift(torch.eye(len(bundle.perturbations), device=model.input_mean.device)).cpu().numpy()
            else:
                x = (model.mask_probs() * model.shift).cpu().numpy()
            dist = squareform(pdist(x))
        else:
            raise SamsError(f"Unknown distance {by!r}: use 'mask' or 'shift'.")
    return pd.DataFrame(dist, index=names, columns=names)


def cluster_order(matrix: np.ndarray, method: str = "average") -> np.ndarray:
    """Row order from hierarchical clustering of the rows of ``matrix`` (scipy leaves order)."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    m = np.asarray(matrix, dtype=np.float64)
    if m.shape[0] < 3:
        return np.arange(m.shape[0])
    return leaves_list(linkage(m, method=method, optimal_ordering=True))


def heatmap_orders(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column orders for a heatmap (e.g. perturbations × units mask probabilities)."""
    v = np.asarray(values, dtype=np.float64)
    return cluster_order(v), cluster_order(v.T)


# ---------------------------------------------------------------------------------------------
# gene programs of latent units
@torch.no_grad()
def unit_loadings(bundle: ModelBundle, data: PerturbationData, n_cells: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Gene loadings of each latent unit [K × G]: the change of the decoder's expected log2
    expression when the unit moves up by one standard deviation around cells' latents,
    averaged over (up to ``n_cells``) cells of ``data``."""
    from sams_core.train import DeviceData, condition_ids

    model = bundle.model
    rng = np.random.default_rng(seed)
    idx = np.arange(data.n_cells) if data.n_cells <= n_cells else np.sort(rng.choice(data.n_cells, n_cells, replace=False))
    dd = DeviceData(data, idx, model.input_mean.device, condition_ids(model, data))
    z = torch.cat([model.latent(b)["full"] for b in dd.batches(1024)])
    sd = z.std(0).clamp_min(1e-3)
    d = dd.d

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
# results back into AnnData
@torch.no_grad()
def write_back(adata, bundle: ModelBundle, data: PerturbationData, loadings: pd.DataFrame | None = None, key: str = "X_sams"):
    """Write the model's results into ``adata`` (cells in the same order as ``data``).

    ``obsm[key]`` = full latent means, ``obsm[key + "_basal"]`` = basal latents; ``uns["sams"]``
    holds the mask probabilities, embedding means, the model's perturbation names and family,
    and (if given) the unit loadings. Returns ``adata``.
    """
    from sams_core.train import DeviceData, condition_ids

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


# ---------------------------------------------------------------------------------------------
# enrichment of units and predicted effects
def unit_enrichment(
    loadings: pd.DataFrame,
    collection,
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
    from sams_core.genesets import hypergeometric_enrichment, rank_enrichment

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


def effect_enrichment(prediction: EffectPrediction, collection, min_size: int = 5, absolute: bool = False) -> pd.DataFrame:
    """Rank-sum enrichment of a predicted effect over genes (which programs it moves): of the
    signed log2 fold changes (programs pushed up or down), or of their size with ``absolute``
    (programs moved in either direction, also when their genes go different ways)."""
    from sams_core.genesets import rank_enrichment

    scores = pd.Series(prediction.mean, index=prediction.genes)
    return rank_enrichment(scores.abs() if absolute else scores, collection, min_size=min_size)


def program_collection(adata):
    """The simulator's true gene programs as a gene-set collection (simulated data only)."""
    from sams_core.genesets import GeneSetCollection
    from sams_core.simulate import truth_from_adata

    truth = truth_from_adata(adata)
    if not truth.program_sets:
        raise SamsError("This simulation records no gene programs (sVAE-style screens have none).")
    return GeneSetCollection("simulated programs", dict(truth.program_sets), {k: f"genes driven by latent unit {v}" for k, v in truth.unit_of_program.items()})
