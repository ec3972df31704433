"""Gene-set files and enrichment tests (sams_core.genesets)."""

from __future__ import annotations

import gzip
import io
import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from sams_core.interpret import genesets as gs
from sams_core.errors import SamsError

GMT = (
    "SET_A\tfirst set\tTP53\tMDM2\tCDKN1A\n"
    "SET_B\tsecond set\tACTB\tGAPDH\t\t\n"  # trailing empty fields are ignored
    "\n"
    "# a comment line\n"
    "SET_C\t\tMYC\tMAX\tmyc\n"  # no description; MYC/myc repeated -> kept once
)


@pytest.fixture(scope="module")
def go_bp() -> gs.GeneSetCollection:
    return gs.load_shipped("go_bp")


def toy_collection() -> gs.GeneSetCollection:
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(300)]
    sets = {f"S{j}": list(rng.choice(genes, size=int(rng.integers(5, 60)), replace=False)) for j in range(40)}
    return gs.GeneSetCollection("toy", sets, {k: f"set {k}" for k in sets})


# ------------------------------------------------------------------------------ GMT files


def check_parsed(c: gs.GeneSetCollection) -> None:
    assert list(c.sets) == ["SET_A", "SET_B", "SET_C"]
    assert c.sets["SET_A"] == ["TP53", "MDM2", "CDKN1A"]
    assert c.sets["SET_B"] == ["ACTB", "GAPDH"]
    assert c.sets["SET_C"] == ["MYC", "MAX"]
    assert c.description("SET_A") == "first set"
    assert c.description("SET_C") == ""


def test_read_gmt_plain_and_gzip(tmp_path):
    plain = tmp_path / "mine.gmt"
    plain.write_text(GMT)
    packed = tmp_path / "packed.gmt.gz"
    packed.write_bytes(gzip.compress(GMT.encode()))
    odd_name = tmp_path / "sets.txt"  # gzip detected by content, not by name
    odd_name.write_bytes(gzip.compress(GMT.encode()))
    for path, name in [(plain, "mine"), (packed, "packed"), (odd_name, "sets")]:
        c = gs.read_gmt(path)
        check_parsed(c)
        assert c.name == name
    assert gs.read_gmt(str(plain), name="custom").name == "custom"


def test_read_gmt_bytes_and_uploads():
    check_parsed(gs.read_gmt(GMT.encode()))
    check_parsed(gs.read_gmt(gzip.compress(GMT.encode())))
    upload = io.BytesIO(gzip.compress(GMT.encode()))
    upload.name = "uploaded_sets.gmt.gz"  # as a Streamlit UploadedFile has
    c = gs.read_gmt(upload)
    check_parsed(c)
    assert c.name == "uploaded_sets"
    check_parsed(gs.read_gmt(io.StringIO(GMT)))
    crlf = GMT.replace("\n", "\r\n").encode("utf-8-sig")  # Windows line ends and BOM
    check_parsed(gs.read_gmt(crlf))


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ("SET_X\tonly description", "at least 3"),
        ("SET_X only spaces TP53 MDM2", "tabs"),
        ("\tdesc\tTP53\tMDM2", "set name"),
        ("SET_A\tagain\tTP53\tMDM2", "already used on line 1"),
        ("SET_X\tdesc\t\t", "no genes"),
    ],
)
def test_read_gmt_malformed_lines(bad_line, problem):
    text = "SET_A\tfirst\tTP53\tMDM2\n\n" + bad_line + "\n"
    with pytest.raises(SamsError) as err:
        gs.read_gmt(text.encode())
    message = str(err.value)
    assert "line 3" in message
    assert problem in message


def test_read_gmt_bad_files(tmp_path):
    with pytest.raises(SamsError, match="no gene sets"):
        gs.read_gmt(b"\n\n")
    with pytest.raises(SamsError, match="gzip"):
        gs.read_gmt(gzip.compress(GMT.encode())[:30])
    with pytest.raises(SamsError, match="UTF-8"):
        gs.read_gmt(b"SET\tdesc\t\xff\xfe\n")
    with pytest.raises(SamsError, match="does not exist"):
        gs.read_gmt(tmp_path / "missing.gmt")


def test_write_gmt_round_trip(tmp_path):
    c = gs.read_gmt(GMT.encode(), name="x")
    for fname in ["out.gmt", "out.gmt.gz"]:
        path = gs.write_gmt(c, tmp_path / fname)
        back = gs.read_gmt(path)
        assert back.sets == c.sets and back.descriptions == c.descriptions
    first = (tmp_path / "out.gmt.gz").read_bytes()
    gs.write_gmt(c, tmp_path / "out.gmt.gz")
    assert (tmp_path / "out.gmt.gz").read_bytes() == first  # deterministic gzip


