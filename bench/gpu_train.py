"""Seconds per epoch at Norman scale in eager, compiled and CUDA-graph modes, float32 and bf16,
against the floor set by the device's matrix-multiply rate.

DESIGN §6 / issue 17 configuration: a synthetic screen generated on the device (111,000 cells ×
5,000 genes of negative-binomial counts, 105 single perturbations and 130 two-perturbation
combinations, ~10 % controls), K = 200, one 400-wide hidden layer, batch 512, 5 particles;
SAMS-VAE with the correlated guide (4 × 400 embedding network), CPA-VAE with the same guide and
the conditional VAE. Training runs through ``sams_core.training.trainer.fit`` exactly as users run
it (counts on the device, mini-batches gathered by index, no validation); 2 % of the cells are
held out and scored after training.

    python bench/gpu_train.py                          # on the GPU (H100/H200), full size, every mode
    python bench/gpu_train.py --small                  # CPU-sized: 5,000 cells × 500 genes, K = 50
    python bench/gpu_train.py --modes graphs --precisions float32 --models sams_vae
    bash bench/gpu_check.sh                            # device tests, then this, in < 8 min

Modes: ``eager``; ``compiled`` = ``TrainConfig(compile="default")``, the whole step (forward,
backward, Adam) one ``torch.compile(fullgraph=True)`` graph; ``graphs`` =
``TrainConfig(compile="reduce-overhead")``, the same graph captured in CUDA graphs (on a CPU it
is compiled without them, and the row says so). Compiled modes leave out the last partial batch
(static shapes). ``--compile-backend eager`` traces with Dynamo only (no code generation): a
quick check on a CPU that every step compiles as one graph, whose timings are not those of
compiled code.

Columns: seconds per epoch (median of ``--epochs`` timed epochs after one warm-up epoch, whose
time is shown separately: it includes compilation and CUDA-graph capture), cells per second, peak
memory (GPU: ``torch.cuda.max_memory_allocated``, data included; CPU: the process's peak resident
set), the training cells' bytes on the device (``--data-dtype float16`` halves them when the
counts are exact in float16), the floor and how far the measured epoch is from it, and the
held-out negative ELBO after training (float32 scoring, fixed noise).

bf16 check: for each model and mode, bf16's held-out -ELBO against float32's over the same steps.
"Within noise" means the difference is at most 3 × the noise, the larger of (a) the difference
between two float32 eager runs that differ only in their seed and (b) the standard error of the
held-out mean (spread of the batch means).

FLOP count (matrix products only). A dense layer n_in → n_out on R rows costs 2·R·n_in·n_out
FLOPs forward; backward costs the same again for the weight gradient and once more for the
input gradient, which is skipped when the input is data (expression, dosages, a constant
mask). Each layer therefore counts 3× its forward cost, or 2× when its input needs no gradient
(≈ the usual "training ≈ 3× forward"). Rows per layer (B = batch, P = particles, T = singles):

- SAMS-VAE / CPA-VAE: encoder G → H → 2K on B rows (x is read once per cell and shared by the
  particles); the shift's entry into the encoder K → 2K, and the decoder K → H → G, on P·B rows;
  the combination shift d·(m ⊙ e) (B × T by T × K per particle); correlated guide: the embedding
  network K → H_e → … → 2K on P·T rows (SAMS: one mask draw per particle) or T rows (CPA: no
  masks, computed once); the global term's P × T by T × B product.
- conditional VAE: encoder [x, d] → H → 2K on B rows; decoder's z → H on P·B rows, d → H on B
  rows, H → G on P·B rows.

This count equals what ``torch.utils.flop_counter.FlopCounterMode`` counts for one step (the
script checks it for every model and warns if the formula falls out of date).

Elementwise work (likelihood, activations, sampling, Adam) is not counted: the floor is
``steps × FLOPs / rate``, with the rate of a large matrix product measured on the same device at
the same precision (``--matmul-size``); the rate at the decoder's own shape (P·B × H by H × G)
is printed too. At batch 512 the step is launch-bound on a GPU, so the gap to the floor is
mostly kernel launches and Python; see DESIGN §6.

``--budget-s`` stops starting new runs after that many seconds (their rows say "skipped"), so a
prepared GPU run always ends with its table; with ``--out DIR`` (default: ``$OUT`` when set) the
table is also written there as Markdown (``gpu_train.md``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sams_core.data.batches import DeviceData, condition_ids
from sams_core.data.screen import PerturbationData
from sams_core.models.base import PerturbationModel
from sams_core.models.registry import FAMILY_LABELS
from sams_core.training.build import build_for_data
from sams_core.training.trainer import TrainConfig, TrainResult, fit

FULL = {"cells": 111_000, "genes": 5_000, "latent": 200, "perturbations": 105, "combinations": 130, "hidden": 400, "epochs": 3}
SMALL = {"cells": 5_000, "genes": 500, "latent": 50, "perturbations": 105, "combinations": 130, "hidden": 400, "epochs": 3}
MODELS = ("sams_vae", "cpa_vae", "conditional_vae")
MODES = {"eager": None, "compiled": "default", "graphs": "reduce-overhead"}
PRECISIONS = ("float32", "bf16-mixed")
HELDOUT = "test"


# ---- data, generated on the device -------------------------------------------------------------
@torch.no_grad()
def norman_screen(
    n_cells: int, n_genes: int, n_perts: int, n_combos: int, device: torch.device, seed: int = 0,
    n_latent_true: int = 20, control_frac: float = 0.1, dispersion: float = 5.0, library_median: float = 5000.0,
) -> PerturbationData:
    """A Norman-like screen of NB counts made on ``device``; ``X`` is a dense tensor there.

    Singles act sparsely (1-3 of ``n_latent_true`` units, effects ±N(2.5, 0.5²)); a pair's shift
    is the sum of its members'; genes are a softmax over baseline + tanh(z) · W; counts are
    Gamma-Poisson with inverse dispersion ``dispersion`` and log-normal library sizes.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    torch.manual_seed(seed)  # torch's gamma sampler takes no generator
    T, K, G = n_perts, n_latent_true, n_genes
    # pairs: distinct, drawn from all T(T-1)/2
    iu = torch.triu_indices(T, T, 1, device=device)
    pick = torch.randperm(iu.shape[1], generator=gen, device=device)[:n_combos]
    pairs = iu[:, pick].t()  # [C, 2]
    C = int(pairs.shape[0])
    cond_d = torch.zeros(1 + T + C, T, device=device)  # row 0: control
    cond_d[torch.arange(1, T + 1, device=device), torch.arange(T, device=device)] = 1.0
    cond_d[torch.arange(T + 1, T + 1 + C, device=device).repeat_interleave(2), pairs.reshape(-1)] = 1.0
    # effects
    n_targets = torch.randint(1, 4, (T,), generator=gen, device=device)
    order = torch.rand(T, K, generator=gen, device=device).argsort(1)
    mask = (order < n_targets[:, None]).float()
    sign = torch.where(torch.rand(T, K, generator=gen, device=device) < 0.5, -1.0, 1.0)
    effect = mask * sign * (2.5 + 0.5 * torch.randn(T, K, generator=gen, device=device))
    # cells → conditions
    is_ctrl = torch.rand(n_cells, generator=gen, device=device) < control_frac
    cond = torch.randint(1, 1 + T + C, (n_cells,), generator=gen, device=device)
    cond[is_ctrl] = 0
    d = cond_d[cond]  # [N, T]
    # genes
    base = 1.5 * torch.randn(G, generator=gen, device=device)
    W = torch.randn(K, G, generator=gen, device=device) * (2.0 / math.sqrt(K))
    theta = torch.full((G,), dispersion, device=device)
    X = torch.empty(n_cells, G, device=device)
    lib = torch.exp(math.log(library_median) + 0.3 * torch.randn(n_cells, generator=gen, device=device))
    step = max(1, (1 << 26) // G)
    for i in range(0, n_cells, step):
        j = min(n_cells, i + step)
        z = torch.randn(j - i, K, generator=gen, device=device) + d[i:j] @ effect
        mu = lib[i:j, None] * torch.softmax(base + torch.tanh(z) @ W, dim=-1)
        rate = torch._standard_gamma(theta.expand(j - i, G).contiguous()) * (mu / theta)
        X[i:j] = torch.poisson(rate, generator=gen)
    library = X.sum(1).clamp_min(1.0)
    names = [f"P{i:03d}" for i in range(T)]
    pairs_h = pairs.cpu().numpy()
    cond_labels = np.array(["control", *names, *(f"{names[a]}+{names[b]}" for a, b in pairs_h)], dtype=object)
    cond_h = cond.cpu().numpy()
    return PerturbationData(
        X=X, is_counts=True, library=library.cpu().numpy().astype(np.float32),
        dosages=d.cpu().numpy().astype(np.float32), labels=cond_labels[cond_h], perturbations=names,
        genes=[f"G{i:05d}" for i in range(G)], obs=pd.DataFrame(index=pd.RangeIndex(n_cells).astype(str)),
        settings={"likelihood": "nb", "source": "bench/gpu_train.py"},
    )


# ---- FLOPs ------------------------------------------------------------------------------------
def _dense(rows: float, n_in: int, n_out: int, input_grad: bool = True) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of a dense layer on ``rows`` rows."""
    f = 2.0 * rows * n_in * n_out
    return f, f * (3.0 if input_grad else 2.0)


def _mlp(rows: float, n_in: int, hidden: int, n_out: int, layers: int, data_input: bool) -> tuple[float, float]:
    widths = [n_in] + [hidden] * layers + [n_out]
    fw = tot = 0.0
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        f, t = _dense(rows, a, b, input_grad=not (i == 0 and data_input))
        fw, tot = fw + f, tot + t
    return fw, tot


def step_flops(model: PerturbationModel, batch: int, particles: int) -> dict[str, float]:
    """Matrix-product FLOPs of one training step: ``forward`` and ``total`` (forward + backward)."""
    hp = model.hparams
    G, K, T, H, L = hp["n_genes"], hp["n_latent"], hp["n_perturbations"], hp["n_hidden"], hp.get("n_layers", 1)
    B, P = float(batch), float(particles)
    parts: list[tuple[float, float]] = []
    if model.family in ("sams_vae", "cpa_vae"):
        parts.append(_mlp(B, G, H, 2 * K, L, data_input=True))  # encoder on x, once per cell
        parts.append(_dense(P * B, K, 2 * K))  # the sampled shift's entry into the encoder
        parts.append(_mlp(P * B, K, H, G, L, data_input=False))  # decoder
        f = 2.0 * P * B * T * K  # shift = d · table; only the table needs a gradient
        parts.append((f, 2 * f))
        f = 2.0 * P * T * B  # global term: log_ratio [P,T] · weights [T,B]
        parts.append((f, 2 * f))
        if hp.get("guide") == "correlated":
            He, Le = hp.get("embed_hidden", 400), hp.get("embed_layers", 2)
            masks = model.family == "sams_vae"
            rows = P * T if masks else T
            parts.append(_mlp(rows, K, He, 2 * K, Le, data_input=not masks))
    elif model.family in ("conditional_vae", "vae"):
        Td = T if model.family == "conditional_vae" else 0
        parts.append(_dense(B, G, H, input_grad=False))  # encoder: x → H
        if Td:
            parts.append(_dense(B, Td, H, input_grad=False))  # encoder: d → H
        parts.append(_mlp(B, H, H, 2 * K, L - 1, data_input=False) if L > 1 else _dense(B, H, 2 * K))
        parts.append(_dense(P * B, K, H))  # decoder: z → H
        if Td:
            parts.append(_dense(B, Td, H, input_grad=False))  # decoder: d → H, shared by particles
        parts.append(_mlp(P * B, H, H, G, L - 1, data_input=False) if L > 1 else _dense(P * B, H, G))
    else:
        raise ValueError(f"no FLOP count for {model.family}")
    return {"forward": sum(p[0] for p in parts), "total": sum(p[1] for p in parts)}


def counted_step_flops(model: PerturbationModel, data: PerturbationData, batch: int, particles: int, device: torch.device) -> float:
    """FLOPs of one step (loss and backward) as counted by ``torch.utils.flop_counter`` (a check)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.to(device)
    n = min(batch, data.n_cells)
    dd = DeviceData.from_arrays(data.X[:n], data.dosages[:n], data.library[:n], condition_ids(model, data)[:n], device)
    with FlopCounterMode(display=False) as fc:
        model.loss(dd.batch(torch.arange(n, device=device)), particles).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


# ---- device rates -----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Measured FLOP/s of an (m × k) · (k × n) product on ``device`` in ``dtype`` (best of repeats)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best = math.inf
    t_end = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(5 if device.type == "cuda" else 1):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / (5 if device.type == "cuda" else 1))
        reps += 1
    return 2.0 * m * k * n / best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"{name}, {n} thread{'s' if n != 1 else ''}"


