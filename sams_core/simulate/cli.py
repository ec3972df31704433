"""``python -m sams_core simulate ...``: write a simulated screen to an .h5ad file.

The options are one table: each names the simulator argument it sets and the kinds it applies to.
An option left out takes the simulator's own default, so the defaults live in one place (the
simulator's signature); an option given to a kind it does not apply to is an error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from sams_core.errors import SamsError
from sams_core.simulate.reference import simulate_reference_screen
from sams_core.simulate.sams import simulate_sams_screen
from sams_core.simulate.svae import simulate_svae_screen
from sams_core.simulate.truth import truth_from_adata

#: Simulator of each ``--kind``.
SIMULATORS: dict[str, Callable[..., Any]] = {
    "sams": simulate_sams_screen,
    "reference": simulate_reference_screen,
    "svae": simulate_svae_screen,
}
_COUNTS = ("sams", "svae")
_PAIRS = ("sams", "reference")
_ALL = tuple(SIMULATORS)


@dataclass(frozen=True)
class _Option:
    """One command-line option: ``--flag`` sets the simulator argument ``param`` for ``kinds``."""

    flag: str
    param: str
    type: type
    help: str
    kinds: tuple[str, ...] = _ALL


_OPTIONS: tuple[_Option, ...] = (
    _Option("--perturbations", "n_perturbations", int, "number of single perturbations T (default 30 sams, 100 reference, 20 svae)"),
    _Option("--latent", "n_latent", int, "number of latent units K (default 10; 15 reference)"),
    _Option("--genes", "n_genes", int, "number of genes G (default 200; 100 reference)"),
    _Option("--combinations", "n_combinations", int, "number of two-perturbation combinations (default 40 sams, 30 reference)", _PAIRS),
    _Option("--cells", "cells_per_perturbation", int, "cells per perturbation (default 100 sams, 700 reference, 200 svae)"),
    _Option("--combination-cells", "cells_per_combination", int, "cells per combination (default: --cells)", _PAIRS),
    _Option("--controls", "n_control", int, "control cells (default: 2 × --cells for sams, --cells otherwise)"),
    _Option("--min-targets", "min_targets", int, "fewest latent units a perturbation acts on (default 1)", _COUNTS),
    _Option("--max-targets", "max_targets", int, "most latent units a perturbation acts on (default 3)", _COUNTS),
    _Option("--mask-probability", "mask_probability", float, "probability that a perturbation acts on a unit, reference only (default 2/K)", ("reference",)),
    _Option("--effect-mean", "effect_mean", float, "mean size of an effect on a targeted unit, sign random (default 5)"),
    _Option("--effect-sd", "effect_sd", float, "standard deviation of effect sizes (default 0.5)"),
    _Option("--noise-fraction", "noise_fraction", float, "share of each gene's variance that is Gaussian noise, reference only (default 0.2)", ("reference",)),
    _Option("--library", "library_mean", float, "mean library size in UMIs per cell (default 2500 × √(genes/200))", _COUNTS),
    _Option("--library-sd", "library_sd", float, "standard deviation of log library size (default 0.35)", _COUNTS),
    _Option("--dispersion", "dispersion", float, "median negative-binomial inverse dispersion θ of the genes; lower is noisier (default 5)", _COUNTS),
    _Option("--dispersion-sd", "dispersion_sd", float, "spread of log θ across genes (default 0.5)", _COUNTS),
    _Option("--background-fraction", "background_fraction", float, "share of genes in no gene program, sams only (default 0.1)", ("sams",)),
    _Option("--heldout-fraction", "heldout_fraction", float, "share of combinations suggested as held out (default 0.25)", _PAIRS),
    _Option("--batches", "n_batches", int, "levels of the no-effect covariate obs['batch'] (default 2)"),
    _Option("--seed", "seed", int, "random seed; the same seed gives the same file (default 0)"),
)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m sams_core simulate",
        description=(
            "Simulate a single-cell perturbation screen with a known answer key (masks, effects, "
            "true latents, gene programs) and write it as .h5ad. Labels are in obs['perturbation'], the "
            "truth in uns['sams_truth']. sams and svae screens hold counts (X and layers['counts']); "
            "reference screens hold real values in X (Gaussian, as published)."
        ),
    )
    ap.add_argument("--kind", choices=list(SIMULATORS), default="sams",
                    help="sams: sparse masks, additive two-perturbation combinations and one gene program per "
                         "latent unit (SAMS-VAE paper); reference: built like the published SAMS-VAE simulator "
                         "(dense 4 × 50 LeakyReLU decoder, Bernoulli(2/15) masks, Gaussian noise) plus controls "
                         "and pairs; svae: one perturbation per cell, no combinations, dense injective decoder "
                         "(sVAE+ paper). Default sams.")
    for o in _OPTIONS:
        only = "" if o.kinds == _ALL else f" [{', '.join(o.kinds)}]"
        ap.add_argument(o.flag, dest=o.param, type=o.type, default=None, help=o.help + only)
    ap.add_argument("--out", required=True, metavar="FILE.h5ad", help="output .h5ad file (its folder must exist)")
    return ap


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The simulator arguments the user set, checked against ``--kind``."""
    given = {o.param: getattr(args, o.param) for o in _OPTIONS if getattr(args, o.param) is not None}
    wrong = [o.flag for o in _OPTIONS if o.param in given and args.kind not in o.kinds]
    if wrong:
        raise SamsError(f"{', '.join(wrong)} do not apply to --kind {args.kind}. Leave them out or choose another kind.")
    if "min_targets" in given or "max_targets" in given:
        given["targets_per_perturbation"] = (given.pop("min_targets", 1), given.pop("max_targets", 3))
    return given


def simulate_main(argv: list[str] | None = None) -> int:
    """``python -m sams_core simulate ...``: write a simulated screen to an .h5ad file.

    Prints a one-line summary on stdout and returns 0; a bad option prints ``error: ...`` on
    stderr and returns 2.
    """
    args = _parser().parse_args(argv)
    try:
        out = Path(args.out)
        if not out.parent.exists():
            raise SamsError(f"The folder {str(out.parent)!r} does not exist. Create it or choose another --out.")
        t0 = time.perf_counter()
        a = SIMULATORS[args.kind](**_arguments(args))
        a.write_h5ad(out)
    except SamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tr = truth_from_adata(a)
    if sp.issparse(a.X):
        values = f"{1.0 - a.X.nnz / max(1, a.n_obs * a.n_vars):.0%} zeros, median library {np.median(a.obs['library_size']):.0f}"
    else:
        values = "Gaussian values"
    print(
        f"wrote {out}: {args.kind} screen, {a.n_obs} cells × {a.n_vars} genes, {tr.n_perturbations} perturbations, "
        f"{len(tr.combinations)} combinations, K={tr.n_latent}, {values}, seed {tr.seed} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return 0
