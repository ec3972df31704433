"""SAMS Explorer: the dashboard's entry point (``streamlit run app.py``).

Draws the navigation and the sidebar's screen and model choosers once for every page, so the
selection survives any page change, reload or shared URL, then runs the chosen page.
"""

from __future__ import annotations

import streamlit as st

from explorer.preload import preload, preload_models

preload()  # the modules every page needs, once per server, before any session uses them

from explorer import state as S  # noqa: E402
from explorer.nav import visible_pages  # noqa: E402
from sams_core.settings import SETTINGS  # noqa: E402

st.set_page_config(page_title="SAMS Explorer", layout="wide")
PAGES = [
    st.Page(p.path, title=p.title, icon=p.icon, default=(i == 0), **({"url_path": p.url_path} if p.url_path else {}))
    for i, p in enumerate(visible_pages(SETTINGS.read_only))  # SAMS_READ_ONLY=1: no training
]
page = st.navigation(PAGES)
if page.title not in ("Home", "Train"):  # pages that show a model: PyTorch once, under the same lock
    preload_models()
with S.drawn_sidebar(S.choose()):
    try:
        page.run()
    except Exception as e:  # noqa: BLE001 - users see a message; the traceback goes to the server log
        S.report_unexpected(e)
