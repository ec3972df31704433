"""Command line: ``python -m sams_core {train,evaluate,predict,write-back,export,simulate,build-demo} ...``.

For people who train on a cluster and only browse in the app. Every subcommand explains its
options with ``--help``; bad input ends with the message of the problem and exit code 2.
``train`` offers each registered family's options as flags (:mod:`sams_core.models.registry`), so
a new family needs no change here. Each subcommand imports what it needs when it runs, so
``--help`` and ``simulate`` start without loading PyTorch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd

from sams_core import __version__
from sams_core.data.splits import SPLIT_KINDS
from sams_core.errors import SamsError
from sams_core.labels import dosage_rows, parse_label
from sams_core.models import registry


def _whole(low: int):
    """An argparse ``type``: a whole number of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def _real(low: float, high: float | None = None, low_open: bool = True, high_open: bool = False):
    """An argparse ``type``: a finite number in the interval from ``low`` to ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if not np.isfinite(value) or too_low or too_high:
            lo = f"{'above' if low_open else 'at least'} {low:g}"
            hi = f" and {'below' if high_open else 'at most'} {high:g}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"must be a finite number {lo}{hi}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the screen as an .h5ad file (counts in layers['counts'] or integer X)")
    p.add_argument("--perturbation-key", default=None, help="obs column with each cell's perturbation (default: detected among perturbation, condition, guide_identity, gene, perturbation_name)")
    p.add_argument("--separator", action="append", default=None, help="separator of combination members (default '+'; repeat for several)")
    p.add_argument("--control-label", action="append", default=None, help="label of control cells (default: control, ctrl, non-targeting, NT, DMSO ...; repeat for several)")
    p.add_argument("--n-top-genes", type=_whole(1), default=None, help="keep only this many highly variable genes (scanpy)")


def _flag_parser(option: registry.Option):
    """An argparse ``type`` that reads ``option`` as written on the command line."""

    def parse(text: str):
        try:
            return option.parse(text)
        except SamsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = option.name  # argparse names the type in its messages
    return parse


def _option_flags() -> dict[str, list[tuple[registry.FamilySpec, registry.Option]]]:
    """Each family-option flag with the families that take it (the registry checks that a flag
    means one option of one kind)."""
    flags: dict[str, list[tuple[registry.FamilySpec, registry.Option]]] = {}
    for spec in registry.families():
        for opt in spec.options:
            flags.setdefault(opt.flag, []).append((spec, opt))
    return flags


def _show(value: object) -> str:
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_family_options(p: argparse.ArgumentParser) -> None:
    """One flag per family option in the registry, its help naming the families that take it.

    A flag not given stays off the namespace, so the family's own default applies.
    """
    g = p.add_argument_group("model options", "options of particular model families (see the list of families below)")
    for flag, users in _option_flags().items():
        opt = users[0][1]
        defaults = {_show(o.default) for _, o in users}
        if len(defaults) == 1:
            who = f"{', '.join(s.label for s, _ in users)}; default {defaults.pop()}"
        else:
            who = "; ".join(f"{s.label} default {_show(o.default)}" for s, o in users)
        try:
            g.add_argument(
                flag, dest=opt.dest, type=_flag_parser(opt), default=argparse.SUPPRESS,
                metavar="{" + ",".join(map(str, opt.choices)) + "}" if opt.choices else opt.type.__name__.upper(),
                help=f"{opt.help} ({who})",
            )
        except argparse.ArgumentError as exc:
            names = ", ".join(s.name for s, _ in users)
            raise SamsError(
                f"Model option {opt.name!r} of {names} uses the flag {flag}, which the train command already has. "
                "Give the option another flag in its FamilySpec."
            ) from exc


def _family_epilog() -> str:
    rows = [
        textwrap.fill(f"{s.label} — {s.summary}", 96, initial_indent=f"  {s.name:<17}", subsequent_indent=" " * 19)
        for s in registry.families()
    ]
    return "model families (--model):\n" + "\n".join(rows)


def family_hparams(args: argparse.Namespace) -> dict:
    """The chosen family's options given on the command line, by constructor keyword.

    Raises :class:`SamsError` for a flag of another family, naming the families that take it.
    """
    spec = registry.get(args.model)
    hp: dict = {}
    for flag, users in _option_flags().items():
        dest = users[0][1].dest
        if not hasattr(args, dest):
            continue
        mine = [o for s, o in users if s.name == spec.name]
        if not mine:
            raise SamsError(
                f"{flag} is an option of {', '.join(s.label for s, _ in users)}, not of {spec.label}. "
                f"Drop it, or choose --model {' or '.join(s.name for s, _ in users)}."
            )
        hp[mine[0].name] = getattr(args, dest)
    return hp


def _add_scale_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--devices", type=_whole(1), default=1,
        help="train on N processes with PyTorch DistributedDataParallel, one per GPU (NCCL), or N CPU "
        "processes (gloo) with --device cpu. Relaunches itself as: python -m torch.distributed.run "
        "--standalone --nproc_per_node=N -m sams_core train ARGS (the same as torchrun --standalone "
        "--nproc_per_node=N -m sams_core train ARGS); on several machines run that line yourself on each, "
        "with --nnodes=M --node_rank=I --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT instead of --standalone. "
        "Every mini-batch of --batch-size cells is split over the processes (default 1)",
    )
    p.add_argument("--backed", action="store_true", help="leave the expression matrix in the .h5ad file and read cells in chunks (for screens larger than memory; CSR or dense matrix; no --n-top-genes)")
    p.add_argument("--chunk-size", type=_whole(1), default=4096, help="cells per read with --backed (default 4096)")


def _read_data(args: argparse.Namespace):
    from sams_core.data.screen import read_h5ad

    how = {
        "perturbation_key": args.perturbation_key,
        "separators": tuple(args.separator or ["+"]),
        "control_labels": args.control_label,
        "n_top_genes": args.n_top_genes,
        # covariates: detected (None), none (--no-covariates) or the columns named (--covariate)
        "covariate_keys": [] if getattr(args, "no_covariates", False) else getattr(args, "covariate", None),
    }
    if getattr(args, "backed", False):
        from sams_core.data.backed import read_h5ad_backed

        return read_h5ad_backed(args.data, chunk_size=args.chunk_size, **how)
    return read_h5ad(args.data, **how)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sams_core", description="Train, evaluate and query sparse-mechanism-shift models of perturbation screens.")
    ap.add_argument("--version", action="version", version=f"sams_core {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train", help="train a model on a screen and save it as a bundle",
        description="Train a model on an .h5ad screen, evaluate it on its split and save a bundle (.sams file or folder).",
        epilog=_family_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_options(t)
    t.add_argument("--covariate", action="append", default=None, metavar="COL", help="obs column of a covariate the model conditions on (cell type, batch ...; repeat for several, the first is the level of per-level effects); default: detected among cell_type, cell_line, batch, gem_group, donor, sample")
    t.add_argument("--no-covariates", action="store_true", help="model no covariate, even where obs has cell_type, batch ...")
    t.add_argument("--model", default="sams_vae", choices=sorted(s.name for s in registry.families()), help="model family (default sams_vae; listed below)")
    t.add_argument("--likelihood", default=None, choices=registry.LIKELIHOODS, help="default: nb for counts, gaussian for log-normalised data")
    t.add_argument("--latent", type=_whole(1), default=15, help="number of latent units K (default 15)")
    t.add_argument("--hidden", type=_whole(1), default=350, help="width of the encoder/decoder hidden layers (default 350)")
    t.add_argument("--layers", type=_whole(1), default=1, help="hidden layers in encoder and decoder (default 1)")
    t.add_argument("--split", default="heldout-combos", choices=SPLIT_KINDS, help="how to split cells (default heldout-combos; heldout-covariate holds perturbations out in one level of the first covariate)")
    t.add_argument("--split-level", default=None, metavar="LEVEL", help="with --split heldout-covariate: hold perturbations out at this level only (e.g. one cell line); default: pairs at any level")
    t.add_argument("--fraction", type=_real(0, 1), default=0.25, help="held-out fraction of combinations/perturbations, or trained fraction of combination cells for data-efficiency (default 0.25)")
    t.add_argument("--val-fraction", type=_real(0, 1, low_open=False, high_open=True), default=0.1, help="fraction of the remaining cells used for validation (default 0.1)")
    t.add_argument("--test-fraction", type=_real(0, 1, low_open=False, high_open=True), default=0.1, help="test fraction for the random split (default 0.1)")
    t.add_argument("--epochs", type=_whole(1), default=100, help="training epochs (default 100)")
    t.add_argument("--steps", type=_whole(1), default=None, help="training steps instead of epochs")
    t.add_argument("--batch-size", type=_whole(1), default=512, help="cells per mini-batch (default 512)")
    t.add_argument("--lr", type=_real(0, 10), default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--particles", type=_whole(1), default=5, help="Monte-Carlo particles of the ELBO (default 5)")
    t.add_argument("--grad-clip", type=_real(0), default=None, help="clip the gradient norm at this value")
    t.add_argument("--early-stopping", type=_whole(1), default=None, help="stop after this many epochs without validation improvement")
    t.add_argument("--seed", type=int, default=0, help="seed of the split and of training (default 0)")
    t.add_argument("--compile", default=None, choices=["default", "reduce-overhead"], help="compile the whole training step with torch.compile (reduce-overhead also captures it in CUDA graphs on a GPU); falls back to eager and says why where it cannot; default: eager")
    t.add_argument("--precision", default="float32", choices=["float32", "bf16-mixed"], help="bf16-mixed runs the networks' matrix products in bfloat16 (faster on CPUs with AVX512-BF16 and on GPUs); default float32")
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present; with --devices, cuda means one GPU per process)")
    _add_scale_options(t)
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    t.add_argument("--full-eval", action="store_true",
                   help="evaluate every held-out cell with 100 importance samples and 2,000 predicted cells per condition "
                        "for every condition (default: a seeded sample of at most 1,000 cells and 50 conditions per split, 20 "
                        "importance samples, 200 cells per condition)")
    t.add_argument("--out", required=True, help="where to save the bundle: NAME.sams for one file, else a folder")
    _add_family_options(t)

    e = sub.add_parser("evaluate", help="held-out metrics of a bundle on its data", description="Recreate the bundle's split on the data and print held-out IWELBO and ATE scores per split.")
    e.add_argument("bundle", help="a .sams bundle file or folder")
    e.add_argument("--data", required=True, help="the .h5ad screen the bundle was trained on")
    e.add_argument("--samples", type=_whole(1), default=100, help="draws of the globals for the IWELBO (default 100)")
    e.add_argument("--ate-samples", type=_whole(1), default=2000, help="posterior-predictive cells per condition for the model ATE (default 2000)")
    e.add_argument("--max-cells", type=_whole(1), default=20000, help="cells per split for the IWELBO, subsampled above (default 20000)")
    e.add_argument("--max-conditions", type=_whole(1), default=None,
                   help="score the effects of a seeded sample of at most this many conditions per split (default: all)")
    e.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws (default 0)")
    e.add_argument("--csv", default=None, help="write the metrics table to this CSV file")

    pr = sub.add_parser("predict", help="per-gene predicted effects of perturbation combinations", description="Predicted per-gene effect (log2 fold change on the ATE scale) of combinations, with credible intervals.")
    pr.add_argument("bundle", help="a .sams bundle file or folder")
    pr.add_argument("--perturbations", nargs="+", required=True, help="combinations as labels, e.g. KLF1 KLF1+GATA1 (A:0.5+B for dosage 0.5)")
    pr.add_argument("--samples", type=_whole(1), default=2000, help="posterior-predictive cells per combination (default 2000)")
    pr.add_argument("--level", type=_real(0, 1, high_open=True), default=0.9, help="credible interval level (default 0.9)")
    pr.add_argument("--covariate-level", default=None, metavar="LEVEL", help="predict in this level of the model's first covariate (e.g. a cell type); default: pooled over its levels")
    pr.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    pr.add_argument("--out", default=None, help="CSV file (default: print to stdout)")

    w = sub.add_parser("write-back", help="write a bundle's latents, masks and embeddings into the screen's AnnData",
                       description="Read the screen the bundle was trained on, write the cells' latents to obsm['X_sams'] "
                       "(and obsm['X_sams_basal']) and the model's mask probabilities and embeddings to uns['sams'], "
                       "and save the annotated AnnData (atomically) for scanpy.")
    w.add_argument("bundle", help="a .sams bundle file or folder")
    w.add_argument("--data", required=True, help="the .h5ad screen the bundle was trained on")
    w.add_argument("--out", required=True, help="the annotated .h5ad file to write (may be the --data file itself)")
    w.add_argument("--key", default="X_sams", help="obsm key of the latents (default X_sams)")
    w.add_argument("--loadings", action="store_true", help="also store each latent unit's gene loadings in uns['sams']")

    x = sub.add_parser("export", help="the screen with everything the model learned, as one .h5ad for scanpy",
                       description="Read the screen the bundle was trained on and save a copy (atomically) with the cells' "
                       "latents in obsm['X_sams'] and obsm['X_sams_basal'], a UMAP of them in obsm['X_sams_umap'] (and "
                       "obsm['X_umap'] when the screen has none), and the masks, embeddings, unit loadings and what the "
                       "model is in uns['sams']. The same file as the dashboard's Export button.")
    x.add_argument("bundle", help="a .sams bundle file or folder")
    x.add_argument("data", help="the .h5ad screen the bundle was trained on")
    x.add_argument("--out", required=True, help="the .h5ad file to write (the screen itself is never changed)")
    x.add_argument("--no-umap", action="store_true", help="leave out the UMAP (slow on millions of cells)")
    x.add_argument("--seed", type=int, default=0, help="seed of the UMAP (default 0)")

    sub.add_parser("simulate", help="simulate a screen with ground truth (see simulate --help)", add_help=False)
    sub.add_parser("build-demo", help="rebuild the shipped demos: the real screen (assets/demo_real) and the simulated one (assets/demo), screens and bundles (see build-demo --help)", add_help=False)
    return ap


def parse_combination(text: str) -> dict[str, float]:
    """"A+B:0.5" → {"A": 1.0, "B": 0.5}; "control" → {} (the grammar of :mod:`sams_core.labels`)."""
    return parse_label(text)


def _cmd_train(args: argparse.Namespace) -> int:
    from sams_core.io.bundle import check_output
    from sams_core.pipeline import SplitSpec, train_bundle
    from sams_core.training import distributed
    from sams_core.training.trainer import TrainConfig, tqdm_progress

    if args.devices < 1:
        raise SamsError(f"--devices must be at least 1, got {args.devices}.")
    if args.devices > 1 and not distributed.launched_by_torchrun():
        cmd = distributed.torchrun_command(args.devices, args.argv)
        print(f"training on {args.devices} processes: {' '.join(cmd)}", file=sys.stderr)
        return subprocess.call(cmd)
    ddp = distributed.launched_by_torchrun()
    device = str(distributed.init_from_env(args.device)) if ddp else args.device
    main = distributed.is_main()
    if main:
        check_output(args.out)  # before reading or training: an unusable --out is said at once
    try:
        data = _read_data(args)
        if main:
            print(f"{data.n_cells} cells × {data.n_genes} genes, {data.n_perturbations} perturbations, "
                  f"{len(data.combinations())} combinations, {int(data.control_mask.sum())} controls; "
                  f"likelihood {args.likelihood or data.likelihood}"
                  + (f"; {distributed.world_size()} processes" if ddp else ""), file=sys.stderr)
        hp: dict = {"n_latent": args.latent, "n_hidden": args.hidden, "n_layers": args.layers, **family_hparams(args)}
        if args.likelihood:
            hp["likelihood"] = args.likelihood
        cfg = TrainConfig(
            epochs=args.epochs, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            n_particles=args.particles, grad_clip=args.grad_clip, early_stopping=args.early_stopping,
            seed=args.seed, device=device, precision=args.precision, compile=args.compile,
            chunk_size=args.chunk_size if args.backed else None,
        )
        spec = SplitSpec(args.split, args.fraction, args.val_fraction, args.test_fraction, args.seed, args.split_level)
        # only rank 0 reports, evaluates and writes the bundle; every rank trains
        update, close = tqdm_progress(args.epochs if args.steps is None else 1, desc=args.model) if main else (None, lambda: None)
        try:
            bundle, result, ev = train_bundle(
                data, args.model, spec, cfg, args.out if main else None, update, (not args.no_eval) and main,
                full_evaluation=args.full_eval, **hp
            )
        finally:
            close()
    finally:
        if ddp:
            distributed.cleanup()
    if not main:
        return 0
    print(f"best epoch {result.best_epoch}, {result.seconds:.1f} s; saved {args.out}", file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if settling := bundle.mask_settling_note():
        print(f"note: {settling}", file=sys.stderr)
    if ev is not None:
        if not args.full_eval:
            print("evaluated on a seeded sample (at most 1,000 cells and 50 conditions per split, 20 importance samples); "
                  "--full-eval or 'evaluate' for the full protocol", file=sys.stderr)
        print(ev.metrics.to_string(float_format=lambda v: f"{v:.4f}"))
        _print_per_level(ev)
    return 0


def _print_per_level(ev) -> None:
    """The per-level metrics of a screen with covariates, and where a level had no controls."""
    if not ev.per_level.empty:
        print(ev.per_level.to_string(float_format=lambda v: f"{v:.4f}"))
    for note in ev.notes:
        print(f"note: {note}", file=sys.stderr)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from sams_core.evaluation.metrics import evaluate_model
    from sams_core.pipeline import load_data_and_bundle

    bundle, data, split = load_data_and_bundle(args.bundle, args.data)
    for note in bundle.notes:
        print(f"note: {note}", file=sys.stderr)
    ev = evaluate_model(bundle.model, data, split, args.samples, args.ate_samples, args.max_cells, args.seed,
                        max_ate_conditions=args.max_conditions)
    table = ev.metrics.copy()
    table.insert(0, "model", bundle.label)
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    _print_per_level(ev)
    if args.csv:
        table.to_csv(args.csv)
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from sams_core.evaluation.metrics import model_ate_draws
    from sams_core.io.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    for note in bundle.notes:
        print(f"note: {note}", file=sys.stderr)
    if not 0 < args.level < 1:
        raise SamsError(f"--level must be between 0 and 1, got {args.level}.")
    empty = [label for label in args.perturbations if not label.strip()]
    if empty:
        raise SamsError("An empty combination was given to --perturbations. Name perturbations, e.g. KLF1 or KLF1+GATA1 (control for none).")
    d = dosage_rows(args.perturbations, bundle.perturbations)
    per = max(1, args.samples // 100)
    draws = model_ate_draws(
        bundle.model, d, bundle.is_counts, n_globals=100, n_per_global=per, seed=args.seed,
        covariate_level=bundle.level_index(args.covariate_level),
    )
    lo_q, hi_q = (1 - args.level) / 2, 1 - (1 - args.level) / 2
    frames = []
    for r, label in enumerate(args.perturbations):
        frames.append(pd.DataFrame({
            "combination": label,
            "gene": bundle.genes,
            "effect": draws[:, r].mean(0),
            "lower": np.quantile(draws[:, r], lo_q, axis=0),
            "upper": np.quantile(draws[:, r], hi_q, axis=0),
        }))
    table = pd.concat(frames, ignore_index=True)
    if args.out:
        table.to_csv(args.out, index=False)
        print(f"wrote {args.out} ({len(table)} rows)", file=sys.stderr)
    else:
        table.to_csv(sys.stdout, index=False)
    return 0


def _cmd_write_back(args: argparse.Namespace) -> int:
    from sams_core.data.screen import read_anndata
    from sams_core.interpret.programs import unit_loadings
    from sams_core.interpret.writeback import write_back, write_h5ad
    from sams_core.io.bundle import load_bundle
    from sams_core.pipeline import data_for_bundle

    bundle = load_bundle(args.bundle)
    adata = read_anndata(args.data)
    data = data_for_bundle(bundle, adata)
    loadings = unit_loadings(bundle, data) if args.loadings else None
    write_back(adata, bundle, data, loadings, key=args.key)
    out = write_h5ad(adata, args.out)
    print(f"wrote {out}: obsm[{args.key!r}] ({adata.n_obs} cells × {adata.obsm[args.key].shape[1]} latents), uns['sams']", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from sams_core.data.screen import read_anndata
    from sams_core.interpret.writeback import export_screen, write_h5ad
    from sams_core.io.bundle import load_bundle
    from sams_core.pipeline import data_for_bundle

    if not str(args.out).lower().endswith(".h5ad"):
        raise SamsError(f"--out {args.out} does not end in .h5ad. Name the output file NAME.h5ad.")
    bundle = load_bundle(args.bundle)
    adata = read_anndata(args.data)
    data = data_for_bundle(bundle, adata)
    out = write_h5ad(export_screen(adata, bundle, data, umap=not args.no_umap, seed=args.seed), args.out)
    print(f"wrote {out}: {adata.n_obs} cells with obsm['X_sams']" + ("" if args.no_umap else ", a UMAP")
          + f" and uns['sams'] ({bundle.label})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":  # its own parser reads the options
        from sams_core.simulate import simulate_main

        return simulate_main(argv[1:])
    if argv and argv[0] == "build-demo":
        from sams_core.demo import build_demo_main

        return build_demo_main(argv[1:])
    try:
        args = _parser().parse_args(argv)
        args.argv = argv  # --devices relaunches the same command line under torchrun
        return {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict, "write-back": _cmd_write_back,
                "export": _cmd_export}[args.command](args)
    except SamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
