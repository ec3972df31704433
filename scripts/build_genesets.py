#!/usr/bin/env python3
"""Build the shipped Gene Ontology gene-set files (``assets/genesets/*.gmt.gz``).

The sets come from two Debian packages of Bioconductor annotation data, read as the
SQLite files they contain (R is not needed, and nothing is installed):

* ``r-bioc-go.db``        -> ``GO.sqlite``           (GO terms, names, the term DAG)
* ``r-bioc-org.hs.eg.db`` -> ``org.Hs.eg.sqlite``   (human genes, symbols, GO annotations)

Each GO term becomes one set of human gene symbols. Annotations are *propagated*: a gene
annotated to a term also counts for every ancestor of that term (``is_a``/``part_of`` etc.,
as in GO.db). The ``go_*_all`` tables of org.Hs.eg.db already hold the propagated
annotations; when they are absent the script propagates itself with GO.db's
``go_*_offspring`` tables (and when they are present it cross-checks the two).

Usage (downloads the two packages with ``apt-get download`` into a temporary folder)::

    python scripts/build_genesets.py

or, with files already unpacked (``dpkg-deb -x PKG.deb DIR``)::

    python scripts/build_genesets.py \
        --go-sqlite DIR/usr/lib/R/site-library/GO.db/extdata/GO.sqlite \
        --orghs-sqlite DIR/usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite

The output is deterministic: sets are ordered by GO id, genes alphabetically, and the
gzip header carries no file name and ``mtime=0``, so reruns on the same inputs give
byte-identical files (README included).
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "assets" / "genesets"

GO_PACKAGE = "r-bioc-go.db"
ORGHS_PACKAGE = "r-bioc-org.hs.eg.db"
GO_SQLITE_IN_PACKAGE = "usr/lib/R/site-library/GO.db/extdata/GO.sqlite"
ORGHS_SQLITE_IN_PACKAGE = "usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite"

ONTOLOGIES = {"bp": "BP", "mf": "MF", "cc": "CC"}
ONTOLOGY_NAMES = {
    "bp": "biological process",
    "mf": "molecular function",
    "cc": "cellular component",
}
# "ND" = no biological data available: a placeholder annotation, not evidence of function.
EXCLUDED_EVIDENCE = ("ND",)


@dataclass
class SourceInfo:
    """What the README records about one input package."""

    package: str
    debian_version: str
    sqlite_path: Path
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class OntologyResult:
    """The sets built for one GO ontology."""

    key: str
    n_terms_annotated: int
    n_sets: int
    n_genes: int
    path: Path
    propagation: str
    cross_check: str = ""


# ----------------------------------------------------------------------------- inputs


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=cwd)


def download_and_unpack(workdir: Path) -> dict[str, Path]:
    """``apt-get download`` both packages into *workdir* and unpack them with ``dpkg-deb -x``.

    Runs ``apt-get update`` and retries once if the first download fails. Returns the
    ``.deb`` file of each package by package name; the trees are unpacked in
    ``workdir / "root"``.
    """
    # apt drops privileges to the _apt user for downloads; let it write here.
    os.chmod(workdir, 0o777)
    packages = [GO_PACKAGE, ORGHS_PACKAGE]
    try:
        _run(["apt-get", "download", *packages], cwd=workdir)
    except subprocess.CalledProcessError:
        _run(["apt-get", "update"])
        _run(["apt-get", "download", *packages], cwd=workdir)
    debs: dict[str, Path] = {}
    for package in packages:
        found = sorted(workdir.glob(f"{package}_*.deb"))
        if not found:
            raise SystemExit(f"apt-get download did not produce a .deb for {package}")
        debs[package] = found[-1]
        _run(["dpkg-deb", "-x", str(found[-1]), str(workdir / "root")])
    return debs


def deb_version(deb: Path) -> str:
    """The Debian version of a ``.deb`` file (``dpkg-deb -f DEB Version``)."""
    out = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def guess_debian_version(sqlite_path: Path, package: str) -> str:
    """Find the Debian version for an already-unpacked SQLite file.

    Looks for ``usr/share/doc/PACKAGE/changelog.Debian.gz`` in the tree the file was
    unpacked into, then asks ``dpkg-query`` (if the package is installed), else "unknown".
    """
    parts = sqlite_path.resolve().parts
    if "usr" in parts:
        root = Path(*parts[: len(parts) - 1 - parts[::-1].index("usr")])
        changelog = root / "usr" / "share" / "doc" / package / "changelog.Debian.gz"
        if changelog.is_file():
            with gzip.open(changelog, "rt", encoding="utf-8", errors="replace") as fh:
                first = fh.readline()
            if "(" in first and ")" in first:
                return first.split("(", 1)[1].split(")", 1)[0]
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            check=True,
            capture_output=True,
            text=True,
        )
        if out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown"


def read_metadata(con: sqlite3.Connection) -> dict[str, str]:
    """The ``metadata`` table of an AnnotationDbi SQLite file as a dict."""
    return {str(k): str(v) for k, v in con.execute("SELECT name, value FROM metadata")}


def _has_table(con: sqlite3.Connection, name: str) -> bool:
    row = con.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)
    ).fetchone()
    return row is not None


# ----------------------------------------------------------------------------- building


def go_terms(go_con: sqlite3.Connection, ontology: str) -> dict[str, str]:
    """GO id -> term name for the current (non-obsolete) terms of one ontology."""
    rows = go_con.execute(
        "SELECT go_id, term FROM go_term WHERE ontology = ?", (ONTOLOGIES[ontology],)
    )
    return {go_id: term for go_id, term in rows}


def annotations(
    org_con: sqlite3.Connection,
    go_con: sqlite3.Connection,
    ontology: str,
    use_all_table: bool = True,
) -> tuple[dict[str, set[str]], str]:
    """GO id -> set of gene symbols, with annotations propagated to all ancestors.

    Uses ``go_<ont>_all`` from org.Hs.eg.db when present (and *use_all_table*); otherwise
    propagates the direct ``go_<ont>`` annotations with GO.db's ``go_<ont>_offspring``.
    Also returns a one-line description of the source tables used.
    """
    excluded = ",".join(f"'{e}'" for e in EXCLUDED_EVIDENCE)
    sets: dict[str, set[str]] = defaultdict(set)
    all_table = f"go_{ontology}_all"
    if use_all_table and _has_table(org_con, all_table):
        query = (
            f"SELECT a.go_id, g.symbol FROM {all_table} a "
            f"JOIN gene_info g ON a._id = g._id WHERE a.evidence NOT IN ({excluded})"
        )
        for go_id, symbol in org_con.execute(query):
            sets[go_id].add(symbol)
        return sets, f"org.Hs.eg.db table {all_table} (pre-propagated)"

    direct: dict[str, set[str]] = defaultdict(set)
    query = (
        f"SELECT a.go_id, g.symbol FROM go_{ontology} a "
        f"JOIN gene_info g ON a._id = g._id WHERE a.evidence NOT IN ({excluded})"
    )
    for go_id, symbol in org_con.execute(query):
        direct[go_id].add(symbol)
    offspring_query = (
        f"SELECT t.go_id, o.go_id FROM go_{ontology}_offspring x "
        "JOIN go_term t ON x._id = t._id JOIN go_term o ON x._offspring_id = o._id"
    )
    for go_id, genes in direct.items():
        sets[go_id] |= genes
    for ancestor, child in go_con.execute(offspring_query):
        genes = direct.get(child)
        if genes:
            sets[ancestor] |= genes
    return sets, f"org.Hs.eg.db table go_{ontology} + GO.db go_{ontology}_offspring"


def gmt_text(
    sets: dict[str, set[str]], terms: dict[str, str], min_size: int, max_size: int
) -> tuple[str, int, int]:
    """GMT text for the sets of *min_size*..*max_size* genes; also the set and gene counts."""
    lines: list[str] = []
    genes_used: set[str] = set()
    for go_id in sorted(sets):
        if go_id not in terms:  # obsolete, or another ontology
            continue
        genes = sorted(sets[go_id])
        if not (min_size <= len(genes) <= max_size):
            continue
        term = " ".join(terms[go_id].split())  # no tabs or newlines in the description
        lines.append("\t".join([go_id, f"{go_id} {term}", *genes]))
        genes_used.update(genes)
    return "".join(line + "\n" for line in lines), len(lines), len(genes_used)


def write_gzip_deterministic(path: Path, text: str) -> None:
    """Write *text* gzip-compressed with no file name and mtime 0 (byte-reproducible)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


