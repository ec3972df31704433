"""The data-efficiency split scores every fraction on the same test cells."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sams_core.data.screen import from_anndata
from sams_core.data.splits import TEST, UNUSED, make_split


def test_data_efficiency_test_set_is_fixed_across_fractions(screen):
    data = from_anndata(screen[0])
    combo = data.n_members >= 2
    fractions = (0.0, 0.1, 0.5, 1.0)
    splits = {f: make_split(data, "data-efficiency", fraction=f, seed=3) for f in fractions}
    test = splits[0.1] == TEST
    for f, s in splits.items():
        np.testing.assert_array_equal(s == TEST, test, err_msg=f"the test set moved at fraction {f}")
        trained = np.isin(s, ["train", "val"]) & combo
        assert not (trained & test).any()
        pool = combo & ~test
        assert trained[pool].mean() == pytest.approx(f, abs=0.01), "fraction of the non-test combination cells trained"
        assert ((s == UNUSED) == (pool & ~trained)).all(), "combination cells neither trained nor tested are unused"
    # half of each combination's cells is test; singles and controls never are
    for lab in set(data.labels[combo]):
        cells = data.labels == lab
        assert test[cells].sum() == (cells.sum() + 1) // 2
    assert not test[~combo].any()
    # a larger fraction adds cells: the trained combination cells are nested
    used = [np.isin(splits[f], ["train", "val"]) & combo for f in fractions]
    for small, large in itertools.pairwise(used):
        assert (large | ~small).all()
    # another seed draws another test set
    assert not np.array_equal(make_split(data, "data-efficiency", fraction=0.5, seed=4) == TEST, test)