def peak_memory(device: torch.device) -> float:
    """GiB: peak GPU memory allocated since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- held-out score ---------------------------------------------------------------------------
@torch.no_grad()
def heldout_elbo(
    model: PerturbationModel, data: PerturbationData, cells: np.ndarray, device: torch.device, particles: int, seed: int,
    batch: int = 512,
) -> tuple[float, float]:
    """Mean negative ELBO per held-out cell (float32, noise seeded by ``seed``) and its standard
    error, from the spread of the batch means."""
    dd = DeviceData(data, cells, device, condition_ids(model, data))
    torch.manual_seed(seed)
    model.eval()
    means, sizes = [], []
    for b in dd.batches(batch):
        means.append(model.loss(b, particles).loss)
        sizes.append(b.size)
    m = torch.stack(means).double().cpu().numpy()
    w = np.asarray(sizes, dtype=float)
    se = float(m.std(ddof=1) / math.sqrt(m.size)) if m.size > 1 else math.nan
    return float((m * w).sum() / w.sum()), se


def storage_bytes(data: PerturbationData, cells: np.ndarray, device: torch.device, storage: str) -> tuple[int, bool]:
    """Bytes the cells take on ``device`` held as ``storage``, and whether that storage was exact."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dd = DeviceData(data, cells, device, np.full(data.n_cells, -1), storage=storage)
    out = dd.nbytes, not dd.notes
    del dd
    return out


