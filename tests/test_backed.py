"""Training from a backed .h5ad: rows read in chunks, same API and data contract as in memory."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sams_core.data.backed import BackedMatrix, BackedPerturbationData, read_h5ad_backed
from sams_core.data.batches import ChunkedSource
from sams_core.data.splits import TRAIN, make_split
from sams_core.data.screen import PerturbationData, read_h5ad
from sams_core.errors import SamsError
from sams_core.simulate import simulate_sams_screen
from sams_core.training.trainer import TrainConfig, train

CHUNK = 32
HP = dict(n_latent=4, n_hidden=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one thread avoids losing time to thread hand-offs on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sim_path(tmp_path_factory):
    a = simulate_sams_screen(n_perturbations=6, n_latent=4, n_genes=40, n_combinations=4, cells_per_perturbation=40, seed=1)
    p = tmp_path_factory.mktemp("backed") / "sim.h5ad"
    a.write_h5ad(p)
    return p


@pytest.fixture(scope="module")
def backed(sim_path):
    return read_h5ad_backed(sim_path, chunk_size=CHUNK)


def test_backed_reads_like_memory(sim_path, backed):
    mem = read_h5ad(sim_path)
    assert isinstance(backed, BackedPerturbationData) and isinstance(backed.X, BackedMatrix)
    assert not sp.issparse(backed.X) and backed.settings["backed"]
    assert backed.n_cells == mem.n_cells > 4 * CHUNK and backed.n_genes == mem.n_genes
    assert backed.is_counts and backed.settings["counts_source"] == mem.settings["counts_source"]
    np.testing.assert_allclose(backed.library, mem.library)
    assert (backed.dosages != mem.dosages).nnz == 0 and list(backed.labels) == list(mem.labels)
    assert backed.perturbations == mem.perturbations and backed.genes == mem.genes
    assert backed.checksum() == mem.checksum()
    rows = np.array([7, 3, 300, 3, mem.n_cells - 1])
    assert abs(backed.X[rows] - mem.X[rows]).max() == 0
    cols = np.array([5, 0, 9])
    assert abs(backed.X[:, cols][rows] - mem.X[:, cols][rows]).max() == 0
    with pytest.raises(SamsError, match="n_top_genes"):
        read_h5ad_backed(sim_path, n_top_genes=10)


def test_chunked_order_visits_every_cell_once_with_sequential_chunks(backed):
    idx = np.arange(backed.n_cells)[::2][: 7 * CHUNK]  # 7 full chunks, buffers of 2 chunks
    src = ChunkedSource(backed.X, idx, backed.dosages, backed.library, np.full(backed.n_cells, -1), torch.device("cpu"), CHUNK, 2)
    order = src.order(src.generator(0)).numpy()
    assert np.array_equal(np.sort(order), np.arange(idx.size))
    # each run of 2 chunks' worth of positions comes from exactly 2 chunks (one shuffle buffer)
    buf = 2 * CHUNK
    for s in range(0, idx.size, buf):
        assert len(set(order[s : s + buf] // CHUNK)) == min(2, (idx.size - s) // CHUNK)
    assert not np.array_equal(order, np.arange(idx.size))
    b = src.batch(torch.as_tensor(order[:50]))
    np.testing.assert_array_equal(b.x.numpy(), backed.X[idx[order[:50]]].toarray())


def test_trains_from_backed_file(backed, monkeypatch):
    split = make_split(backed, "random", seed=0)
    train_rows = np.flatnonzero(split == TRAIN)
    assert train_rows.size > 4 * CHUNK
    # record every training cell that fit() asks for, and how often chunks are read
    sources: list[ChunkedSource] = []
    seen: list[np.ndarray] = []
    init, batch = ChunkedSource.__init__, ChunkedSource.batch

    def spy_init(self, *a, **kw):
        init(self, *a, **kw)
        sources.append(self)

    def spy_batch(self, idx):
        if self is sources[0] and idx is not None:
            seen.append(self.rows[idx.numpy()])
        return batch(self, idx)

    monkeypatch.setattr(ChunkedSource, "__init__", spy_init)
    monkeypatch.setattr(ChunkedSource, "batch", spy_batch)
    epochs = 6
    model, res = train(backed, "sams_vae", split, TrainConfig(epochs=epochs, batch_size=48, lr=3e-3, chunks_per_buffer=2, device="cpu"), **HP)
    assert len(sources) == 2  # training and validation cells, both read from the file
    tr = sources[0]
    assert tr.n == train_rows.size and tr.n_chunks > 4
    per_epoch = np.concatenate(seen).reshape(epochs, -1)
    for rows in per_epoch:  # every training cell exactly once per epoch
        assert np.array_equal(np.sort(rows), train_rows)
    assert not np.array_equal(per_epoch[0], per_epoch[1])  # reshuffled each epoch
    assert tr.chunk_reads <= epochs * tr.n_chunks  # each chunk read at most once per epoch
    losses = [h.train_loss for h in res.history]
    assert losses[-1] < losses[0] and res.history[-1].val_loss < res.history[0].val_loss
    assert all(np.isfinite(losses))


def test_backed_bundle_evaluates_and_matches_memory_checksum(sim_path, backed):
    from sams_core.pipeline import SplitSpec, train_bundle

    bundle, res, ev = train_bundle(
        backed, "cpa_vae", SplitSpec("heldout-combos", 0.5, seed=0), TrainConfig(epochs=2, batch_size=64, device="cpu", shards=2),
        None, None, True, n_ate_samples=100, **HP,
    )
    assert bundle.manifest["data"]["checksum"] == read_h5ad(sim_path).checksum()
    assert ev is not None and "test" in ev.metrics.index and np.isfinite(ev.metrics.loc["test"].to_numpy(dtype=float)).any()


def test_chunked_flag_on_memory_data_matches_device_data_when_one_chunk(sim_path):
    # one chunk holding all training cells: the chunked source is the in-memory path with
    # another shuffle; both must train and the flag must be honoured
    mem = read_h5ad(sim_path)
    split = make_split(mem, "random", seed=0)
    _, res = train(mem, "vae", split, TrainConfig(epochs=2, batch_size=64, chunked=True, chunk_size=10_000, device="cpu"), **HP)
    assert len(res.history) == 2 and np.isfinite(res.history[-1].train_loss)


def test_refuses_column_wise_matrix(tmp_path, sim_path):
    import anndata as ad

    a = ad.read_h5ad(sim_path)
    del a.layers["counts"]
    a.X = sp.csc_matrix(a.X)
    p = tmp_path / "csc.h5ad"
    a.write_h5ad(p)
    with pytest.raises(SamsError, match="CSC"):
        read_h5ad_backed(p)


def _malformed_files(tmp_path):
    import anndata as ad
    import pandas as pd

    def write(name, x, labels=("control", "A", "B", "A+B"), var_names=None, layers=None):
        a = ad.AnnData(x)
        a.obs["perturbation"] = list(labels)
        if var_names is not None:
            a.var_names = var_names
        for k, v in (layers or {}).items():
            a.layers[k] = v
        p = tmp_path / f"{name}.h5ad"
        a.write_h5ad(p)
        return p

    ones = np.ones((4, 3), dtype=np.float32)
    return {
        "No control cells": write("nocontrol", ones, labels=("A", "A", "B", "A+B")),
        "NaN": write("nan", np.array([[1, np.nan, 1]] * 4, dtype=np.float32)),
        "negative counts": write("negative", sp.csr_matrix(-ones)),
        "zero total counts": write("empty", np.array([[1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=np.float32)),
        "Duplicated gene names": write("dup", ones, var_names=pd.Index(["g", "g", "h"])),
        "only control cells": write("onlyctrl", ones, labels=("control",) * 4),
        "non-integer values": write("layer", ones, layers={"counts": ones * 0.5}),
    }


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_backed_and_memory_readers_refuse_the_same_files_with_the_same_message(tmp_path):
    for expected, path in _malformed_files(tmp_path).items():
        messages = []
        for reader in (read_h5ad, read_h5ad_backed):
            with pytest.raises(SamsError, match=expected) as err:
                reader(path)
            messages.append(str(err.value))
        assert messages[0] == messages[1], expected


def test_backed_subsets(sim_path, backed):
    mem = read_h5ad(sim_path)
    genes = mem.genes[5:12]
    g = backed.subset(genes=genes)
    assert isinstance(g, BackedPerturbationData) and isinstance(g.X, BackedMatrix) and g.genes == genes
    np.testing.assert_allclose(g.library, mem.subset(genes=genes).library)
    rows = np.array([9, 2, 40])
    c = backed.subset(cells=rows)
    assert type(c) is PerturbationData and not c.settings["backed"] and backed.settings["backed"]
    assert abs(c.X - mem.X[rows]).max() == 0 and list(c.labels) == list(mem.labels[rows])
    assert type(backed.to_memory()) is PerturbationData and backed.to_memory().checksum() == mem.checksum()
