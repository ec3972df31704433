"""Train / validation / test assignments of a screen's cells (DESIGN §3 splits).
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from sams_core.data.screen import PerturbationData
from sams_core.errors import SamsError

SPLIT_KINDS: tuple[str, ...] = (
    "random",
    "heldout-combos",
    "data-efficiency",
    "heldout-perturbations",
    "heldout-covariate",
)

#: A (condition, level) pair held out by the ``heldout-covariate`` split: ("A+B", "K562") or "A+B@K562".
Pair = Union[str, Sequence[str]]


TRAIN, VAL, TEST = "train", "val", "test"
#: Cells in no set: the data-efficiency split's combination cells beyond the trained fraction.
UNUSED = "unused"


def make_split(
    data: PerturbationData,
    kind: str = "random",
    fraction: float = 0.25,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    heldout: Sequence[str] | Sequence[Pair] | None = None,
    level: str | None = None,
) -> np.ndarray:
    """Assign every cell to "train", "val" or "test" (a seeded split of DESIGN §3; "unused" below).

    - ``random``: cells at random, ``test_fraction`` test and ``val_fraction`` validation;
    - ``heldout-combos``: a ``fraction`` of the combinations (or the labels in ``heldout``) is
      never seen in training: their cells form the test set; singles and controls are trained;
    - ``data-efficiency``: half of each combination's cells is the test set, drawn from the seed
      alone so that every ``fraction`` is scored on the same cells; a ``fraction`` of the other
      half reaches training (nested: a larger fraction adds cells), the rest is ``"unused"``;
    - ``heldout-perturbations``: a ``fraction`` of the perturbation labels (or ``heldout``) is
      the test set (the sVAE+ out-of-domain protocol);
    - ``heldout-covariate`` (PerturBench's cell-type transfer): a perturbation measured at several
      levels of the primary covariate (e.g. cell types) is held out at one of them and predicted
      there. A ``fraction`` of the (condition, level) pairs whose condition is measured at two or
      more levels is the test set, never all levels of one condition; ``level`` restricts the
      pairs to that level (e.g. one cell line's perturbations); ``heldout`` names the pairs
      ("A+B@K562" or ("A+B", "K562")), which may include conditions measured at one level only
      (held out entirely, e.g. some pairs beside one cell line's perturbations). :func:`heldout_pairs` lists the pairs a split holds out.
    Validation cells are drawn at random from the cells left for training.
    """
    if kind not in SPLIT_KINDS:
        raise SamsError(f"Unknown split {kind!r}. Choose one of: {', '.join(SPLIT_KINDS)}.")
    if not 0.0 <= fraction <= 1.0:
        raise SamsError(f"Split fraction must be between 0 and 1, got {fraction}.")
    rng = np.random.default_rng(seed)
    n = data.n_cells
    split = np.full(n, TRAIN, dtype=object)
    labels = data.labels.astype(str)
    is_combo = data.n_members >= 2
    if kind == "random":
        perm = rng.permutation(n)
        n_test = int(round(test_fraction * n))
        split[perm[:n_test]] = TEST
    elif kind in ("heldout-combos", "heldout-perturbations"):
        if kind == "heldout-combos":
            candidates = sorted(set(labels[is_combo]))
            what = "combinations"
        else:
            candidates = sorted(set(labels[~data.control_mask]))
            what = "perturbations"
        if heldout is not None:
            chosen = [str(h) for h in heldout]
            unknown = [h for h in chosen if h not in candidates]
            if unknown:
                raise SamsError(
                    f"Held-out {what} not in the data: {', '.join(unknown[:5])}. "
                    f"Choose among the {len(candidates)} {what} present."
                )
        else:
            if not candidates:
                raise SamsError(
                    f"The data has no {what} to hold out. Use a random split instead."
                )
            k = max(1, int(round(fraction * len(candidates))))
            chosen = sorted(rng.choice(candidates, size=k, replace=False).tolist())
        split[np.isin(labels, chosen)] = TEST
    elif kind == "heldout-covariate":
        split[_covariate_test_cells(data, labels, fraction, rng, heldout, level)] = TEST
    elif kind == "data-efficiency":
        combo_idx = np.flatnonzero(is_combo)
        if combo_idx.size == 0:
            raise SamsError("The data has no combination cells. Use a random split instead.")
        test_part, pool = [], []
        for lab in sorted(set(labels[combo_idx])):
            cells = rng.permutation(np.flatnonzero(labels == lab))
            n_test = (cells.size + 1) // 2
            test_part.append(cells[:n_test])
            pool.append(cells[n_test:])
        split[np.concatenate(test_part)] = TEST
        pool_cells = rng.permutation(np.concatenate(pool))
        split[pool_cells[int(round(fraction * pool_cells.size)):]] = UNUSED
    rest = np.flatnonzero(split == TRAIN)
    n_val = int(round(val_fraction * rest.size))
    if n_val:
        split[rng.choice(rest, size=n_val, replace=False)] = VAL
    return split


def _pair(p: Pair) -> tuple[str, str]:
    if isinstance(p, str):
        label, sep, lvl = p.rpartition("@")
        if not sep:
            raise SamsError(f"Held-out pair {p!r} names no level. Write it as 'CONDITION@LEVEL', e.g. 'KLF1@K562'.")
        return label, lvl
    label, lvl = p
    return str(label), str(lvl)


def _covariate_test_cells(
    data: PerturbationData, labels: np.ndarray, fraction: float, rng: np.random.Generator,
    heldout: Sequence[Pair] | None, level: str | None,
) -> np.ndarray:
    """The cells of the (condition, level) pairs the heldout-covariate split holds out."""
    if not data.covariates:
        raise SamsError(
            "The heldout-covariate split holds a perturbation out in one covariate level, but this data has no "
            "covariates. Read it with covariate_keys=['cell_type'] (command line: --covariate cell_type) or pick another split."
        )
    key = data.primary_covariate
    lv = data.level_of_cells().astype(str)
    if level is not None and level not in data.levels:
        raise SamsError(f"{level!r} is not a level of {key} (levels: {', '.join(data.levels)}). Pick one of them.")
    treated = labels != "control"
    levels_of: dict[str, set[str]] = {}
    for lab, l_ in zip(labels[treated], lv[treated]):
        levels_of.setdefault(str(lab), set()).add(str(l_))
    if heldout is not None:
        chosen = [_pair(p) for p in heldout]
        for lab, l_ in chosen:
            if l_ not in levels_of.get(lab, set()):
                raise SamsError(
                    f"{lab} has no cells at {key} = {l_}, so it cannot be held out there. "
                    "Name (condition, level) pairs that the data measures."
                )
        for lab in {lab for lab, _ in chosen}:
            # a condition measured at one level only (e.g. a pair of one cell line) may be named: it is
            # then held out entirely, as by heldout-combos, so one split can test both transfer and pairs
            if len(levels_of[lab]) >= 2 and levels_of[lab] <= {l_ for c, l_ in chosen if c == lab}:
                raise SamsError(
                    f"Holding {lab} out at every level it was measured in leaves nothing to transfer from. "
                    "Keep at least one of its levels in training."
                )
    else:
        candidates = sorted(
            (lab, l_) for lab, ls in levels_of.items() if len(ls) >= 2 for l_ in ls if level is None or l_ == level
        )
        if not candidates:
            where = f" at {key} = {level}" if level is not None else ""
            raise SamsError(
                f"No perturbation is measured at two or more levels of {key}{where}, so none can be held out in one "
                "level and predicted from the others. Use heldout-perturbations or heldout-combos instead."
            )
        k = max(1, int(round(fraction * len(candidates))))
        left = {lab: set(ls) for lab, ls in levels_of.items()}
        chosen = []
        for i in rng.permutation(len(candidates)):
            lab, l_ = candidates[i]
            if len(chosen) == k:
                break
            if len(left[lab]) > 1:
                left[lab].discard(l_)
                chosen.append((lab, l_))
        chosen.sort()
    keys = set(chosen)
    return np.flatnonzero(treated & np.fromiter(((str(a), b) in keys for a, b in zip(labels, lv)), bool, len(labels)))


def heldout_pairs(data: PerturbationData, split: np.ndarray, which: str = TEST) -> list[tuple[str, str]]:
    """The (condition, level of the primary covariate) pairs with cells in split ``which``
    (controls left out); empty for a screen without covariates."""
    if not data.covariates:
        return []
    sel = (np.asarray(split) == which) & (data.labels != "control")
    lv = data.level_of_cells()
    return sorted({(str(a), str(b)) for a, b in zip(data.labels[sel], lv[sel])})
