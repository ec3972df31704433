"""Gene sets (GMT files) and enrichment tests for interpreting a model's genes.

A *gene set collection* is a named mapping from set names to lists of gene symbols, as in
the GMT format (one set per line: ``name<TAB>description<TAB>gene1<TAB>gene2...``). The
project ships Gene Ontology collections built by ``scripts/build_genesets.py`` in
``assets/genesets/`` (see the README there for sources, release and licence).

Two tests are offered:

* :func:`hypergeometric_enrichment` — over-representation of a *selected* list of genes
  (e.g. the genes a latent factor loads on) among the genes of each set, relative to a
  *universe* (the genes the model measured). One-sided hypergeometric test.
* :func:`rank_enrichment` — a rank test that uses the whole score vector (e.g. a factor's
  loadings for all genes): are the scores of the genes in a set shifted up or down
  relative to the other genes? Two-sided Wilcoxon rank-sum / Mann-Whitney U test with the
  normal approximation, tie and continuity corrections (as ``scipy.stats.mannwhitneyu``
  with ``method="asymptotic"``), vectorised over all sets at once.

Both adjust for the number of sets tested with Benjamini-Hochberg (:func:`benjamini_hochberg`).

Gene symbols are matched **case-insensitively** everywhere (``"Actb"`` matches ``"ACTB"``),
and results report the symbols as spelled in the caller's genes. Each result table
carries in ``DataFrame.attrs`` the coverage (fraction of the caller's genes found in any
set of the collection) and the numbers of genes and sets used, so that a low coverage
(e.g. Ensembl ids against symbol sets) can be shown to the user.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from sams_core.errors import SamsError
from sams_core.settings import SETTINGS

__all__ = [
    "HYPERGEOMETRIC_COLUMNS",
    "RANK_COLUMNS",
    "GeneSetCollection",
    "GmtSource",
    "benjamini_hochberg",
    "hypergeometric_enrichment",
    "load_shipped",
    "rank_enrichment",
    "read_gmt",
    "shipped_collections",
    "write_gmt",
]

#: Folder of the shipped GMT files (outside the package, at the repository root).
SHIPPED_DIR = SETTINGS.genesets_dir

#: What :func:`read_gmt` accepts: a path, raw bytes (e.g. an upload), or an open file.
GmtSource = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | IO[str]

HYPERGEOMETRIC_COLUMNS = [
    "set",
    "description",
    "n_set",
    "n_selected",
    "n_overlap",
    "statistic",
    "p",
    "q",
    "overlap",
]
RANK_COLUMNS = ["set", "description", "n_set", "statistic", "z", "p", "q", "direction", "overlap"]

_GZIP_MAGIC = b"\x1f\x8b"


def _key(symbol: str) -> str:
    """The case-insensitive matching key of a gene symbol."""
    return str(symbol).strip().casefold()


def _gmt_suffixless(name: str) -> str:
    """``"go_bp.gmt.gz"`` -> ``"go_bp"``."""
    for suffix in (".gz", ".gmt", ".txt"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


# ---------------------------------------------------------------------------------------------
# collections


@dataclass
class GeneSetCollection:
    """A named collection of gene sets.

    Attributes:
        name: the collection's name (e.g. ``"go_bp"``), shown in results.
        sets: set name -> gene symbols (order kept, no duplicates).
        descriptions: set name -> free-text description (GMT column 2), e.g.
            ``"GO:0006915 apoptotic process"``. Sets without an entry have none.

    Methods never modify the collection; they return new ones.
    """

    name: str
    sets: dict[str, list[str]]
    descriptions: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        """Number of sets."""
        return len(self.sets)

    def description(self, set_name: str) -> str:
        """The description of *set_name*, or ``""`` when it has none."""
        return self.descriptions.get(set_name, "")

    def sizes(self) -> pd.Series:
        """Number of genes of each set, indexed by set name."""
        return pd.Series({k: len(v) for k, v in self.sets.items()}, dtype=int, name="n_genes")

    def genes(self) -> set[str]:
        """All gene symbols of all sets, as spelled in the collection."""
        return {g for genes in self.sets.values() for g in genes}

    def filter_by_size(self, min_size: int = 1, max_size: int | None = None) -> GeneSetCollection:
        """The sets with ``min_size <= size <= max_size`` genes (no upper bound if None)."""
        upper = np.inf if max_size is None else max_size
        keep = {k: list(v) for k, v in self.sets.items() if min_size <= len(v) <= upper}
        return self._with_sets(keep)

    def restrict_to(self, genes: Iterable[str], min_size: int = 1) -> GeneSetCollection:
        """The collection restricted to a gene universe.

        Each set keeps only the genes found in *genes* (matched case-insensitively), spelled
        as in *genes*; sets left with fewer than *min_size* genes are dropped.
        """
        spelling = _spelling(genes)
        keep: dict[str, list[str]] = {}
        for set_name, members in self.sets.items():
            seen: dict[str, None] = {}
            for g in members:
                hit = spelling.get(_key(g))
                if hit is not None:
                    seen.setdefault(hit, None)
            if len(seen) >= min_size:
                keep[set_name] = list(seen)
        return self._with_sets(keep)

    def coverage(self, genes: Iterable[str]) -> float:
        """Fraction of *genes* (e.g. a model's genes) found in any set, case-insensitively.

        Distinct genes are counted once; 0.0 for an empty list.
        """
        keys = {_key(g) for g in genes}
        if not keys:
            return 0.0
        known = {_key(g) for g in self.genes()}
        return len(keys & known) / len(keys)

    def _with_sets(self, sets: dict[str, list[str]]) -> GeneSetCollection:
        descriptions = {k: v for k, v in self.descriptions.items() if k in sets}
        return GeneSetCollection(self.name, sets, descriptions)

    def copy(self) -> GeneSetCollection:
        """An independent copy (lists and dicts copied)."""
        return self._with_sets({k: list(v) for k, v in self.sets.items()})


def _spelling(genes: Iterable[str]) -> dict[str, str]:
    """Matching key -> the first spelling of that gene in *genes*."""
    out: dict[str, str] = {}
    for g in genes:
        out.setdefault(_key(g), str(g).strip())
    return out


# ---------------------------------------------------------------------------------------------
# GMT input / output


def _read_source(source: GmtSource) -> tuple[bytes, str]:
    """The raw bytes of *source* and a default collection name."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "uploaded"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise SamsError(
                f"Gene-set file {str(path)!r} does not exist. "
                "Give the path of a .gmt or .gmt.gz file."
            )
        return path.read_bytes(), _gmt_suffixless(path.name)
    if hasattr(source, "read"):
        data = source.read()
        if isinstance(data, str):
            data = data.encode("utf-8")
        name = getattr(source, "name", None)
        default = _gmt_suffixless(Path(name).name) if isinstance(name, str) and name else "uploaded"
        return bytes(data), default
    raise SamsError(
        f"Cannot read gene sets from a {type(source).__name__}. "
        "Give a file path, the file's bytes, or an open file."
    )


