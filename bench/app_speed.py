"""App responsiveness on the shipped demo.

    python bench/app_speed.py

- cold start to first chart: from launching ``streamlit run app.py`` to the home page's
  first Plotly chart in a new headless Chromium page (target < 5 s); the first start with an
  empty cache directory, then the median of later starts;
- page switch, warm: opening the Masks page a second time until its chart shows (a reload of
  its URL);
- page switch through the sidebar, warm: after the first load, clicking the sidebar's links
  Masks → Home → Masks … (the app's own navigation, no reload) until the new page's title and a
  chart of that page (not the previous page's, kept stale while the next one runs) show;
- compose → updated effect, warm: re-running the Compose page after choosing another
  combination (Streamlit's AppTest, script time including the predicted effect and figures;
  target < 200 ms for the prediction path);
- export PNG, warm: ``sams_core.plots.figure_bytes`` of the demo's mask heatmap, the first call
  (starts Kaleido's browser) and later calls (target < 1 s);
- job submission to first progress: ``explorer.jobs.submit`` of a tiny training job (CPA-VAE,
  2 epochs, on the simulated demo) until its first epoch record is written (a new process:
  Python, PyTorch, the screen, one epoch), and until it is done.

    python bench/app_speed.py --only export,jobs    # the parts without a browser
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _start_server(port: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def _wait_healthy(url: str) -> None:
    while True:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=1)
            return
        except OSError:
            time.sleep(0.05)


def browser_times(starts: int = 5) -> list[dict]:
    """Cold starts (new server, new browser page) into an empty cache directory, then warm page switches."""
    import os
    import tempfile

    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    rows = []
    with tempfile.TemporaryDirectory() as cache, sync_playwright() as p:
        env = dict(os.environ, SAMS_CACHE_DIR=cache)  # the first start reads the screen, later ones its cached counts
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        colds = []
        for i in range(starts):
            t0 = time.perf_counter()
            proc = _start_server(port, env)
            try:
                _wait_healthy(url)
                page = browser.new_page()
                page.goto(url)
                page.wait_for_selector(".main-svg", timeout=60_000)
                colds.append(time.perf_counter() - t0)
                if i == starts - 1:
                    page.goto(f"{url}/Masks")
                    page.wait_for_selector(".main-svg", timeout=60_000)
                    switches = []
                    for _ in range(3):
                        t = time.perf_counter()
                        page.goto(f"{url}/Masks")
                        page.wait_for_selector(".main-svg", timeout=60_000)
                        switches.append(time.perf_counter() - t)
                page.close()
            finally:
                proc.terminate()
                proc.wait()
            time.sleep(2)  # let the stopped server's process go before the next start
        browser.close()
    rows.append({"measure": "cold start to first chart, first start (empty cache)", "seconds": colds[0]})
    rows.append({"measure": f"cold start to first chart, later starts (median of {starts - 1})", "seconds": float(np.median(colds[1:]))})
    rows.append({"measure": "page switch, warm (Masks, median of 3)", "seconds": float(np.median(switches))})
    return rows


# the new page's title shows and one of its charts is drawn outside elements Streamlit keeps
# stale (the previous page's) while the new page runs
_PAGE_READY = """title => {
  const h = document.querySelector('[data-testid="stMain"] h1');
  if (!h || !h.innerText.includes(title)) return false;
  return [...document.querySelectorAll('[data-testid="stMain"] .main-svg')]
    .some(e => !e.closest('[data-stale="true"]'));
}"""


def sidebar_switch_times(switches: int = 6) -> list[dict]:
    """Warm page switches through the sidebar's links (no reload): Masks and Home in turn."""
    import os
    import tempfile

    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    times: dict[str, list[float]] = {"Masks": [], "Home": []}
    titles = {"Masks": "Masks", "Home": "SAMS Explorer"}  # the link's text, the page's title
    with tempfile.TemporaryDirectory() as cache, sync_playwright() as p:
        proc = _start_server(port, dict(os.environ, SAMS_CACHE_DIR=cache))
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        try:
            _wait_healthy(url)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_function(_PAGE_READY, arg=titles["Home"], timeout=120_000)
            for i in range(switches + 2):  # the first visit of each page is not warm
                name = ("Masks", "Home")[i % 2]
                t = time.perf_counter()
                page.locator('[data-testid="stSidebarNav"] a', has_text=name).first.click()
                page.wait_for_function(_PAGE_READY, arg=titles[name], timeout=120_000)
                if i >= 2:
                    times[name].append(time.perf_counter() - t)
                page.wait_for_timeout(300)
        finally:
            browser.close()
            proc.terminate()
            proc.wait()
    return [{"measure": f"page switch through the sidebar, warm ({n}, median of {len(v)})", "seconds": float(np.median(v))}
            for n, v in times.items()]