# ------------------------------------------------------------------------------ collection helpers


def test_collection_helpers_case_insensitive():
    c = gs.read_gmt(GMT.encode())
    model_genes = ["tp53", "Mdm2", "actb", "NOT_A_GENE"]
    assert c.coverage(model_genes) == pytest.approx(3 / 4)
    assert c.coverage(["TP53", "tp53"]) == 1.0  # one gene, counted once
    assert c.coverage([]) == 0.0
    r = c.restrict_to(model_genes, min_size=2)
    assert r.sets == {"SET_A": ["tp53", "Mdm2"]}  # spelled as in the model's genes
    assert r.descriptions == {"SET_A": "first set"}
    assert set(c.restrict_to(model_genes).sets) == {"SET_A", "SET_B"}
    assert list(c.filter_by_size(3, 3).sets) == ["SET_A"]
    assert list(c.filter_by_size(2).sets) == ["SET_A", "SET_B", "SET_C"]
    assert c.sizes().to_dict() == {"SET_A": 3, "SET_B": 2, "SET_C": 2}
    assert len(c) == 3 and "SET_C" in c.sets  # helpers did not modify c


# ------------------------------------------------------------------------------ statistics


def test_benjamini_hochberg_matches_statsmodels():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-3, size=20), [0.5, 0.5, 1.0, 0.0]])
    expected = multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(gs.benjamini_hochberg(p), expected, rtol=1e-12, atol=0)
    with_nan = np.array([0.01, np.nan, 0.04, 0.03])
    q = gs.benjamini_hochberg(with_nan)
    assert np.isnan(q[1])
    np.testing.assert_allclose(q[[0, 2, 3]], multipletests([0.01, 0.04, 0.03], method="fdr_bh")[1])
    assert gs.benjamini_hochberg([]).shape == (0,)
    with pytest.raises(SamsError):
        gs.benjamini_hochberg([0.2, 1.5])


def test_hypergeometric_matches_scipy():
    c = toy_collection()
    rng = np.random.default_rng(2)
    universe = [f"g{i}" for i in range(350)]  # lower case; G300..G349 are in no set
    selected = list(rng.choice(universe[:300], size=40, replace=False)) + ["g320", "OUTSIDE"]
    res = gs.hypergeometric_enrichment(selected, universe, c, min_size=5)

    annotated = {g.lower() for g in c.genes()} & set(universe)
    sel = set(selected) & annotated
    M, N = len(annotated), len(sel)
    assert res.attrs["n_universe"] == M and res.attrs["n_selected"] == N
    assert res.attrs["coverage"] == pytest.approx(M / 350)
    assert list(res.columns) == gs.HYPERGEOMETRIC_COLUMNS
    assert res["p"].is_monotonic_increasing
    for _, row in res.iterrows():
        members = {g.lower() for g in c.sets[row["set"]]} & annotated
        k = len(members & sel)
        assert row["n_set"] == len(members) and row["n_overlap"] == k
        assert row["p"] == pytest.approx(stats.hypergeom.sf(k - 1, M, len(members), N), rel=1e-10)
        assert row["statistic"] == pytest.approx((k / N) / (len(members) / M))
        assert set(filter(None, row["overlap"].split(";"))) == members & sel
    np.testing.assert_allclose(res["q"], multipletests(res["p"], method="fdr_bh")[1])

    # the whole universe as background
    full = gs.hypergeometric_enrichment(selected, universe, c, annotated_only=False)
    assert full.attrs["n_universe"] == 350 and full.attrs["n_selected"] == 41


def test_hypergeometric_planted_signal(go_bp):
    rng = np.random.default_rng(3)
    universe = list(rng.choice(sorted(go_bp.genes()), size=2000, replace=False))
    sizes = go_bp.restrict_to(universe).sizes()
    target = sizes[(sizes >= 30) & (sizes <= 60)].index[0]
    in_target = go_bp.restrict_to(universe).sets[target]
    selected = in_target[:20] + list(rng.choice(universe, size=30, replace=False))
    res = gs.hypergeometric_enrichment(selected, universe, go_bp)
    assert res.iloc[0]["set"] == target
    assert res.iloc[0]["q"] < 0.05
    assert res.iloc[0]["description"].startswith(target)