# ----------------------------------------------------------------------------- README


def _fmt_size(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def readme_text(
    go: SourceInfo,
    org: SourceInfo,
    results: list[OntologyResult],
    min_size: int,
    max_size: int,
) -> str:
    """The ``assets/genesets/README.md`` text (deterministic: no build timestamp)."""
    gm, om = go.metadata, org.metadata
    rows = "\n".join(
        f"| `{r.path.name}` | GO {ONTOLOGIES[r.key]} ({ONTOLOGY_NAMES[r.key]}) | {r.n_sets:,} "
        f"| {r.n_genes:,} | {r.n_terms_annotated:,} | {_fmt_size(r.path.stat().st_size)} |"
        for r in results
    )
    propagation = "\n".join(f"  - {ONTOLOGIES[r.key]}: {r.propagation}" for r in results)
    checks = "\n".join(
        f"  - {ONTOLOGIES[r.key]}: {r.cross_check}" for r in results if r.cross_check
    )
    if checks:
        checks = (
            "- Cross-check of the packaged propagation against propagating the direct\n"
            "  `go_<ont>` annotations with GO.db's `go_<ont>_offspring` (the fallback the\n"
            "  script uses when the `_all` tables are missing):\n" + checks + "\n"
        )
    return f"""# Shipped gene sets (Gene Ontology, human)

Gene sets for enrichment tests in SAMS Explorer, one GMT file per GO ontology, gzip
compressed. Read them with `sams_core.interpret.genesets.load_shipped("go_bp")` (or `go_mf`,
`go_cc`), or with any GMT reader after `gunzip`.

**Generated files — do not edit by hand.** Rebuild with the command at the end.

## Files

| File | Ontology | Sets | Distinct genes | GO terms with annotations (before size filter) | Size |
|---|---|---:|---:|---:|---:|
{rows}

GMT layout, one set per line, tab separated:

1. set name: the GO id, e.g. `GO:0000002`
2. description: GO id and term name, e.g. `GO:0000002 mitochondrial genome maintenance`
3. onward: human gene symbols (NCBI Gene / HGNC symbols), sorted alphabetically.

Sets are ordered by GO id.

## Sources

| Debian package | Debian version | Bioconductor package | SQLite file |
|---|---|---|---|
| `{go.package}` | `{go.debian_version}` | GO.db | `GO.sqlite` |
| `{org.package}` | `{org.debian_version}` | org.Hs.eg.db | `org.Hs.eg.sqlite` |

Read from the `metadata` tables of the SQLite files:

- GO release (ontology, `GOSOURCEDATE` in GO.db): **{gm.get("GOSOURCEDATE", "unknown")}**,
  from `{gm.get("GOSOURCEURL", "unknown")}`
- GO release used for the annotations (`GOSOURCEDATE` in org.Hs.eg.db):
  {om.get("GOSOURCEDATE", "unknown")}; gene-to-GO annotations from
  {om.get("GOEGSOURCENAME", "unknown")} (`gene2go`), dated {om.get("GOEGSOURCEDATE", "unknown")}
- Genes and symbols: {om.get("EGSOURCENAME", "unknown")}, dated
  {om.get("EGSOURCEDATE", "unknown")}; organism {om.get("ORGANISM", "unknown")}
  (taxon {om.get("TAXID", "unknown")})

## Filters and construction

- Annotations are **propagated**: a gene annotated to a term counts for every ancestor
  of that term in the GO graph (all relation types GO.db follows). Source tables:
{propagation}
{checks}- All evidence codes are kept (including electronic `IEA` annotations) except
  {", ".join(f"`{e}`" for e in EXCLUDED_EVIDENCE)} (no biological data available).
  org.Hs.eg.db has no qualifier column: negated (`NOT`) annotations are left out
  upstream (spot check on the 3.16.0 packages: AGO1/3/4, NOT-annotated to GO:0035279,
  are absent).
- Obsolete terms, and terms not in GO.db's `go_term` table for the ontology, are dropped.
- Set size: **{min_size} to {max_size} distinct gene symbols** (inclusive), counted
  before any restriction to a data set's genes. Terms with identical gene lists are kept
  as separate sets.
- Reproducible: sorted output, gzip with no file name and `mtime=0`.

## Licence

- Gene Ontology data: **CC BY 4.0** (<https://geneontology.org/docs/go-citation-policy/>).
  Cite: Ashburner et al., *Nat Genet* 2000; The Gene Ontology Consortium,
  *Nucleic Acids Res* 2023.
- NCBI Gene data (symbols, `gene2go`): public domain (NCBI).
- The Bioconductor packages GO.db and org.Hs.eg.db are Artistic-2.0; only the data
  derived from them are shipped here.

## Regenerate

```bash
python scripts/build_genesets.py            # apt-get download + dpkg-deb -x (no R needed)
# or, with already-unpacked files:
python scripts/build_genesets.py \\
    --go-sqlite DIR/{GO_SQLITE_IN_PACKAGE} \\
    --orghs-sqlite DIR/{ORGHS_SQLITE_IN_PACKAGE}
```

Options: `--min-size {min_size} --max-size {max_size} --out assets/genesets`.
"""


# ----------------------------------------------------------------------------- main


def build(
    go_sqlite: Path,
    orghs_sqlite: Path,
    out_dir: Path,
    go_version: str,
    orghs_version: str,
    min_size: int,
    max_size: int,
) -> list[OntologyResult]:
    """Write the three GMT files and the README into *out_dir*."""
    out_dir.mkdir(parents=True, exist_ok=True)
    go_con = sqlite3.connect(f"file:{go_sqlite}?mode=ro", uri=True)
    org_con = sqlite3.connect(f"file:{orghs_sqlite}?mode=ro", uri=True)
    try:
        go = SourceInfo(GO_PACKAGE, go_version, go_sqlite, read_metadata(go_con))
        org = SourceInfo(ORGHS_PACKAGE, orghs_version, orghs_sqlite, read_metadata(org_con))
        results: list[OntologyResult] = []
        for key in ONTOLOGIES:
            terms = go_terms(go_con, key)
            sets, propagation = annotations(org_con, go_con, key)
            cross_check = ""
            if propagation.endswith("(pre-propagated)"):
                # Cross-check the packaged propagation against our own.
                own, _ = annotations(org_con, go_con, key, use_all_table=False)
                n_diff = sum(
                    1 for go_id in terms if sets.get(go_id, set()) != own.get(go_id, set())
                )
                cross_check = (
                    "identical for all terms"
                    if n_diff == 0
                    else f"differs for {n_diff} terms (the go_*_all table was used)"
                )
            text, n_sets, n_genes = gmt_text(sets, terms, min_size, max_size)
            path = out_dir / f"go_{key}.gmt.gz"
            write_gzip_deterministic(path, text)
            n_annotated = sum(1 for go_id in sets if go_id in terms)
            results.append(
                OntologyResult(
                    key, n_annotated, n_sets, n_genes, path, propagation, cross_check
                )
            )
            print(
                f"{path.name}: {n_sets} sets, {n_genes} genes, {path.stat().st_size} bytes",
                file=sys.stderr,
            )
        (out_dir / "README.md").write_text(
            readme_text(go, org, results, min_size, max_size), encoding="utf-8"
        )
        return results
    finally:
        go_con.close()
        org_con.close()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="See the module docstring and assets/genesets/README.md.",
    )
    parser.add_argument("--go-sqlite", type=Path, help="GO.sqlite from r-bioc-go.db")
    parser.add_argument(
        "--orghs-sqlite", type=Path, help="org.Hs.eg.sqlite from r-bioc-org.hs.eg.db"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--min-size", type=int, default=15, help="smallest set kept")
    parser.add_argument("--max-size", type=int, default=500, help="largest set kept")
    args = parser.parse_args(argv)

    if (args.go_sqlite is None) != (args.orghs_sqlite is None):
        parser.error("give both --go-sqlite and --orghs-sqlite, or neither")
    if args.min_size < 1 or args.max_size < args.min_size:
        parser.error("need 1 <= --min-size <= --max-size")

    if args.go_sqlite is not None:
        for p in (args.go_sqlite, args.orghs_sqlite):
            if not p.is_file():
                parser.error(f"no such file: {p}")
        build(
            args.go_sqlite,
            args.orghs_sqlite,
            args.out,
            guess_debian_version(args.go_sqlite, GO_PACKAGE),
            guess_debian_version(args.orghs_sqlite, ORGHS_PACKAGE),
            args.min_size,
            args.max_size,
        )
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="sams-genesets-"))
    try:
        debs = download_and_unpack(workdir)
        root = workdir / "root"
        build(
            root / GO_SQLITE_IN_PACKAGE,
            root / ORGHS_SQLITE_IN_PACKAGE,
            args.out,
            deb_version(debs[GO_PACKAGE]),
            deb_version(debs[ORGHS_PACKAGE]),
            args.min_size,
            args.max_size,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