def export_times(warm: int = 3) -> list[dict]:
    """PNG export of a page's figure: the first call, then later ones (one Kaleido browser kept)."""
    from sams_core import plots
    from sams_core.demo import DEMOS
    from sams_core.io.bundle import load_bundle

    b = load_bundle(DEMOS["simulated"].bundle_paths()["sams_vae_correlated"])
    fig = plots.mask_heatmap(b.mask_probabilities(), b.mask_rows)
    t = time.perf_counter()
    first = plots.figure_bytes(fig, "png")
    cold = time.perf_counter() - t
    times = []
    for _ in range(warm):
        t = time.perf_counter()
        out = plots.figure_bytes(fig, "png")
        times.append(time.perf_counter() - t)
    assert first[:4] == out[:4] == b"\x89PNG"
    return [{"measure": "export PNG, first in the process (starts Kaleido's browser)", "seconds": cold},
            {"measure": f"export PNG, warm (mask heatmap, median of {warm})", "seconds": float(np.median(times))}]


def job_times(runs: int = 2) -> list[dict]:
    """A tiny training job from submission to its first progress record, and to done."""
    import tempfile

    from explorer import jobs
    from sams_core.demo import DEMOS

    firsts, dones = [], []
    with tempfile.TemporaryDirectory() as runs_dir:
        for i in range(runs):
            spec = jobs.JobSpec(name=f"bench{i}", data=str(DEMOS["simulated"].data_path), family="cpa_vae",
                                hparams={"n_latent": 3, "n_hidden": 16}, split={"kind": "heldout-combos", "seed": 0},
                                config={"epochs": 2, "seed": 0, "batch_size": 256})
            t = time.perf_counter()
            job = jobs.submit(runs_dir, spec)
            while not job.progress():
                if jobs.read_job(job.path).state in ("failed", "cancelled"):
                    raise RuntimeError(jobs.read_job(job.path).log())
                if time.perf_counter() - t > 300:
                    raise RuntimeError("no progress after 300 s")
                time.sleep(0.02)
            firsts.append(time.perf_counter() - t)
            done = jobs.wait(job, timeout=300)
            dones.append(time.perf_counter() - t)
            assert done.state == "done", done.log()
    return [{"measure": f"job submission to first progress (tiny run, median of {runs})", "seconds": float(np.median(firsts))},
            {"measure": f"job submission to done (2 epochs and the quick evaluation, median of {runs})", "seconds": float(np.median(dones))}]


def compose_times() -> list[dict]:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "pages" / "4_Compose.py"), default_timeout=120).run()
    times = []
    for combo in (["GATA1", "SPI1"], ["KLF1", "TAL1"], ["CEBPA", "FLI1"], ["IKZF1", "RUNX1"]):
        t = time.perf_counter()
        at.multiselect(key="w_compose_members").set_value(combo).run()
        times.append(time.perf_counter() - t)
    assert not at.exception
    return [{"measure": "compose → updated effect page, warm (median of 4)", "seconds": float(np.median(times))}]


PARTS = {"browser": browser_times, "sidebar": sidebar_switch_times, "compose": compose_times, "export": export_times, "jobs": job_times}


def main() -> None:
    import argparse
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    parts = [x.strip() for x in ap.parse_args().only.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}: choose among {', '.join(PARTS)}")
    rows = [r for part in parts for r in PARTS[part]()]
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
