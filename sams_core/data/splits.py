"""Train / validation / test assignments of a screen's cells (DESIGN §3 splits).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sams_core.data.screen import PerturbationData
from sams_core.errors import SamsError

SPLIT_KINDS: tuple[str, ...] = (
    "random",
    "heldout-combos",
    "data-efficiency",
    "heldout-perturbations",
)


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
    heldout: Sequence[str] | None = None,
) -> np.ndarray:
    """Assign every cell to "train", "val" or "test" (a seeded split of DESIGN §3; "unused" below).

    - ``random``: cells at random, ``test_fraction`` test and ``val_fraction`` validation;
    - ``heldout-combos``: a ``fraction`` of the combinations (or the labels in ``heldout``) is
      never seen in training: their cells form the test set; singles and controls are trained;
    - ``data-efficiency``: half of each combination's cells is the test set, drawn from the seed
      alone so that every ``fraction`` is scored on the same cells; a ``fraction`` of the other
      half reaches training (nested: a larger fraction adds cells), the rest is ``"unused"``;
    - ``heldout-perturbations``: a ``fraction`` of the perturbation labels (or ``heldout``) is
      the test set (the sVAE+ out-of-domain protocol).
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
