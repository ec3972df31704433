"""SAMS Explorer: the dashboard's entry point (``streamlit run app.py``).

Draws the navigation and the sidebar's screen and model choosers once for every page, so the
selection survives any page change, reload or shared URL, then runs the chosen page.
"""

from __future__ import annotations

import streamlit as st

from explorer.preload import preload, preload_models

preload()  # the modules every page needs, once per server, before any session uses them

from explorer import state as S  # noqa: E402
from sams_core.settings import SETTINGS  # noqa: E402

st.set_page_config(page_title="SAMS Explorer", layout="wide")
PAGES = [
    st.Page("pages/0_Home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/1_Masks.py", title="Masks", icon=":material/grid_on:"),
    st.Page("pages/2_Latent_space.py", title="Latent space", icon=":material/scatter_plot:", url_path="Latent_space"),
    st.Page("pages/3_Gene_programs.py", title="Gene programs", icon=":material/genetics:", url_path="Gene_programs"),
    st.Page("pages/4_Compose.py", title="Compose", icon=":material/join:"),
    st.Page("pages/5_Compare.py", title="Compare", icon=":material/leaderboard:"),
    st.Page("pages/6_Train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/7_Differential_expression.py", title="Differential expression", icon=":material/volcano:",
            url_path="Differential_expression"),
]
if SETTINGS.read_only:  # SAMS_READ_ONLY=1: a shared deployment without training
    PAGES = PAGES[:-1]
page = st.navigation(PAGES)
if page.title not in ("Home", "Train"):  # pages that show a model: PyTorch once, under the same lock
    preload_models()
with S.drawn_sidebar(S.choose()):
    try:
        page.run()
    except Exception as e:  # noqa: BLE001 - users see a message; the traceback goes to the server log
        S.report_unexpected(e)
