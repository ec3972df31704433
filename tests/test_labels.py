"""The one grammar of condition labels: members, dosages, control words, canonical order."""

from __future__ import annotations

import numpy as np
import pytest

from sams_core.errors import SamsError
from sams_core.labels import (
    CONTROL_LABELS,
    as_dosages,
    canonical_label,
    combination_label,
    dosage_rows,
    parse_label,
    split_label,
)


def test_split_label_members_and_controls():
    assert split_label("A+B") == ["A", "B"]
    assert split_label(" B + A ") == ["B", "A"]
    assert split_label("KLF1+ctrl") == ["KLF1"]
    for word in ("control", "CTRL", "non-targeting", "NT", "DMSO", "unperturbed", ""):
        assert split_label(word) == [], word
    assert split_label("A_B|C", separators=("_", "|")) == ["A", "B", "C"]
    assert split_label("A:0.5+B") == ["A:0.5", "B"], "dosages are read by parse_label only"
    assert "dmso" in CONTROL_LABELS


def test_parse_label_reads_dosages():
    assert parse_label("KLF1+GATA1:0.5") == {"KLF1": 1.0, "GATA1": 0.5}
    assert parse_label("A+A") == {"A": 2.0}
    assert parse_label("A:0+B") == {"B": 1.0}
    assert parse_label("control") == {} and parse_label("ctrl:1") == {}
    assert parse_label("chr1:12+B", known=["chr1:12", "B"]) == {"chr1:12": 1.0, "B": 1.0}
    for bad in ("KLF1:lots", "KLF1:nan", "KLF1:inf"):
        with pytest.raises(SamsError, match="not a number"):
            parse_label(bad)


def test_every_way_of_naming_a_condition():
    assert as_dosages("A:0.5+B") == as_dosages({"A": 0.5, "B": 1, "C": 0}) == {"A": 0.5, "B": 1.0}
    assert as_dosages(["B", "A"]) == {"B": 1.0, "A": 1.0}
    assert combination_label({"SPI1": 0.5, "KLF1": 1}) == "SPI1:0.5+KLF1"
    assert combination_label("TAL1+KLF1", order=["KLF1", "TAL1"]) == "KLF1+TAL1"
    assert combination_label({}) == "control"
    assert canonical_label(["B", "A", "B"], ["A", "B"]) == "A+B" and canonical_label([], ["A"]) == "control"


def test_dosage_rows():
    rows = dosage_rows(["A+B", {"B": 0.5}, "control", "A:0.25", ["B"]], ["A", "B"])
    np.testing.assert_array_equal(rows, [[1, 1], [0, 0.5], [0, 0], [0.25, 0], [0, 1]])
    assert rows.dtype == np.float32
    with pytest.raises(SamsError, match="Unknown perturbation 'C'"):
        dosage_rows(["A+C"], ["A", "B"])
