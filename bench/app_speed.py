"""App responsiveness on the shipped demo.

    python bench/app_speed.py

- cold start to first chart: from launching ``streamlit run app.py`` to the home page's
  first Plotly chart in a new headless Chromium page (target < 5 s); the first start with an
  empty cache directory, then the median of later starts;
- page switch, warm: opening the Masks page a second time until its chart shows;
- compose → updated effect, warm: re-running the Compose page after choosing another
  combination (Streamlit's AppTest, script time including the predicted effect and figures;
  target < 200 ms for the prediction path).
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


def main() -> None:
    rows = browser_times() + compose_times()
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
