"""App responsiveness on the shipped demo.

    python bench/app_speed.py

- cold start to first chart: from launching ``streamlit run app.py`` to the home page's
  first Plotly chart in headless Chromium (target < 5 s);
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


def browser_times() -> list[dict]:
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
                                 "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            while True:
                try:
                    urllib.request.urlopen(url + "/_stcore/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.05)
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector(".main-svg", timeout=60_000)
            rows.append({"measure": "cold start to first chart", "seconds": time.perf_counter() - t0})
            page.goto(f"{url}/Masks")
            page.wait_for_selector(".main-svg", timeout=60_000)
            switches = []
            for _ in range(3):
                t = time.perf_counter()
                page.goto(f"{url}/Masks")
                page.wait_for_selector(".main-svg", timeout=60_000)
                switches.append(time.perf_counter() - t)
            rows.append({"measure": "page switch, warm (Masks, median of 3)", "seconds": float(np.median(switches))})
        finally:
            proc.terminate()
            browser.close()
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