def read_gmt(source: GmtSource, name: str | None = None) -> GeneSetCollection:
    """Read a GMT file, plain or gzip-compressed, into a :class:`GeneSetCollection`.

    Args:
        source: a path, the file's bytes (e.g. an upload), or an open file (text or binary;
            an object with a ``name`` attribute, such as a Streamlit upload, names the
            collection). Gzip is detected by its magic bytes, not by the file name.
        name: the collection's name; by default the file name without ``.gmt``/``.gz``
            (``"uploaded"`` for bytes).

    Each non-blank line is ``name<TAB>description<TAB>gene1<TAB>gene2...``; blank lines and
    lines starting with ``#`` are skipped, empty gene fields (trailing tabs) are ignored and
    repeated genes within a set kept once (case-insensitively).

    Raises:
        SamsError: for a file that cannot be decompressed or decoded, a line with fewer than
            three tab-separated fields or no genes, an empty set name, a set name used twice,
            or a file with no sets. The message names the line number, the problem and the fix.
    """
    data, default_name = _read_source(source)
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise SamsError(
                f"The gene-set file looks gzip-compressed but cannot be decompressed ({exc}). "
                "Upload the complete .gmt.gz file, or the uncompressed .gmt."
            ) from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SamsError(
            f"The gene-set file is not UTF-8 text (byte {exc.start}). "
            "Save it as a plain-text (UTF-8) or gzip-compressed GMT file."
        ) from exc

    sets: dict[str, list[str]] = {}
    descriptions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in raw.split("\t")]
        if len(fields) < 3:
            hint = (
                " The line has no tabs: GMT fields must be separated by tabs, not spaces."
                if len(fields) == 1
                else ""
            )
            raise SamsError(
                f"Gene-set file, line {lineno}: {len(fields)} tab-separated field(s), "
                "but a GMT line needs at least 3 (set name, description, genes...)."
                f"{hint} Fix the line, or delete it."
            )
        set_name, description, genes = fields[0], fields[1], fields[2:]
        if not set_name:
            raise SamsError(
                f"Gene-set file, line {lineno}: the set name (first field) is empty. "
                "Give every set a name in the first tab-separated field."
            )
        if set_name in first_line:
            raise SamsError(
                f"Gene-set file, line {lineno}: set name {set_name!r} is already used on "
                f"line {first_line[set_name]}. Rename one of the two sets, or merge them."
            )
        members: dict[str, str] = {}
        for g in genes:
            if g:
                members.setdefault(_key(g), g)
        if not members:
            raise SamsError(
                f"Gene-set file, line {lineno}: set {set_name!r} lists no genes. "
                "Add its genes after the description, separated by tabs, or delete the line."
            )
        first_line[set_name] = lineno
        sets[set_name] = list(members.values())
        if description:
            descriptions[set_name] = description
    if not sets:
        raise SamsError(
            "The gene-set file holds no gene sets. A GMT file has one set per line: "
            "name<TAB>description<TAB>gene1<TAB>gene2..."
        )
    return GeneSetCollection(name or default_name, sets, descriptions)


