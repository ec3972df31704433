"""Reading a simulated screen's answer key back, and the simulator's true model: the true shift of
any condition, its expected expression and fresh cells drawn from it (an oracle predictor)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sams_core.errors import SamsError
from sams_core.labels import parse_label
from sams_core.simulate.common import (
    SimulationTruth,
    decode,
    softmax_rows,
)


def _scalar(v: Any) -> Any:
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode()
    return v


def _strings(v: Any) -> np.ndarray:
    arr = np.asarray(v if v is not None else [], dtype=object).ravel()
    return np.array([str(_scalar(x)) for x in arr], dtype=str) if arr.size else np.array([], dtype="<U1")


def _optional_array(t: Any, key: str) -> np.ndarray | None:
    v = t.get(key)
    return None if v is None else np.asarray(v, dtype=np.float32)


def truth_from_adata(adata: Any) -> SimulationTruth:
    """The answer key a simulator stored in ``adata.uns["sams_truth"]`` (also after an .h5ad round trip)."""
    uns = getattr(adata, "uns", None)
    if uns is None or "sams_truth" not in uns:
        raise SamsError("This data has no simulation truth (uns['sams_truth']). Only simulated screens carry one.")
    t = uns["sams_truth"]
    missing = [k for k in ("kind", "perturbations", "masks", "embeddings", "combinations", "seed") if k not in t]
    if missing:
        raise SamsError(f"uns['sams_truth'] lacks {', '.join(missing)}: it was not written by sams_core.simulate.")
    masks = np.asarray(t["masks"]).astype(np.int8)
    emb = np.asarray(t["embeddings"], dtype=np.float32)
    perts = _strings(t["perturbations"])
    if masks.ndim != 2 or emb.shape != masks.shape or perts.size != masks.shape[0]:
        raise SamsError(
            f"uns['sams_truth'] is inconsistent: masks {masks.shape}, embeddings {emb.shape}, "
            f"{perts.size} perturbation names. Simulate the screen again."
        )
    programs = {str(k): [str(g) for g in _strings(v)] for k, v in dict(t.get("programs", {}) or {}).items()}
    decoder = {str(k): (_scalar(v) if np.ndim(v) == 0 else np.asarray(v)) for k, v in dict(t.get("decoder", {}) or {}).items()}
    return SimulationTruth(
        kind=str(_scalar(t["kind"])),
        perturbations=perts,
        masks=masks,
        embeddings=emb,
        combinations=_strings(t["combinations"]),
        heldout_combinations=_strings(t.get("heldout_combinations", [])),
        program_sets=programs,
        unit_of_program={k: int(k.rsplit("U", 1)[1]) for k in programs},
        seed=int(_scalar(t["seed"])),
        params={str(k): _scalar(v) for k, v in dict(t.get("params", {}) or {}).items()},
        decoder=decoder,
        inverse_dispersion=_optional_array(t, "inverse_dispersion"),
        noise_sd=_optional_array(t, "noise_sd"),
    )


def combination_shift(truth: SimulationTruth, label: str) -> np.ndarray:
    """The true latent shift (K,) of a condition label.

    ``"control"`` (or ctrl / non-targeting / NT / DMSO) → 0; ``"A"`` → e_A; ``"A+B"`` → e_A + e_B
    in any member order; ``"A:0.5+B"`` scales A's shift by the dosage 0.5.
    """
    idx = {p: i for i, p in enumerate(truth.perturbations.tolist())}
    out = np.zeros(truth.n_latent, dtype=np.float32)
    for name, d in parse_label(label, idx).items():
        if name not in idx:
            raise SamsError(f"{name!r} (in {label!r}) is not a simulated perturbation. Known: {', '.join(list(idx)[:8])}, ...")
        out += np.float32(d) * truth.embeddings[idx[name]]
    return out


def truth_masks_for(truth: SimulationTruth, names: Sequence[str]) -> np.ndarray:
    """True mask rows (int8) in the order of ``names`` (e.g. a model's perturbation list)."""
    idx = {p: i for i, p in enumerate(truth.perturbations.tolist())}
    missing = [n for n in names if n not in idx]
    if missing:
        raise SamsError(f"Perturbations not in the simulation: {', '.join(map(str, missing[:5]))}. Pass names of simulated singles.")
    return truth.masks[[idx[n] for n in names]]


def _latents(truth: SimulationTruth, z: np.ndarray) -> np.ndarray:
    if not truth.decoder:
        raise SamsError("This simulation truth carries no decoder parameters. Simulate the screen again with sams_core.")
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    if z.shape[1] != truth.n_latent:
        raise SamsError(f"z has {z.shape[1]} columns but the simulation has {truth.n_latent} latent units. Pass n × {truth.n_latent} latents.")
    return z


def true_proportions(truth: SimulationTruth, z: np.ndarray) -> np.ndarray:
    """The decoder's expected gene proportions (n × G, rows sum to 1) for latent states ``z`` (n × K).

    Only for the count simulators (sams, svae); genes are in the simulated ``var_names`` order;
    multiply by a library size for mean counts.
    """
    z = _latents(truth, z)
    if not truth.is_counts:
        raise SamsError(
            f"The {truth.kind} simulator is Gaussian: its decoder gives mean values, not proportions of counts. "
            "Use true_mean(truth, z)."
        )
    return softmax_rows(decode(truth.decoder, z))


def true_mean(truth: SimulationTruth, z: np.ndarray, library: np.ndarray | float | None = None) -> np.ndarray:
    """Expected expression (n × G) of latent states ``z`` (n × K) under the simulator's true model.

    Count simulators: library × proportions (``library`` per cell or one number; None gives the
    proportions themselves). The Gaussian reference simulator: the decoder's mean (``library``
    is ignored).
    """
    z = _latents(truth, z)
    out = decode(truth.decoder, z)
    if not truth.is_counts:
        return out
    p = softmax_rows(out)
    if library is None:
        return p
    lib = np.asarray(library, dtype=np.float64)
    return p * (lib[:, None] if lib.ndim else lib)


def sample_expression(
    truth: SimulationTruth,
    z: np.ndarray,
    library: np.ndarray | float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """One draw of expression (n × G, float64) for latent states ``z`` from the true noise model.

    Count simulators: NB(library × proportions, θ_g) counts, which need ``library`` (per cell or
    one number). The reference simulator: mean + N(0, noise_sd_g²).
    """
    rng = np.random.default_rng(seed)
    if not truth.is_counts:
        mu = true_mean(truth, z)
        return mu + np.asarray(truth.noise_sd, np.float64) * rng.normal(size=mu.shape)
    if library is None:
        raise SamsError(f"The {truth.kind} simulator draws counts: pass library sizes (e.g. those of observed control cells).")
    if truth.inverse_dispersion is None:
        raise SamsError("This simulation truth carries no inverse dispersions. Simulate the screen again with sams_core.")
    mu = true_mean(truth, z, library)
    theta = np.asarray(truth.inverse_dispersion, np.float64)[None, :]
    return rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float64)


def sample_condition(
    truth: SimulationTruth,
    label: str,
    n_cells: int,
    library: np.ndarray | float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fresh cells of a condition drawn from the simulator's true model: (expression n × G, z n × K).

    z = z_b + the condition's true shift with z_b ~ N(0, I_K), then :func:`sample_expression`.
    This is the oracle predictor: a perfect model's cells look like these.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(int(n_cells), truth.n_latent)) + combination_shift(truth, label)[None, :]
    return sample_expression(truth, z, library, seed=int(rng.integers(2**31))), z
