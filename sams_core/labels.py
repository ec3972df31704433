"""Condition labels: the one grammar of "A+B", "A:0.5+B" and the control words (DESIGN §4).

A label names a condition by its members joined by a separator (``+`` by default; ``_`` or ``|``
when a screen is read with other ``separators``). A member may carry a dosage after a colon
(``KLF1:0.5``; 1 when absent): people asking for predictions write these, screens on disk hold
plain member names. Control words (control, ctrl, non-targeting, NT, DMSO, ... in any case) name
the condition without members, alone or as a member (``KLF1+ctrl`` is ``KLF1``).

A condition's canonical label joins its members with ``+`` in the order of the perturbation list
(``"GATA1+KLF1"``), ``"control"`` when it has none; :func:`dosage_rows` turns labels, member lists
or ``{name: dosage}`` into the dosage rows the models take.

This module sits on the lowest floor with :mod:`sams_core.errors`: the simulators, the data
reader, the interpretation and the command line all read labels through it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np

from sams_core.errors import SamsError

__all__ = [
    "CONTROL",
    "CONTROL_LABELS",
    "MAX_DOSAGE",
    "SEPARATORS",
    "Combination",
    "as_dosages",
    "canonical_label",
    "check_dosage",
    "combination_label",
    "control_words",
    "dosage_rows",
    "parse_label",
    "perturbation_order",
    "split_label",
]

#: The canonical label of the control condition.
CONTROL = "control"

#: Labels that mean "no perturbation" (lower case; compared case-insensitively).
CONTROL_LABELS: frozenset[str] = frozenset(
    s.lower()
    for s in ("control", "ctrl", "non-targeting", "nontargeting", "non_targeting", "NT", "DMSO", "unperturbed", "")
)

#: Separators of combination members unless a screen names others.
SEPARATORS: tuple[str, ...] = ("+",)

#: A condition as callers give it: a label ("A+B", "A:0.5+B"), a member list, or {name: dosage}.
Combination = str | Mapping[str, float] | Sequence[str]


def control_words(labels: Iterable[str] | None = None) -> frozenset[str]:
    """The control words to use: ``labels`` lower-cased, or :data:`CONTROL_LABELS` when None."""
    return CONTROL_LABELS if labels is None else frozenset(str(s).lower() for s in labels)


def split_label(
    label: str, separators: Sequence[str] = SEPARATORS, controls: Collection[str] = CONTROL_LABELS
) -> list[str]:
    """The members of a label as written, in order, control words dropped ([] for a control).

    ``split_label("A+B") == ["A", "B"]``; ``split_label("KLF1+ctrl") == ["KLF1"]``. Dosages are
    not read (``"A:0.5"`` stays one member): see :func:`parse_label`.
    """
    s = str(label).strip()
    if s.lower() in controls:
        return []
    pattern = "|".join(re.escape(sep) for sep in separators)
    parts = (p.strip() for p in re.split(pattern, s))
    return [p for p in parts if p and p.lower() not in controls]


def parse_label(
    label: str, known: Collection[str] = (), separators: Sequence[str] = SEPARATORS
) -> dict[str, float]:
    """The members of a label with their dosages: ``"A:0.5+B"`` → ``{"A": 0.5, "B": 1.0}``.

    A member named in ``known`` is taken whole (a perturbation whose name holds a colon);
    otherwise the text after its last colon is the dosage. Repeated members add up, members
    with dosage 0 are dropped, and a control gives ``{}``. Raises :class:`SamsError` for a
    dosage that is not a finite number.
    """
    out: dict[str, float] = {}
    for part in split_label(label, separators):
        name, dose = part, ""
        if part not in known:
            head, colon, tail = part.rpartition(":")
            if colon:
                name, dose = head.strip(), tail.strip()
        if name.lower() in CONTROL_LABELS:
            continue
        try:
            value = float(dose) if dose else 1.0
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise SamsError(f"Dosage {dose!r} in {label!r} is not a number. Write NAME:DOSE, e.g. KLF1:0.5.")
        out[name] = out.get(name, 0.0) + check_dosage(name, value)
    return {k: v for k, v in out.items() if v != 0.0}


#: The largest dosage a prediction may ask for: a member at dosage 1 is the perturbation as
#: measured; far beyond it the models extrapolate without data, so larger values are refused.
MAX_DOSAGE = 10.0


def check_dosage(name: str, value: float) -> float:
    """``value`` once it is a dosage between 0 and :data:`MAX_DOSAGE`; SamsError otherwise."""
    if not math.isfinite(value) or not 0.0 <= value <= MAX_DOSAGE:
        raise SamsError(
            f"Dosage {value:g} of {name!r} is outside 0 to {MAX_DOSAGE:g}: 1 is the perturbation as measured, "
            f"0 leaves it out, and the models do not extrapolate further. Give a dosage between 0 and {MAX_DOSAGE:g}."
        )
    return value


def as_dosages(combo: Combination, known: Collection[str] = ()) -> dict[str, float]:
    """Any way of naming a condition as ``{member: dosage}`` (zero dosages dropped).

    A string is parsed as a label (:func:`parse_label`, with ``known`` perturbation names), a
    mapping is read as dosages, any other sequence lists members at dosage 1 (repeats add up).
    """
    if isinstance(combo, str):
        return parse_label(combo, known)
    out: dict[str, float] = {}
    items = combo.items() if isinstance(combo, Mapping) else ((m, 1.0) for m in combo)
    for name, dose in items:
        out[str(name)] = out.get(str(name), 0.0) + check_dosage(str(name), float(dose))
    return {k: v for k, v in out.items() if v != 0.0}


def combination_label(combo: Combination, order: Sequence[str] | None = None) -> str:
    """A readable label of a condition: ``"A+B"``, with dosages other than 1 as ``"A:0.5"``.

    Members keep the order they are given in, or follow ``order`` (a perturbation list) when
    given, so that a condition at unit dosages gets its canonical label. ``"control"`` when
    it has no member.
    """
    d = as_dosages(combo, order or ())
    if not d:
        return CONTROL
    names = list(d)
    if order is not None:
        pos = {p: i for i, p in enumerate(order)}
        names.sort(key=lambda m: pos.get(m, len(pos)))
    return "+".join(m if d[m] == 1.0 else f"{m}:{d[m]:g}" for m in names)


def perturbation_order(perturbations: Sequence[str]) -> dict[str, int]:
    """``{name: position}`` of a perturbation list, to pass to :func:`canonical_label` when many
    labels are made against the same list (built once instead of once per label)."""
    return {p: i for i, p in enumerate(perturbations)}


def canonical_label(members: Iterable[str], perturbations: Sequence[str] | Mapping[str, int]) -> str:
    """The canonical label of a set of members: joined by ``+`` in the order of ``perturbations``
    (unknown members last), ``"control"`` when there are none.

    ``perturbations`` is the perturbation list or its :func:`perturbation_order` (faster when
    the same list orders many labels).
    """
    ms = set(members)
    if not ms:
        return CONTROL
    order = perturbations if isinstance(perturbations, Mapping) else perturbation_order(perturbations)
    return "+".join(sorted(ms, key=lambda m: (order.get(m, len(order)), m)))


def dosage_rows(combos: Sequence[Combination], perturbations: Sequence[str]) -> np.ndarray:
    """Dosage rows (conditions × ``perturbations``, float32) of conditions given as labels
    ("A+B", "A:0.5+B"), member lists or ``{name: dosage}``.

    Raises :class:`SamsError` naming any perturbation the model does not know.
    """
    index = {p: i for i, p in enumerate(perturbations)}
    rows = np.zeros((len(combos), len(perturbations)), dtype=np.float32)
    for r, combo in enumerate(combos):
        for name, dose in as_dosages(combo, index).items():
            if name not in index:
                raise SamsError(
                    f"Unknown perturbation {name!r}: the model knows {len(index)} perturbations "
                    f"(e.g. {', '.join(list(index)[:5])}). Pick names from the model's list."
                )
            rows[r, index[name]] += np.float32(dose)
    return rows