def write_gmt(collection: GeneSetCollection, path: str | os.PathLike[str]) -> Path:
    """Write *collection* as a GMT file (gzip-compressed when the name ends in ``.gz``).

    Sets keep their order; the gzip header has no time stamp, so the same collection always
    gives the same bytes. Returns the path written.
    """
    lines = []
    for set_name, genes in collection.sets.items():
        description = collection.descriptions.get(set_name, "")
        fields = [set_name, description, *genes]
        if any("\t" in f or "\n" in f or "\r" in f for f in fields):
            raise SamsError(
                f"Set {set_name!r} has a tab or line break in its name, description or genes, "
                "which GMT cannot hold. Remove it before writing."
            )
        lines.append("\t".join(fields) + "\n")
    data = "".join(lines).encode("utf-8")
    out = Path(path)
    if out.name.lower().endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
            gz.write(data)
        data = buf.getvalue()
    out.write_bytes(data)
    return out


# ---------------------------------------------------------------------------------------------
# shipped collections


def shipped_collections() -> dict[str, Path]:
    """The GMT files shipped in ``assets/genesets/``, by name (e.g. ``"go_bp"``), sorted.

    Empty when the folder is missing.
    """
    if not SHIPPED_DIR.is_dir():
        return {}
    files = sorted(p for p in SHIPPED_DIR.iterdir() if p.name.endswith((".gmt", ".gmt.gz")))
    return {_gmt_suffixless(p.name): p for p in files}


_SHIPPED_CACHE: dict[tuple[str, float], GeneSetCollection] = {}


def load_shipped(name: str) -> GeneSetCollection:
    """Load a shipped collection by name (``"go_bp"``, ``"go_mf"`` or ``"go_cc"``).

    Parsed files are cached; each call returns an independent copy.

    Raises:
        SamsError: for a name that is not shipped (the message lists those that are).
    """
    available = shipped_collections()
    if name not in available:
        listed = ", ".join(available) or "none (assets/genesets/ is missing)"
        raise SamsError(
            f"No shipped gene-set collection {name!r}. Available: {listed}. "
            "Or upload a GMT file."
        )
    path = available[name]
    key = (str(path), path.stat().st_mtime)
    if key not in _SHIPPED_CACHE:
        _SHIPPED_CACHE[key] = read_gmt(path, name=name)
    return _SHIPPED_CACHE[key].copy()


# ---------------------------------------------------------------------------------------------
# statistics


