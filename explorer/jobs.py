"""Training runs as background jobs: each in its own process and its own folder, so a run outlives
page changes, reruns, closed tabs and other sessions.

A job is a folder under the runs directory (``SAMS_HOME/runs``) holding

- ``job.json``: what to train (screen, settings, family, options, split, budget) and its state
  (queued, running, done, failed, cancelled), with the process id and times;
- ``progress.jsonl``: one line per epoch (losses, seconds), read by the job list;
- ``log.txt``: the run's output; ``model.sams``: the bundle, written when the run is done.

Every file is written atomically (a temporary sibling, then a rename). Jobs of one runs directory
run one at a time (``max_parallel`` more with ``SAMS_MAX_JOBS``): a started job waits for a free
slot, taken with an exclusive file lock, so queued jobs start in turn even across server restarts.
Each job process has its own random generators, seeded from its config, so two runs with one
seed give the same model whether or not they overlap; jobs run on threads of the server
(``in_process``) train one at a time for the same reason. A read-only server
(``SAMS_READ_ONLY=1``) refuses to start jobs.
The job process is ``python -m explorer.jobs JOB_DIR``; it imports the library, never Streamlit.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sams_core.errors import SamsError
from sams_core.settings import SETTINGS

STATES = ("queued", "running", "done", "failed", "cancelled")
JOB_FILE, PROGRESS_FILE, LOG_FILE, MODEL_FILE = "job.json", "progress.jsonl", "log.txt", "model.sams"


@dataclass
class JobSpec:
    """What to train: the screen (a path), how to read it, the model and how to train it.

    ``split`` holds :class:`sams_core.pipeline.SplitSpec` fields: the same fields on the same
    screen give the same split, and ``heldout`` names the test set exactly (another model's
    recorded held-out conditions, ``explorer.train_form.same_split``), which is how a new run
    joins that model's Compare table.
    """

    name: str
    data: str
    family: str = "sams_vae"
    hparams: dict[str, Any] = field(default_factory=dict)
    data_settings: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """A job's folder and its recorded state."""

    path: Path
    spec: JobSpec
    state: str
    created: str
    pid: int | None = None
    started: str | None = None
    finished: str | None = None
    error: str | None = None

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    def progress(self) -> list[dict[str, Any]]:
        """Epoch records written so far (a torn last line, mid-write, is skipped)."""
        p = self.path / PROGRESS_FILE
        if not p.is_file():
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def log(self, tail: int = 4000) -> str:
        p = self.path / LOG_FILE
        return p.read_text(errors="replace")[-tail:] if p.is_file() else ""

    def eta_seconds(self) -> float | None:
        """Seconds left at the mean pace of the epochs so far; None before the first epoch."""
        recs = self.progress()
        if self.state != "running" or not recs:
            return None
        last = recs[-1]
        pace = sum(r.get("seconds", 0.0) for r in recs) / len(recs)
        return max(0.0, (last.get("total_epochs", last["epoch"]) - last["epoch"]) * pace)

    def alive(self) -> bool:
        """Whether the job's process is still running (a crashed process leaves a stale state)."""
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60] or "run"


def _record(job: Job) -> dict[str, Any]:
    d = asdict(job)
    d.pop("path")
    return d


def save(job: Job) -> None:
    """Write the job's state (atomically)."""
    _write_json(job.path / JOB_FILE, _record(job))


def read_job(path: str | Path) -> Job:
    """The job recorded in folder ``path``."""
    p = Path(path)
    try:
        raw = json.loads((p / JOB_FILE).read_text())
        spec = JobSpec(**raw.pop("spec"))
        job = Job(path=p, spec=spec, **raw)
    except (OSError, ValueError, TypeError) as e:
        raise SamsError(f"{p} is not a training job folder ({type(e).__name__}: {e}).") from e
    if job.state in ("queued", "running") and job.pid is not None and not job.alive():
        job.state, job.error = "failed", job.error or "The training process ended without finishing (killed?)."
    return job


