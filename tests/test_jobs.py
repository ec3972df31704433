"""Training jobs run in their own process and folder, outlive their session, queue, cancel."""

from __future__ import annotations

import time

from explorer import jobs
from sams_core.io.bundle import load_bundle


def _wait(job, states=("done", "failed", "cancelled")):
    return jobs.wait(job, timeout=240, states=states)


def _spec(path, name="toy", epochs=2, **kw):
    return jobs.JobSpec(name=name, data=str(path), family="cpa_vae", hparams={"n_latent": 3, "n_hidden": 16},
                        split={"kind": "heldout-combos", "fraction": 0.34, "seed": 0}, config={"epochs": epochs, "seed": 0}, **kw)


def test_a_job_trains_in_its_own_process_and_saves_its_bundle(tmp_path, screen_path):
    job = jobs.submit(tmp_path, _spec(screen_path))
    done = _wait(job)
    assert done.state == "done", done.log()
    assert [r["epoch"] for r in done.progress()] == [1, 2]
    assert done.model_path.is_file()  # one .sams file, not a folder
    b = load_bundle(done.model_path)
    assert b.manifest["run"]["name"] == "toy" and b.family == "cpa_vae"
    assert not list(done.path.glob(".partial*"))


def test_same_names_never_overwrite_and_jobs_queue_one_at_a_time(tmp_path, screen_path):
    a = jobs.submit(tmp_path, _spec(screen_path, epochs=3))
    b = jobs.submit(tmp_path, _spec(screen_path, epochs=3))
    assert a.path != b.path
    seen_both_running = False
    t0 = time.time()
    while time.time() - t0 < 240:
        states = {j.id: j.state for j in jobs.list_jobs(tmp_path)}
        seen_both_running |= list(states.values()).count("running") == 2
        if all(s in ("done", "failed") for s in states.values()):
            break
        time.sleep(0.2)
    assert not seen_both_running
    assert [j.state for j in jobs.list_jobs(tmp_path)] == ["done", "done"]
    # the same seed gives the same model whether or not the runs overlapped
    assert load_bundle(a.path / "model.sams").checksum() == load_bundle(b.path / "model.sams").checksum()


def test_cancel_and_a_failure_are_recorded(tmp_path, screen_path):
    job = jobs.submit(tmp_path, _spec(screen_path, epochs=500))
    j = _wait(job, states=("running",))
    while not j.progress():
        time.sleep(0.2)
    jobs.cancel(j)
    assert _wait(job).state == "cancelled"
    bad = jobs.submit(tmp_path, _spec(tmp_path / "missing.h5ad", name="bad"))
    failed = _wait(bad)
    assert failed.state == "failed" and "missing.h5ad" in failed.error
