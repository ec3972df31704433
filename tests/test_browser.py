"""End to end in headless Chromium: every page renders its charts with no error box.

Needs Debian's chromium at /usr/bin/chromium (``.ci/run`` installs it); skipped without it.
Screenshots go to ``$SAMS_SCREENSHOTS`` (default: a temporary folder).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
PAGES = [("", True), ("Masks", True), ("Latent_space", True), ("Gene_programs", True), ("Compose", True), ("Compare", True), ("Train", False)]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")


def _launch(playwright):
    """Debian's Chromium, headless, with nothing that reaches the network."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    env = {**os.environ, "SAMS_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "SAMS_HOME": str(tmp_path_factory.mktemp("home"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(60):
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the Streamlit server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_every_page_renders_charts(server, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("SAMS_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = _launch(p)
        try:
            for name, has_chart in PAGES:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{server}/{name}", wait_until="networkidle")
                if has_chart:
                    page.wait_for_selector(".main-svg", timeout=180_000)
                else:
                    page.wait_for_selector("h1", timeout=60_000)
                page.wait_for_timeout(1000)
                page.screenshot(path=str(shots / f"{name or 'home'}.png"))
                assert not page.query_selector_all('[data-testid="stException"]'), f"{name or 'home'} shows an exception"
                assert not page.query_selector_all('[data-testid="stAlertContentError"]'), f"{name or 'home'} shows an error"
                page.close()
        finally:
            browser.close()


def test_selection_survives_navigation(server):
    """Choose a model on Home, then go round the sidebar's links: the model stays chosen on every
    page (Streamlit forgets keyed widgets a page does not draw; the entry script draws them)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server, wait_until="networkidle")
            page.wait_for_selector(".main-svg", timeout=180_000)
            page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first.click()
            page.get_by_role("option", name="cpa_vae").click()
            page.get_by_text("CPA-VAE").first.wait_for(timeout=60_000)
            for _ in range(2):
                for name in ("Masks", "Latent space", "Compose", "Home"):
                    page.locator('[data-testid="stSidebarNav"] a', has_text=name).first.click()
                    page.wait_for_selector("h1", timeout=60_000)
                    page.get_by_text("CPA-VAE").first.wait_for(timeout=240_000)
                    assert "model=cpa_vae" in page.url, (name, page.url)
                    assert not page.query_selector_all('[data-testid="stException"]'), name
        finally:
            browser.close()


def test_own_screen_end_to_end(server, tmp_path, screen):
    """A screen of one's own, with no model: open it by path, train from the Train page, leave
    and come back while it trains, pick the finished model, then visit every page: no error box."""
    from playwright.sync_api import sync_playwright

    from sams_core.interpret.genesets import load_shipped

    adata, _ = screen
    adata = adata.copy()
    adata.var_names = sorted(load_shipped("go_bp").genes())[: adata.n_vars]  # real human gene symbols
    path = tmp_path / "mine.h5ad"
    adata.write_h5ad(path)
    shots = Path(os.environ.get("SAMS_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)

    def errors(page) -> list[str]:
        return [e.inner_text()[:300] for e in page.query_selector_all('[data-testid="stException"], [data-testid="stAlertContentError"]')]

    def go(page, name: str) -> None:
        page.locator('[data-testid="stSidebarNav"] a', has_text=name).first.click()
        page.wait_for_selector("h1", timeout=120_000)
        page.wait_for_timeout(1500)

    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server, wait_until="networkidle")
            page.wait_for_selector("h1", timeout=120_000)
            page.get_by_text("Files on disk").click()
            box = page.get_by_label("Data (.h5ad path)")
            box.fill(str(path))
            box.press("Enter")
            page.get_by_text("No model for this screen yet").wait_for(timeout=120_000)
            assert not errors(page)
            go(page, "Train")
            page.get_by_label("Epochs").fill("3")
            page.get_by_label("Epochs").press("Enter")
            page.wait_for_timeout(1000)
            page.get_by_role("button", name="Start training").click()
            page.get_by_text("Training jobs").wait_for(timeout=60_000)
            for name in ("Home", "Masks", "Home"):  # leaving the page does not stop the run
                go(page, name)
            go(page, "Train")
            page.get_by_text("Done: choose").wait_for(timeout=300_000)
            page.screenshot(path=str(shots / "own_train.png"))
            page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first.click()
            page.get_by_role("option").first.click()
            page.wait_for_timeout(2000)
            for name in ("Home", "Masks", "Latent space", "Gene programs", "Compose", "Compare", "Train"):
                go(page, name)
                if name not in ("Train",):
                    page.wait_for_selector(".main-svg", timeout=240_000)
                page.screenshot(path=str(shots / f"own_{name.replace(' ', '_')}.png"))
                assert not errors(page), (name, errors(page))
                assert "dataset=path" in page.url, (name, page.url)
        finally:
            browser.close()