def list_jobs(runs_dir: str | Path) -> list[Job]:
    """Every job under ``runs_dir``, newest first (unreadable folders are skipped)."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    jobs = []
    for d in root.iterdir():
        if (d / JOB_FILE).is_file():
            try:
                jobs.append(read_job(d))
            except SamsError:
                continue
    return sorted(jobs, key=lambda j: (j.created, j.id), reverse=True)


def create(runs_dir: str | Path, spec: JobSpec) -> Job:
    """A new queued job folder with a unique name (no run ever overwrites another)."""
    root = Path(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = root / f"{_slug(spec.name)}-{stamp}-{secrets.token_hex(2)}"
    path.mkdir()
    job = Job(path=path, spec=spec, state="queued", created=_now())
    save(job)
    return job


def submit(runs_dir: str | Path, spec: JobSpec, in_process: bool = False) -> Job:
    """Create a job and start its process (detached: it outlives the session that started it).

    ``in_process`` runs it on a thread of this process instead: for a family registered at run
    time, which a new process would not know. It then outlives page changes but not the server.
    """
    if SETTINGS.read_only:
        raise SamsError("This server is read-only (SAMS_READ_ONLY=1): it does not train. Train with the command line "
                        "(python -m sams_core train ...) and open the bundle here.")
    job = create(runs_dir, spec)
    if in_process:
        threading.Thread(target=run, args=(job.path,), kwargs={"handle_signals": False}, daemon=True).start()
        return job
    log = open(job.path / LOG_FILE, "ab")  # noqa: SIM115 - handed to the child process
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "explorer.jobs", str(job.path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent.parent, start_new_session=True,
        )
    finally:
        log.close()
    job.pid = proc.pid
    save(job)
    return job


def wait(job: Job, timeout: float = 600.0, states: tuple[str, ...] = ("done", "failed", "cancelled")) -> Job:
    """The job's record once it reaches one of ``states``; :class:`SamsError` after ``timeout`` s."""
    t0 = time.monotonic()
    while True:
        current = read_job(job.path)
        if current.state in states:
            return current
        if time.monotonic() - t0 > timeout:
            raise SamsError(f"Job {job.id} is still {current.state} after {timeout:.0f} s. Its log:\n{current.log()}")
        time.sleep(0.3)


def cancel(job: Job) -> None:
    """Stop a queued or running job; it records itself as cancelled."""
    if job.state in ("queued", "running") and job.alive():
        os.kill(job.pid, signal.SIGTERM)


def _slot(runs_dir: Path, max_parallel: int) -> int:
    """Wait for one of ``max_parallel`` run slots; returns the open, locked slot file descriptor."""
    while True:
        for k in range(max_parallel):
            fd = os.open(runs_dir / f".slot{k}.lock", os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        time.sleep(1.0)


class _Cancelled(Exception):
    pass


_IN_PROCESS = threading.Lock()


def run(job_dir: str | Path, max_parallel: int | None = None, handle_signals: bool = True) -> int:
    """Run the job in ``job_dir`` in this process: wait for a slot, train, save; exit code.

    With ``handle_signals`` (the job's own process) SIGTERM cancels the run.
    """
    from sams_core.data.screen import read_h5ad
    from sams_core.io.bundle import save_bundle
    from sams_core.pipeline import SplitSpec, train_bundle
    from sams_core.training.trainer import TrainConfig

    job = read_job(job_dir)
    job.pid = os.getpid() if handle_signals else None
    save(job)

    def on_term(signum, frame):  # noqa: ARG001
        raise _Cancelled()

    if handle_signals:
        signal.signal(signal.SIGTERM, on_term)
    n = max_parallel or int(os.environ.get("SAMS_MAX_JOBS", "1"))
    try:
        fd = _slot(job.path.parent, max(1, n))
    except _Cancelled:
        job.state, job.finished = "cancelled", _now()
        save(job)
        return 1
    try:
        job.state, job.started = "running", _now()
        save(job)
        spec = job.spec
        data = read_h5ad(spec.data, **spec.data_settings)
        progress_path = job.path / PROGRESS_FILE

        def progress(rec) -> None:
            with open(progress_path, "a") as f:
                f.write(json.dumps(rec.as_dict()) + "\n")

        split_spec = SplitSpec(**spec.split)
        # a job on a thread of this process shares PyTorch's random generators with any other such
        # job: they train one at a time, so a seed gives the same model whatever else runs
        with _IN_PROCESS if not handle_signals else contextlib.nullcontext():
            bundle, _, _ = train_bundle(
                data, spec.family, split_spec, TrainConfig(**spec.config), out=None, progress=progress, **spec.hparams,
            )
        bundle.manifest["run"] = {"name": spec.name, "id": job.id, "created": job.created}
        save_bundle(job.model_path, bundle.model, bundle.manifest)  # atomic: a temporary sibling, renamed
        job.state = "done"
        return 0
    except _Cancelled:
        job.state = "cancelled"
        return 1
    except SamsError as e:
        job.state, job.error = "failed", str(e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - recorded for the job list, with the traceback in the log
        import traceback

        traceback.print_exc()
        job.state, job.error = "failed", f"{type(e).__name__}: {e}"
        return 3
    finally:
        job.finished = _now()
        save(job)
        os.close(fd)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