# ---- runs -------------------------------------------------------------------------------------
@dataclass
class Setting:
    """What stays the same over all runs of one invocation."""

    data: PerturbationData
    split: np.ndarray
    heldout: np.ndarray
    device: torch.device
    batch: int
    particles: int
    epochs: int
    data_dtype: str
    rates: dict[str, float]
    t_begin: float = field(default_factory=time.perf_counter)
    budget_s: float | None = None

    def out_of_time(self) -> bool:
        return self.budget_s is not None and time.perf_counter() - self.t_begin > self.budget_s


def one_run(st: Setting, family: str, hp: dict[str, Any], flops: float, mode: str, precision: str, seed: int) -> dict[str, Any]:
    """Train one model in one mode and precision; its row of the table."""
    torch.manual_seed(seed)
    model = build_for_data(family, st.data, st.split, **hp)
    if st.device.type == "cuda":
        torch.cuda.synchronize(st.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(st.device)
    cfg = TrainConfig(
        epochs=1 + st.epochs, batch_size=st.batch, n_particles=st.particles, device=str(st.device), precision=precision,
        seed=seed, compile=MODES[mode], data_dtype=st.data_dtype,
    )
    res: TrainResult = fit(model, st.data, st.split, cfg)
    peak = peak_memory(st.device)
    secs = [h.seconds - h.val_seconds for h in res.history]
    s_epoch = float(np.median(secs[1:] or secs))
    steps = res.history[-1].step - (res.history[-2].step if len(res.history) > 1 else 0)
    floor = steps * flops / st.rates[precision]
    elbo, se = heldout_elbo(model, st.data, st.heldout, st.device, st.particles, seed=12345)
    notes = list(res.notes)
    if MODES[mode] == "reduce-overhead" and st.device.type == "cuda" and not res.cuda_graphs:
        notes.append("no CUDA graphs")
    if MODES[mode] is not None and res.compiled is None:
        notes.insert(0, "ran eagerly")
    del model
    return {
        "s/epoch": s_epoch, "first epoch s": secs[0], "cells/s": steps * st.batch / s_epoch, "peak GiB": peak,
        "data GiB": res.data_bytes / 2**30, "floor s/epoch": floor, "× floor": s_epoch / floor,
        "held-out -ELBO": elbo, "se": se, "note": " | ".join(notes),
    }


def model_hparams(family: str, size: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    hp: dict[str, Any] = {"n_latent": size["latent"], "n_hidden": size["hidden"], "n_layers": 1}
    if family in ("sams_vae", "cpa_vae"):
        hp.update(guide=args.guide, embed_hidden=args.embed_hidden, embed_layers=args.embed_layers)
    if family == "sams_vae":
        hp["align_at"] = None if args.align_at == "none" else float(args.align_at)
    return hp


def model_label(family: str, guide: str) -> str:
    return FAMILY_LABELS.get(family, family) + (f" ({guide})" if family in ("sams_vae", "cpa_vae") else "")


def _num(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2f}"


def bf16_checks(rows: list[dict[str, Any]], noise_runs: dict[str, tuple[float, float]]) -> list[str]:
    """One line per model and mode: bf16's held-out -ELBO against float32's, within noise or not."""
    lines = []
    done = {(r["model"], r["mode"], r["precision"]): r for r in rows if "held-out -ELBO" in r}
    for (model, mode, precision), r in done.items():
        ref = done.get((model, mode, "float32"))
        if precision != "bf16-mixed" or ref is None:
            continue
        seed_diff = noise_runs.get(model, (math.nan, math.nan))
        known = [v for v in (seed_diff[0], ref["se"], r["se"]) if not math.isnan(v)]
        noise = max(known) if known else math.nan
        delta = r["held-out -ELBO"] - ref["held-out -ELBO"]
        verdict = "no noise estimate" if not known else ("within noise" if abs(delta) <= 3 * noise else "OUTSIDE noise")
        se = max((v for v in (ref["se"], r["se"]) if not math.isnan(v)), default=math.nan)
        lines.append(
            f"bf16 check, {model}, {mode}: held-out -ELBO {ref['held-out -ELBO']:.2f} (float32) vs {r['held-out -ELBO']:.2f} "
            f"(bf16), difference {delta:+.2f}; noise {_num(noise)} (seed-to-seed {_num(seed_diff[0])}, standard error "
            f"{_num(se)}): {verdict}"
        )
    return lines


# ---- table ------------------------------------------------------------------------------------
COLUMNS = ["model", "mode", "precision", "s/epoch", "first epoch s", "cells/s", "peak GiB", "data GiB", "floor s/epoch",
           "× floor", "held-out -ELBO", "note"]
FORMATS = {"s/epoch": "{:.3f}", "first epoch s": "{:.2f}", "cells/s": "{:,.0f}", "peak GiB": "{:.2f}", "data GiB": "{:.2f}",
           "floor s/epoch": "{:.3f}", "× floor": "{:.1f}", "held-out -ELBO": "{:.2f}"}


def shown_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    for c, f in FORMATS.items():
        table[c] = [("" if (v is None or (isinstance(v, float) and math.isnan(v))) else f.format(v)) for v in table[c]]
    return table.fillna("")


def markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v).replace("|", "/") for v in r) + " |" for r in table.itertuples(index=False)]
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when present)")
    ap.add_argument("--small", action="store_true", help="CPU-sized preset: 5,000 cells × 500 genes, K = 50 (other sizes as full)")
    ap.add_argument("--cells", type=int, default=None, help=f"cells (default {FULL['cells']:,}; --small {SMALL['cells']:,})")
    ap.add_argument("--genes", type=int, default=None, help=f"genes (default {FULL['genes']:,}; --small {SMALL['genes']})")
    ap.add_argument("--latent", type=int, default=None, help=f"latent units K (default {FULL['latent']}; --small {SMALL['latent']})")
    ap.add_argument("--perturbations", type=int, default=None, help="single perturbations (default 105)")
    ap.add_argument("--combinations", type=int, default=None, help="two-perturbation combinations (default 130)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden width of encoder and decoder (default 400)")
    ap.add_argument("--embed-hidden", type=int, default=400, help="width of the correlated guide's embedding network (default 400)")
    ap.add_argument("--embed-layers", type=int, default=4, help="hidden layers of the embedding network (default 4)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--particles", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None, help="timed epochs after one warm-up epoch (default 3)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS) + ["vae"])
    ap.add_argument("--guide", default="correlated", choices=["correlated", "mean-field"], help="SAMS-VAE/CPA-VAE guide (default correlated)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="eager, compiled, graphs (default all)")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS), help="default both")
    ap.add_argument("--data-dtype", default="float32", choices=["float32", "float16"],
                    help="how the counts are held on the device (float16 halves them when exact)")
    ap.add_argument("--align-at", default="none",
                    help="SAMS-VAE's basis alignment (fraction of the budget, or none: default, a one-off step outside the timed loop)")
    ap.add_argument("--heldout", type=float, default=0.02, help="fraction of cells held out and scored after training (default 0.02)")
    ap.add_argument("--matmul-precision", default=None, choices=["highest", "high", "medium"],
                    help="torch.set_float32_matmul_precision (high = TF32 on NVIDIA GPUs); default: torch's (highest)")
    ap.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                    help="torch.compile backend; eager = Dynamo only, to check the graph quickly on a CPU (default inductor)")
    ap.add_argument("--matmul-size", type=int, default=None, help="side of the square product that measures the peak rate (default 8192 on GPU, 2048 on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=None, help="start no new run after this many seconds (rows say skipped)")
    ap.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for gpu_train.md (default: $OUT when set)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return ap.parse_args(argv)


def use_backend(backend: str) -> None:
    """Make every ``torch.compile`` in this process use ``backend`` (for quick checks on a CPU)."""
    if backend == "inductor":
        return
    original = torch.compile

    def compile_with(fn: Any = None, **kw: Any) -> Any:
        kw.pop("mode", None)
        kw["backend"] = backend
        return original(fn, **kw)

    torch.compile = compile_with  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = SMALL if args.small else FULL
    size = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in preset.items()}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    use_backend(args.compile_backend)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    t_begin = time.perf_counter()

    data = norman_screen(size["cells"], size["genes"], size["perturbations"], size["combinations"], device, args.seed)
    if args.data_dtype == "float16":  # held as float16 from the start: no float32 copy on the device
        data = data.replace(X=data.X.to(torch.float16))
    _sync(device)
    n_combos = len(data.combinations())
    print(f"screen: {data.n_cells:,} cells × {data.n_genes:,} genes, {data.n_perturbations} perturbations, "
          f"{n_combos} combinations, {int(data.control_mask.sum()):,} controls, "
          f"{1 - int(torch.count_nonzero(data.X)) / data.X.numel():.0%} zeros; generated on {device} in "
          f"{time.perf_counter() - t_begin:.1f} s", file=sys.stderr)
    split = np.full(data.n_cells, "train", dtype=object)
    split[np.random.default_rng(args.seed).random(data.n_cells) < args.heldout] = HELDOUT
    heldout = np.flatnonzero(split == HELDOUT)
    train_idx = np.flatnonzero(split == "train")
    b32, _ = storage_bytes(data, train_idx, device, "float32")
    b16, exact16 = storage_bytes(data, train_idx, device, "float16")
    memory_line = (f"training cells on the device: {b32 / 2**30:.2f} GiB in float32, {b16 / 2**30:.2f} GiB in float16 "
                   f"({'exact' if exact16 else 'not exact: kept in float32'}); max count {float(data.X.max()):.0f}")

    P, B, H = args.particles, args.batch_size, size["hidden"]
    side = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    dtypes = {"float32": torch.float32, "bf16-mixed": torch.bfloat16}
    secs = 1.0 if device.type == "cuda" else 0.2
    rates = {p: matmul_rate(device, side, side, side, dtypes[p], seconds=secs) for p in args.precisions}
    shape_rates = {p: matmul_rate(device, P * B, H, data.n_genes, dtypes[p], seconds=secs / 2) for p in args.precisions}
    st = Setting(data, split, heldout, device, B, P, size["epochs"], args.data_dtype, rates, t_begin, args.budget_s)

    rows: list[dict[str, Any]] = []
    noise_runs: dict[str, tuple[float, float]] = {}
    for family in args.models:
        label = model_label(family, args.guide)
        hp = model_hparams(family, size, args)
        torch.manual_seed(args.seed)
        fl = step_flops(build_for_data(family, data, split, **hp), B, P)
        counted = counted_step_flops(build_for_data(family, data, split, **hp), data, B, P, device)
        if abs(counted - fl["total"]) > 1e-6 * fl["total"]:
            print(f"warning: {family}: analytic {fl['total']:.4g} FLOP/step but torch's FlopCounterMode counts "
                  f"{counted:.4g}: the formula is out of date", file=sys.stderr)
        for precision in args.precisions:
            for mode in args.modes:
                row = {"model": label, "mode": mode, "precision": precision}
                if st.out_of_time():
                    rows.append({**row, "note": "skipped (time budget)"})
                    continue
                rows.append({**row, **one_run(st, family, hp, fl["total"], mode, precision, args.seed)})
                r = rows[-1]
                print(f"{label}, {mode}, {precision}: {r['s/epoch']:.3f} s/epoch (first {r['first epoch s']:.1f} s), "
                      f"× floor {r['× floor']:.1f}, held-out -ELBO {r['held-out -ELBO']:.2f} {r['note']}", file=sys.stderr)
        if "bf16-mixed" in args.precisions and "float32" in args.precisions and not st.out_of_time():
            other = one_run(st, family, hp, fl["total"], "eager", "float32", args.seed + 1)
            ref = next((r for r in rows if r["model"] == label and r["mode"] == "eager" and r["precision"] == "float32"
                        and "held-out -ELBO" in r), None)
            if ref is not None:
                noise_runs[label] = (abs(other["held-out -ELBO"] - ref["held-out -ELBO"]), other["se"])

    table = shown_table(rows)
    steps_eager, steps_static = math.ceil(len(train_idx) / B), len(train_idx) // B
    header = [
        f"{device_name(device)}; torch {torch.__version__}; float32 matmul {torch.get_float32_matmul_precision()}"
        + (f"; compile backend {args.compile_backend}" if args.compile_backend != "inductor" else ""),
        (f"{data.n_cells:,} cells × {data.n_genes:,} genes, {data.n_perturbations} perturbations, {n_combos} combinations; "
        f"{len(train_idx):,} training cells, {len(heldout):,} held out; K = {size['latent']}, hidden {H}, batch {B}, "
        f"{P} particles, {steps_eager} steps/epoch eager, {steps_static} compiled (last partial batch left out); "
        f"embedding net {args.embed_layers} × {args.embed_hidden}; median of {size['epochs']} epochs after 1 warm-up; "
        f"data held as {args.data_dtype}"),
        "matmul rate: " + ", ".join(
            f"{p} {rates[p] / 1e12:.2f} TFLOP/s ({side}³), {shape_rates[p] / 1e12:.2f} at the decoder's shape "
            f"({P * B} × {H} · {H} × {data.n_genes})" for p in args.precisions),
        memory_line,
    ]
    checks = bf16_checks(rows, noise_runs)
    print("\n" + "\n".join(header))
    print(markdown(table) if args.markdown else table.to_string(index=False))
    for line in checks:
        print(line)
    print(f"total {time.perf_counter() - t_begin:.0f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = "\n\n".join(["# bench/gpu_train.py", "\n".join(f"- {h}" for h in header), markdown(table), "\n".join(f"- {c}" for c in checks)])
        (out / "gpu_train.md").write_text(text + "\n")
        print(f"wrote {out / 'gpu_train.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
