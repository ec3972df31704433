"""SAMS Explorer: the dashboard's front door (``streamlit run app.py``)."""

from __future__ import annotations

import streamlit as st

import sams_core

st.set_page_config(page_title="SAMS Explorer", layout="wide")
st.title("SAMS Explorer")
st.caption(f"sams_core {sams_core.__version__}")
st.write("Sparse-mechanism-shift models of single-cell perturbation screens.")