def test_rank_test_matches_mannwhitneyu():
    c = toy_collection()
    rng = np.random.default_rng(4)
    genes = [f"G{i}" for i in range(300)] + [f"X{i}" for i in range(50)]
    scores = pd.Series(np.round(rng.normal(size=len(genes)), 1), index=genes)  # with ties
    res = gs.rank_enrichment(scores, c, min_size=5).set_index("set")
    assert len(res) == len(c.sets)
    for name in list(c.sets)[:8]:
        inside = scores.index.isin(c.sets[name])
        ref = stats.mannwhitneyu(scores[inside], scores[~inside], alternative="two-sided", method="asymptotic")
        assert res.loc[name, "p"] == pytest.approx(ref.pvalue, rel=1e-9)
        auc = ref.statistic / (inside.sum() * (~inside).sum())
        assert res.loc[name, "statistic"] == pytest.approx(auc - 0.5)
        assert res.loc[name, "direction"] == ("up" if auc >= 0.5 else "down")
    np.testing.assert_allclose(res["q"], multipletests(res["p"], method="fdr_bh")[1])


def test_rank_enrichment_planted_signal(go_bp):
    rng = np.random.default_rng(5)
    universe = list(rng.choice(sorted(go_bp.genes()), size=2000, replace=False))
    restricted = go_bp.restrict_to(universe)
    sizes = restricted.sizes()
    candidates = list(sizes[(sizes >= 20) & (sizes <= 40)].index)
    up_set = candidates[0]
    down_set = next(s for s in candidates if not set(restricted.sets[s]) & set(restricted.sets[up_set]))
    scores = pd.Series(rng.normal(size=2000), index=[g.lower() for g in universe])
    scores[[g.lower() for g in restricted.sets[up_set]]] += 2.5
    scores[[g.lower() for g in restricted.sets[down_set]]] -= 2.5

    start = time.perf_counter()
    res = gs.rank_enrichment(scores, go_bp)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"rank test over all GO BP sets took {elapsed:.2f} s"
    assert res.attrs["coverage"] == 1.0 and res.attrs["n_sets_tested"] > 1000

    top = res.set_index("set")
    assert res.iloc[0]["set"] in {up_set, down_set}
    assert top.loc[up_set, "q"] < 0.05 and top.loc[up_set, "direction"] == "up"
    assert top.loc[down_set, "q"] < 0.05 and top.loc[down_set, "direction"] == "down"
    assert top.loc[up_set, "statistic"] > 0.3 and top.loc[down_set, "statistic"] < -0.3
    leading = top.loc[up_set, "overlap"].split(";")
    assert len(leading) == 5 and all(g in scores.index for g in leading)
    in_set_scores = scores[[g.lower() for g in restricted.sets[up_set]]]
    assert set(leading) == set(in_set_scores.nlargest(5).index)


def test_rank_enrichment_input_errors():
    c = gs.read_gmt(GMT.encode())
    with pytest.raises(SamsError, match="more than once"):
        gs.rank_enrichment(pd.Series([1.0, 2.0, 3.0], index=["TP53", "tp53", "MDM2"]), c)
    with pytest.raises(SamsError, match="human gene symbols"):
        gs.rank_enrichment(pd.Series([1.0, 2.0, 3.0], index=["ENSG1", "ENSG2", "ENSG3"]), c)
    with pytest.raises(SamsError, match="numbers"):
        gs.rank_enrichment(pd.Series(["a", "b", "c"], index=["TP53", "MDM2", "ACTB"]), c)
    with pytest.raises(SamsError, match="selected genes"):
        gs.hypergeometric_enrichment(["NOPE"], ["TP53", "MDM2"], c)


# ------------------------------------------------------------------------------ shipped files


def test_shipped_go_collections(go_bp):
    shipped = gs.shipped_collections()
    assert {"go_bp", "go_mf", "go_cc"} <= set(shipped)
    assert len(go_bp) > 3000
    sizes = go_bp.sizes()
    assert sizes.min() >= 15 and sizes.max() <= 500
    name, genes = next(iter(go_bp.sets.items()))
    assert name.startswith("GO:") and go_bp.description(name).startswith(name + " ")
    assert go_bp.coverage(["tp53", "Actb", "Gapdh", "BRCA1"]) == 1.0
    assert len(go_bp.genes()) > 10000
    with pytest.raises(SamsError, match="go_bp"):
        gs.load_shipped("kegg")
    # load_shipped returns an independent copy
    fresh = gs.load_shipped("go_bp")
    fresh.sets.clear()
    assert len(gs.load_shipped("go_bp")) > 3000
