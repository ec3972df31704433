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


def test_home_draws_without_pytorch():
    """The first page a user sees never waits for PyTorch (cold start, DESIGN §6)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom streamlit.testing.v1 import AppTest\n"
        f"at = AppTest.from_file({APP!r}, default_timeout=60).run()\n"
        "assert not at.exception, at.exception\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


def test_loading_a_model_starts_importing_umap_in_the_background():
    """The first model loaded starts umap-learn's slow import on a thread of its own, so the first
    Latent space visit finds it ready; a page that needs it waits for that import, not a second one."""
    import subprocess
    import sys

    code = (
        "import sys, threading\nfrom explorer import preload\n"
        "preload.preload_models()\n"
        "names = [t.name for t in threading.enumerate()]\n"
        "preload.preload_umap()\n"
        "print('preload-umap' in names, 'umap' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(APP).parent)
    assert out.stdout.strip().splitlines()[-1] == "True True", out.stderr[-2000:]
