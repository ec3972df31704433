"""The app starts and shows the library it runs on."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

import sams_core

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def test_home_renders_with_version():
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value == "SAMS Explorer"
    assert sams_core.__version__ in at.caption[0].value
