"""The dashboard layer between the Streamlit pages and ``sams_core``: session state, the sidebar,
cached loaders, download buttons. Pages import it; ``sams_core`` never imports it or Streamlit.
"""
