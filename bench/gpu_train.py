"""Seconds per epoch at Norman scale, against the floor set by the device's matrix-multiply rate.

DESIGN §6 / issue 7 configuration: a synthetic screen generated on the device (111,000 cells ×
5,000 genes of negative-binomial counts, 105 single perturbations and 130 two-perturbation
combinations, ~10 % controls), K = 200, one 400-wide hidden layer, batch 512, 5 particles;
SAMS-VAE with the correlated guide (4 × 400 embedding network), CPA-VAE with the same guide and
the conditional VAE. Training runs through ``sams_core.train.fit`` exactly as users run it
(counts dense on the device, mini-batches gathered by index, no validation).

    python bench/gpu_train.py                      # on the GPU (H100/H200), full size
    python bench/gpu_train.py --small              # CPU-sized: 5,000 cells × 500 genes, K = 50
    python bench/gpu_train.py --precision bf16-mixed --compile --epochs 5

Columns: seconds per epoch (median of ``--epochs`` timed epochs after one warm-up epoch, whose
time is shown separately: it includes compilation with ``--compile``), cells per second, peak
memory (GPU: ``torch.cuda.max_memory_allocated``, data included; CPU: the process's peak
resident set), the analytic FLOPs of one step, the floor and how far the measured epoch is from
it, and the training -ELBO of the last epoch (to compare precisions).

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
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sams_core.data.screen import PerturbationData
from sams_core.models.registry import FAMILY_LABELS
from sams_core.models.base import PerturbationModel
from sams_core.training.build import build_for_data
from sams_core.training.trainer import TrainConfig, fit

FULL = dict(cells=111_000, genes=5_000, latent=200, perturbations=105, combinations=130, hidden=400, epochs=3)
SMALL = dict(cells=5_000, genes=500, latent=50, perturbations=105, combinations=130, hidden=400, epochs=3)
MODELS = ("sams_vae", "cpa_vae", "conditional_vae")


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
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
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

    from sams_core.data.batches import DeviceData, condition_ids

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


# ---- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument("--precision", default="float32", choices=["float32", "bf16-mixed"])
    ap.add_argument("--matmul-precision", default=None, choices=["highest", "high", "medium"],
                    help="torch.set_float32_matmul_precision (high = TF32 on NVIDIA GPUs); default: torch's (highest)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the loss step (model.loss)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs) or max-autotune")
    ap.add_argument("--matmul-size", type=int, default=None, help="side of the square product that measures the peak rate (default 8192 on GPU, 2048 on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)

    preset = SMALL if args.small else FULL
    size = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in preset.items()}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    t0 = time.perf_counter()
    data = norman_screen(size["cells"], size["genes"], size["perturbations"], size["combinations"], device, args.seed)
    _sync(device)
    t_data = time.perf_counter() - t0
    n_combos = len(data.combinations())
    print(f"screen: {data.n_cells:,} cells × {data.n_genes:,} genes, {data.n_perturbations} perturbations, "
          f"{n_combos} combinations, {int(data.control_mask.sum()):,} controls, "
          f"{1 - int(torch.count_nonzero(data.X)) / data.X.numel():.0%} zeros; generated on {device} in {t_data:.1f} s", file=sys.stderr)

    mm_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    side = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    peak_rate = matmul_rate(device, side, side, side, mm_dtype)
    P, B, H = args.particles, args.batch_size, size["hidden"]
    shape_rate = matmul_rate(device, P * B, H, data.n_genes, mm_dtype)

    split = np.full(data.n_cells, "train", dtype=object)
    steps = math.ceil(data.n_cells / B)
    rows = []
    for family in args.models:
        hp = {"n_latent": size["latent"], "n_hidden": H, "n_layers": 1}
        if family in ("sams_vae", "cpa_vae"):
            hp.update(guide=args.guide, embed_hidden=args.embed_hidden, embed_layers=args.embed_layers)
        torch.manual_seed(args.seed)
        model = build_for_data(family, data, split, **hp)
        fl = step_flops(model, B, P)
        counted = counted_step_flops(model, data, B, P, device)
        if abs(counted - fl["total"]) > 1e-6 * fl["total"]:
            print(f"warning: {family}: analytic {fl['total']:.4g} FLOP/step but torch's FlopCounterMode counts "
                  f"{counted:.4g}: the formula is out of date", file=sys.stderr)
        if args.compile:
            model.loss = torch.compile(model.loss, mode=args.compile_mode)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        cfg = TrainConfig(epochs=1 + size["epochs"], batch_size=B, n_particles=P, device=str(device),
                          precision=args.precision, seed=args.seed)
        res = fit(model, data, split, cfg)
        secs = [h.seconds - h.val_seconds for h in res.history]
        timed = secs[1:] or secs
        s_epoch = float(np.median(timed))
        floor = steps * fl["total"] / peak_rate
        label = FAMILY_LABELS.get(family, family) + (f" ({args.guide})" if family in ("sams_vae", "cpa_vae") else "")
        rows.append({
            "model": label,
            "s/epoch": s_epoch,
            "first epoch s": secs[0],
            "cells/s": data.n_cells / s_epoch,
            ("peak GPU GiB" if device.type == "cuda" else "peak RSS GiB"): peak_memory(device),
            "GFLOP/step": fl["total"] / 1e9,
            "floor s/epoch": floor,
            "× floor": s_epoch / floor,
            "train -ELBO": res.history[-1].train_loss,
        })
        print(f"{label}: {s_epoch:.3f} s/epoch (first {secs[0]:.2f} s), floor {floor:.3f} s", file=sys.stderr)
        del model, res

    table = pd.DataFrame(rows)
    print(f"\n{device_name(device)}; torch {torch.__version__}; {args.precision}"
          f"{', float32 matmul ' + torch.get_float32_matmul_precision() if args.precision == 'float32' else ''}"
          f"{', torch.compile' + (f' ({args.compile_mode})' if args.compile_mode else '') if args.compile else ''}")
    print(f"{data.n_cells:,} cells × {data.n_genes:,} genes, {data.n_perturbations} perturbations, {n_combos} combinations; "
          f"K = {size['latent']}, hidden {H}, batch {B}, {P} particles, {steps} steps/epoch; "
          f"embedding net {args.embed_layers} × {args.embed_hidden}; median of {size['epochs']} epochs after 1 warm-up")
    print(f"matmul rate: {peak_rate / 1e12:.2f} TFLOP/s ({side}³ {mm_dtype}), "
          f"{shape_rate / 1e12:.2f} TFLOP/s at the decoder's shape ({P * B} × {H} · {H} × {data.n_genes})")
    fmt = {"s/epoch": "{:.3f}", "first epoch s": "{:.2f}", "cells/s": "{:,.0f}", "GFLOP/step": "{:.2f}",
           "floor s/epoch": "{:.3f}", "× floor": "{:.1f}", "train -ELBO": "{:.1f}"}
    shown = table.copy()
    for c in shown.columns:
        if c in fmt:
            shown[c] = shown[c].map(fmt[c].format)
        elif c.startswith("peak"):
            shown[c] = shown[c].map("{:.2f}".format)
    if args.markdown:
        print("| " + " | ".join(shown.columns) + " |")
        print("|" + "---|" * len(shown.columns))
        for _, r in shown.iterrows():
            print("| " + " | ".join(map(str, r.values)) + " |")
    else:
        print(shown.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