def benjamini_hochberg(p: Iterable[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (false-discovery-rate adjusted p-values).

    ``q_i = min_{j: p_j >= p_i} min(1, p_j * m / rank_j)`` over the *m* non-missing
    p-values; the output has the input's shape, with NaN where the input is NaN.

    Raises:
        SamsError: for p-values outside [0, 1].
    """
    arr = np.asarray(p, dtype=float)
    flat = arr.ravel()
    q = np.full(flat.shape, np.nan)
    ok = ~np.isnan(flat)
    vals = flat[ok]
    if np.any((vals < 0) | (vals > 1)):
        raise SamsError("p-values must lie between 0 and 1; check where they were computed.")
    m = vals.size
    if m:
        order = np.argsort(vals, kind="mergesort")
        scaled = vals[order] * m / np.arange(1, m + 1)
        adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
        out = np.empty(m)
        out[order] = np.minimum(adjusted, 1.0)
        q[ok] = out
    return q.reshape(arr.shape)


def _membership(
    collection: GeneSetCollection, index: Mapping[str, int], n_genes: int
) -> tuple[list[str], sp.csr_matrix]:
    """Set names and a sets × genes 0/1 matrix over the genes of *index* (key -> column)."""
    names: list[str] = []
    indptr = [0]
    indices: list[int] = []
    for set_name, members in collection.sets.items():
        cols = {index[k] for k in (_key(g) for g in members) if k in index}
        names.append(set_name)
        indices.extend(sorted(cols))
        indptr.append(len(indices))
    data = np.ones(len(indices), dtype=np.float64)
    matrix = sp.csr_matrix(
        (data, np.asarray(indices, dtype=np.int64), np.asarray(indptr, dtype=np.int64)),
        shape=(len(names), n_genes),
    )
    return names, matrix


def _no_match_error(collection: GeneSetCollection, n_genes: int, example: list[str]) -> SamsError:
    shown = ", ".join(example[:3])
    return SamsError(
        f"None of the {n_genes} genes (e.g. {shown}) match a gene of the collection "
        f"{collection.name!r}. The shipped GO sets use human gene symbols (e.g. TP53); "
        "convert Ensembl or other ids to symbols, or upload gene sets that use your ids."
    )


def hypergeometric_enrichment(
    selected_genes: Iterable[str],
    universe: Iterable[str],
    collection: GeneSetCollection,
    *,
    min_size: int = 5,
    max_size: int | None = None,
    annotated_only: bool = True,
) -> pd.DataFrame:
    """Over-representation of *selected_genes* in each set: one-sided hypergeometric test.

    Args:
        selected_genes: the genes of interest (e.g. the top genes of a latent factor).
            Genes outside the universe are ignored.
        universe: all genes that could have been selected (e.g. the model's genes).
        collection: the gene sets.
        min_size, max_size: test only sets with this many genes *in the universe*.
        annotated_only: if True (the usual choice, as in topGO or clusterProfiler), the
            universe and the selection are first restricted to genes found in at least one
            set of the collection, so that unannotated genes do not inflate the enrichment.

    With ``M`` universe genes, ``N`` selected, a set of ``n`` universe genes and ``k`` of
    them selected, ``p = P(X >= k)`` for ``X ~ Hypergeom(M, n, N)``
    (``scipy.stats.hypergeom.sf(k - 1, M, n, N)``).

    Returns:
        One row per tested set, sorted by p: ``set``, ``description``, ``n_set`` (set genes
        in the universe), ``n_selected`` (N), ``n_overlap`` (k), ``statistic`` (fold
        enrichment ``(k/N) / (n/M)``), ``p``, ``q`` (Benjamini-Hochberg over the tested
        sets), ``overlap`` (the selected genes of the set, ``;``-joined, spelled as in the
        universe). ``attrs`` holds ``coverage`` (fraction of universe genes in any set),
        ``n_universe`` (M), ``n_selected`` (N), ``n_sets_tested`` and ``collection``.

    Raises:
        SamsError: if no universe gene matches the collection, or no selected gene is in
            the (annotated) universe.
    """
    spelling = _spelling(universe)
    if not spelling:
        raise SamsError("The gene universe is empty; pass the genes the model measured.")
    annotated = {_key(g) for g in collection.genes()}
    coverage = len(spelling.keys() & annotated) / len(spelling)
    if coverage == 0:
        raise _no_match_error(collection, len(spelling), list(spelling.values()))
    keys = [k for k in spelling if (k in annotated or not annotated_only)]
    index = {k: i for i, k in enumerate(keys)}
    selected_keys = {_key(g) for g in selected_genes} & index.keys()
    if not selected_keys:
        raise SamsError(
            "None of the selected genes is in the gene universe"
            + (" among the genes annotated in the collection" if annotated_only else "")
            + ". Select genes from the model's genes (matching is case-insensitive)."
        )
    M, N = len(keys), len(selected_keys)
    selected = np.zeros(M)
    selected[[index[k] for k in selected_keys]] = 1.0

    names, member = _membership(collection, index, M)
    n_set = np.asarray(member.sum(axis=1)).ravel().astype(int)
    upper = np.inf if max_size is None else max_size
    tested = np.flatnonzero((n_set >= max(min_size, 1)) & (n_set <= upper))
    member = member[tested]
    n_set = n_set[tested]
    k = np.asarray(member @ selected).ravel().round().astype(int)

    p = stats.hypergeom.sf(k - 1, M, n_set, N) if tested.size else np.zeros(0)
    p = np.clip(p, 0.0, 1.0)
    fold = (k / N) / (n_set / M) if tested.size else np.zeros(0)
    overlaps = []
    for row in range(len(tested)):
        cols = member.indices[member.indptr[row] : member.indptr[row + 1]]
        hits = sorted(spelling[keys[c]] for c in cols if selected[c])
        overlaps.append(";".join(hits))
    out = pd.DataFrame(
        {
            "set": [names[i] for i in tested],
            "description": [collection.description(names[i]) for i in tested],
            "n_set": n_set,
            "n_selected": np.full(len(tested), N, dtype=int),
            "n_overlap": k,
            "statistic": fold,
            "p": p,
            "q": benjamini_hochberg(p),
            "overlap": overlaps,
        },
        columns=HYPERGEOMETRIC_COLUMNS,
    )
    out = out.sort_values(["p", "statistic", "set"], ascending=[True, False, True], kind="mergesort")
    out = out.reset_index(drop=True)
    out.attrs.update(
        coverage=coverage,
        n_universe=M,
        n_selected=N,
        n_sets_tested=int(len(tested)),
        collection=collection.name,
    )
    return out


def rank_enrichment(
    scores: pd.Series,
    collection: GeneSetCollection,
    min_size: int = 5,
    max_size: int | None = None,
    n_leading: int = 5,
) -> pd.DataFrame:
    """Are the scores of each set's genes shifted relative to all other genes? (rank test)

    A two-sided Wilcoxon rank-sum (Mann-Whitney U) test of the in-set against the
    out-of-set scores, for every set at once: with ranks of all scores (ties averaged),
    ``U = R_set - n(n+1)/2`` where ``R_set`` is the sum of the in-set ranks and ``n`` the set
    size; the p-value uses the normal approximation with tie and continuity corrections,
    which equals ``scipy.stats.mannwhitneyu(in_set, out_set, method="asymptotic")``.

    Args:
        scores: one score per gene (e.g. a factor's loadings or a perturbation effect),
            indexed by gene symbol; NaN scores are dropped.
        collection: the gene sets.
        min_size, max_size: test only sets with this many scored genes (and at least one
            scored gene outside the set).
        n_leading: how many leading genes to list in ``overlap``.

    Returns:
        One row per tested set, sorted by p: ``set``, ``description``, ``n_set`` (scored
        genes in the set), ``statistic`` (signed effect size ``AUC - 0.5`` in [-0.5, 0.5],
        where ``AUC = U / (n_in * n_out)`` is the probability that a random in-set gene
        scores above a random out-of-set gene, ties counting half), ``z`` (standardised U
        without continuity correction), ``p``, ``q`` (Benjamini-Hochberg), ``direction``
        (``"up"`` when the set's scores are higher, else ``"down"``), ``overlap`` (the set's
        *n_leading* highest-scoring genes for "up", lowest for "down", ``;``-joined).
        ``attrs`` holds ``coverage`` (fraction of scored genes in any set), ``n_genes``,
        ``n_sets_tested`` and ``collection``.

    Raises:
        SamsError: for non-numeric scores, a gene listed twice (case-insensitively), fewer
            than 3 scored genes, or no scored gene matching the collection.
    """
    if not isinstance(scores, pd.Series):
        scores = pd.Series(scores)
    try:
        values_all = pd.to_numeric(scores, errors="raise").to_numpy(dtype=float)
    except (TypeError, ValueError) as exc:
        raise SamsError(
            "Gene scores must be numbers (one per gene, indexed by gene symbol)."
        ) from exc
    keep = ~np.isnan(values_all)
    genes = [str(g).strip() for g in scores.index[keep]]
    values = values_all[keep]
    keys = [_key(g) for g in genes]
    if len(set(keys)) != len(keys):
        dup = pd.Series(keys)
        examples = sorted({genes[i] for i in np.flatnonzero(dup.duplicated(keep=False).to_numpy())})
        raise SamsError(
            f"Genes scored more than once (case-insensitively): {', '.join(examples[:5])}. "
            "Give one score per gene (e.g. average duplicates first)."
        )
    n_total = len(keys)
    if n_total < 3:
        raise SamsError("The rank test needs scores for at least 3 genes.")
    annotated = {_key(g) for g in collection.genes()}
    coverage = len(set(keys) & annotated) / n_total
    if coverage == 0:
        raise _no_match_error(collection, n_total, genes)

    index = {k: i for i, k in enumerate(keys)}
    names, member = _membership(collection, index, n_total)
    n_in = np.asarray(member.sum(axis=1)).ravel().astype(int)
    upper = np.inf if max_size is None else max_size
    tested = np.flatnonzero((n_in >= max(min_size, 1)) & (n_in <= upper) & (n_in < n_total))
    member = member[tested]
    n1 = n_in[tested].astype(float)
    n2 = n_total - n1

    ranks = stats.rankdata(values)  # average ranks for ties
    rank_sum = np.asarray(member @ ranks).ravel()
    u1 = rank_sum - n1 * (n1 + 1) / 2
    mu = n1 * n2 / 2
    _, tie_counts = np.unique(values, return_counts=True)
    tie_term = float(np.sum(tie_counts.astype(float) ** 3 - tie_counts))
    n = float(n_total)
    sigma = np.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u1 - mu) / sigma
        z_cc = (np.abs(u1 - mu) - 0.5) / sigma  # two-sided, continuity-corrected
    p = np.clip(2 * stats.norm.sf(z_cc), 0.0, 1.0)
    p[sigma == 0] = 1.0  # all scores tied: no evidence either way
    z[sigma == 0] = 0.0
    effect = u1 / (n1 * n2) - 0.5 if tested.size else np.zeros(0)
    direction = np.where(effect >= 0, "up", "down")

    # leading genes: position of each gene in descending score order
    position = np.empty(n_total, dtype=np.int64)
    position[np.argsort(-values, kind="mergesort")] = np.arange(n_total)
    leading = []
    for row in range(len(tested)):
        cols = member.indices[member.indptr[row] : member.indptr[row + 1]]
        ordered = cols[np.argsort(position[cols], kind="mergesort")]
        top = ordered[:n_leading] if direction[row] == "up" else ordered[::-1][:n_leading]
        leading.append(";".join(genes[c] for c in top))

    out = pd.DataFrame(
        {
            "set": [names[i] for i in tested],
            "description": [collection.description(names[i]) for i in tested],
            "n_set": n1.astype(int),
            "statistic": effect,
            "z": z,
            "p": p,
            "q": benjamini_hochberg(p),
            "direction": direction,
            "overlap": leading,
        },
        columns=RANK_COLUMNS,
    )
    out["_abs"] = out["statistic"].abs()
    out = out.sort_values(["p", "_abs", "set"], ascending=[True, False, True], kind="mergesort")
    out = out.drop(columns="_abs").reset_index(drop=True)
    out.attrs.update(
        coverage=coverage,
        n_genes=n_total,
        n_sets_tested=int(len(tested)),
        collection=collection.name,
    )
    return out
