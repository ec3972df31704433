"""Shared fixtures: a small generated screen with known masks, written as .h5ad."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parent.parent
# the tests open screens and bundles in temporary folders, outside the working directory that a
# deployment's data root defaults to (tests/test_hostile.py checks the root itself)
os.environ.setdefault("SAMS_DATA_ROOT", "/")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _keep_main_module():
    """Streamlit's AppTest runs a page as ``__main__`` and leaves it there; processes started with
    the spawn method (torch.distributed tests) would then re-run that page instead of the test."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


def toy_screen(seed: int = 0, n_per: int = 150, n_genes: int = 60, n_latent: int = 4) -> tuple[ad.AnnData, np.ndarray]:
    """Counts from z = z_b + Σ d_t m_t e_t through a random nonlinear decoder; returns (adata, masks)."""
    rng = np.random.default_rng(seed)
    names = ["KLF1", "GATA1", "SPI1", "CEBPA", "TAL1", "RUNX1"]
    T, K, G = len(names), n_latent, n_genes
    masks = np.zeros((T, K))
    for t in range(T):
        masks[t, t % K] = 1
    emb = masks * rng.choice([-1.0, 1.0], (T, K)) * 3.0
    labels = ["control"] * (2 * n_per) + [n for n in names for _ in range(n_per)]
    labels += ["KLF1+GATA1"] * n_per + ["SPI1+CEBPA"] * n_per + ["TAL1+RUNX1"] * n_per
    N = len(labels)
    d = np.zeros((N, T))
    for i, lab in enumerate(labels):
        if lab != "control":
            for m in lab.split("+"):
                d[i, names.index(m)] = 1
    z = rng.normal(size=(N, K)) + d @ emb
    w = rng.normal(size=(K, G)) * 0.8
    logits = np.tanh(z / 2) @ w
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    lib = rng.lognormal(np.log(3000), 0.2, N)
    x = rng.poisson(p * lib[:, None]).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(x))
    a.obs["perturbation"] = labels
    a.obs["batch"] = rng.choice(["b1", "b2"], N)
    a.obs_names = [f"c{i}" for i in range(N)]
    a.var_names = [f"G{i:03d}" for i in range(G)]
    return a, masks


@pytest.fixture(scope="session")
def screen():
    return toy_screen()


@pytest.fixture(scope="session")
def screen_path(tmp_path_factory, screen):
    p = tmp_path_factory.mktemp("data") / "screen.h5ad"
    screen[0].write_h5ad(p)
    return p
