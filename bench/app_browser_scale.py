"""Every page in a browser on a large screen: first chart and idle, cold and warm, and the
server's memory (issue 18's targets: warm first chart ≤ 3 s and idle ≤ 10 s, cold ≤ 20 s,
server ≤ 3 GB for one screen).

    python bench/app_scale.py --shapes replogle --scale 1 --keep /tmp/scale     # a screen and a bundle
    python bench/app_browser_scale.py --screen /tmp/scale/replogle.h5ad --bundle /tmp/scale/replogle.sams \\
        --shots /tmp/shots

A new server is started (empty cache and home folders) with ``SAMS_DATA_ROOT`` set to the
screen's folder; one headless Chromium page opens Home with the screen and the bundle named in
the URL ("Files on disk"), then visits every page through the sidebar's navigation twice. The
first round is *cold* (each page's first visit after the server started: reading the screen,
loading the model, computing and caching what the page shows), the second *warm* (the same
visit again). Per visit:

- **first chart**: from the click until a chart of the new page (not the previous page's, kept
  stale while the new one runs) is drawn, or its title for a page without charts;
- **idle**: until the app has stopped running for a second (the app's script state "notRunning",
  no placeholder left on the page).

The server's peak resident memory (``VmHWM`` of its process, training jobs not included) is
read at the end. A page still running after ``--limit`` seconds is recorded as "> limit".
``--shots DIR`` keeps a screenshot of each page after each visit.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from app_speed import _PAGE_READY, ARGS, _start_server, _wait_healthy  # noqa: E402

PAGES = ("Home", "Masks", "Latent space", "Gene programs", "Compose", "Compare", "Differential expression")

_IDLE = """() => !!document.querySelector('[data-testid="stApp"][data-test-script-state="notRunning"]')
  && !document.querySelector('[data-testid="stMain"] [data-testid="stSkeleton"]')"""


def _peak_rss_gb(pid: int) -> float:
    """Peak resident memory of process ``pid`` (VmHWM), in GB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


_TITLE = """title => { const h = document.querySelector('[data-testid="stMain"] h1'); return !!h && h.innerText.includes(title); }"""


def _visit(page, name: str, limit: float, go: str | None = None) -> dict:
    """Open page ``name`` through the sidebar (or the URL ``go``) and time it: first chart (None on
    a page that drew none) and idle (the page's title shown and the app not running for a second)."""
    title = name if name != "Home" else "SAMS Explorer"
    t0 = time.perf_counter()
    if go is not None:
        page.goto(go)
    else:
        page.locator('[data-testid="stSidebarNav"] a', has_text=name).first.click()
    first = idle = None
    quiet_since = None
    while time.perf_counter() - t0 < limit:
        now = time.perf_counter()
        if first is None and page.evaluate(_PAGE_READY, title):
            first = now - t0
        if page.evaluate(_TITLE, title) and page.evaluate(_IDLE):
            quiet_since = quiet_since or now
            if now - quiet_since >= 1.0:
                idle = quiet_since - t0
                break
        else:
            quiet_since = None
        time.sleep(0.1)
    errors = [e.inner_text()[:200] for e in page.query_selector_all('[data-testid="stException"], [data-testid="stAlertContentError"]')]
    return {"page": name, "first_chart": first, "idle": idle, "errors": errors, "charted": first is not None or idle is None}


def run(screen: Path, bundle: Path, limit: float, shots: Path | None) -> tuple[list[dict], float]:
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as home, sync_playwright() as p:
        env = dict(os.environ, SAMS_CACHE_DIR=cache, SAMS_HOME=home, SAMS_DATA_ROOT=str(screen.parent))
        proc = _start_server(port, env)
        try:
            _wait_healthy(url)
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            query = urllib.parse.urlencode({"dataset": "path", "data_path": str(screen), "model_path": str(bundle)})
            for round_name in ("cold", "warm"):
                for i, name in enumerate(PAGES):  # the first visit opens the URL with the screen and the bundle
                    r = _visit(page, name, limit, go=f"{url}/?{query}" if round_name == "cold" and i == 0 else None)
                    r["round"] = round_name
                    rows.append(r)
                    print(f"  {round_name:5s} {name:24s} first chart {_first(r, limit):>9s}  "
                          f"idle {_fmt(r['idle'], limit):>9s}  {'; '.join(r['errors'])}", flush=True)
                    if shots is not None:
                        shots.mkdir(parents=True, exist_ok=True)
                        page.screenshot(path=str(shots / f"{round_name}_{name.replace(' ', '_')}.png"))
            browser.close()
            peak = _peak_rss_gb(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return rows, peak


def _fmt(v: float | None, limit: float, none: str = "") -> str:
    return (none or f"> {limit:.0f} s") if v is None else f"{v:.1f} s"


def _first(r: dict, limit: float) -> str:
    return _fmt(r["first_chart"], limit, "" if r["charted"] else "no chart")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--screen", type=Path, required=True, help="an .h5ad screen")
    ap.add_argument("--bundle", type=Path, required=True, help="a model bundle trained on it")
    ap.add_argument("--limit", type=float, default=300.0, help="seconds a page may take before it is recorded as '> limit'")
    ap.add_argument("--shots", type=Path, default=None, help="keep a screenshot of each page visit here")
    args = ap.parse_args()
    rows, peak = run(args.screen.resolve(), args.bundle.resolve(), args.limit, args.shots)
    print(f"\nscreen {args.screen.name}, bundle {args.bundle.name}; server peak RSS {peak:.2f} GB\n")
    print("| round | page | first chart | idle | errors |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['page']} | {_first(r, args.limit)} | {_fmt(r['idle'], args.limit)} | "
              f"{'; '.join(r['errors']) or '—'} |")


if __name__ == "__main__":
    main()
