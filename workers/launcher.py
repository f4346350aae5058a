"""`difftpt-ops worker`: one solo-pool Celery worker process per GPU, kept alive by a small supervisor.

Each child is `python -m celery -A workers.celery_app worker -P solo --prefetch-multiplier 1`, named
`difftpt@<host>-gpu<i>` (or `-cpu`), with CUDA_VISIBLE_DEVICES set in its environment before it starts,
so torch in the child sees exactly its GPU as cuda:0 and the supervisor never touches CUDA. A child
that dies is restarted with a growing delay; SIGTERM or SIGINT stops the children with Celery's warm
shutdown (the running shard stores its finished samples and is re-queued) and exits 0.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from difftpt_ops.config import Settings
from difftpt_ops.core.errors import InputError

QUEUES = ("generate", "tune")  # as workers.celery_app.QUEUES; not imported so the supervisor stays light
REPO_ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.5
RESTART_BACKOFF_MAX_S = 60.0
HEALTHY_AFTER_S = 60.0  # a child that ran this long restarts without delay after its next death
SHUTDOWN_TIMEOUT_S = 300.0  # warm shutdown waits for the current sample; then the child is killed
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # what `celery worker --loglevel` accepts


@dataclass(frozen=True)
class ChildSpec:
    """One worker process to keep running."""

    name: str
    gpu: str | None  # a CUDA device index (or MIG id) for CUDA_VISIBLE_DEVICES; None: CPU only
    argv: tuple[str, ...]
    env: dict[str, str] = field(hash=False, compare=False, repr=False)


def visible_gpus() -> list[str]:
    """The GPUs this machine offers, without initialising CUDA: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    configured = os.environ.get("CUDA_VISIBLE_DEVICES")
    if configured is not None:
        return [gpu.strip() for gpu in configured.split(",") if gpu.strip() and gpu.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


def parse_gpus(value: str, available: list[str]) -> list[str | None]:
    """`cpu`, `all` or a comma list of GPU indices -> one entry per worker GPU (None: CPU)."""
    text = value.strip().lower()
    if text == "cpu":
        return [None]
    if not available:
        raise InputError("--gpus", value, "no CUDA GPU found on this machine; use --gpus cpu")
    if text == "all":
        return list(available)
    wanted = [gpu.strip() for gpu in text.split(",") if gpu.strip()]
    if not wanted or len(set(wanted)) != len(wanted):
        raise InputError("--gpus", value, "expected cpu, all, or distinct GPU indices like 0,1")
    missing = [gpu for gpu in wanted if gpu not in available]
    if missing:
        raise InputError("--gpus", value, f"no GPU {','.join(missing)} here (available: {','.join(available)})")
    return list(wanted)


def require_usable_cuda(gpus: list[str], argument: str) -> None:
    """Refuse to start GPU workers that torch cannot use (no driver, a broken install, a CPU-only torch):
    they would otherwise run every shard on the CPU. Probed in a child, so the supervisor never holds CUDA.

    Raises:
        InputError: torch in a child with CUDA_VISIBLE_DEVICES set to `gpus` does not see them all.
    """
    if not gpus:
        return
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    try:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120,
                              check=False)
        seen = int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0
    except (OSError, subprocess.TimeoutExpired, ValueError):
        seen = 0
    if seen < len(gpus):
        raise InputError("--gpus", argument, f"torch cannot use CUDA on GPU(s) {','.join(gpus)} ({seen} usable): "
                                             "check the NVIDIA driver and a CUDA build of torch, or use --gpus cpu")


def parse_queues(value: str) -> list[str]:
    """A comma list of queue names, each one of QUEUES."""
    queues = [queue.strip() for queue in value.split(",") if queue.strip()]
    unknown = [queue for queue in queues if queue not in QUEUES]
    if not queues or unknown:
        raise InputError("--queues", value, f"choose from {', '.join(QUEUES)} (comma-separated)")
    return queues


def child_env(settings: Settings, gpu: str | None) -> dict[str, str]:
    """The child's environment: the supervisor's settings made explicit, and its one GPU (or none)."""
    env = dict(os.environ)
    env.update({
        "DIFFTPT_OPS_WORKSPACE": str(settings.workspace),
        "DIFFTPT_OPS_DATABASE_URL": settings.database_url,
        "DIFFTPT_OPS_BROKER_URL": settings.broker_url or "",
        "DIFFTPT_OPS_ARTIFACT_ROOT": str(settings.artifact_root),
        "DIFFTPT_OPS_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        # Set before the child's interpreter starts, so torch can only ever see this device.
        "CUDA_VISIBLE_DEVICES": gpu if gpu is not None else "",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
    })
    if settings.config_file is not None:
        env["DIFFTPT_OPS_CONFIG"] = str(settings.config_file)
    # A GPU child computes on its GPU and a CPU child on the CPU: never "auto", which falls back silently.
    env["DIFFTPT_OPS_DEVICE"] = "cpu" if gpu is None else "cuda"
    return env


def child_specs(settings: Settings, *, gpus: list[str | None], queues: list[str], concurrency_per_gpu: int = 1,
                loglevel: str = "INFO", host: str | None = None) -> list[ChildSpec]:
    """One spec per worker process: `concurrency_per_gpu` solo workers per GPU."""
    host = host or socket.gethostname()
    specs = []
    for gpu in gpus:
        for k in range(concurrency_per_gpu):
            suffix = ("cpu" if gpu is None else f"gpu{gpu}") + (f"-{k}" if concurrency_per_gpu > 1 else "")
            if set(queues) != set(QUEUES):  # split-queue workers on one host need distinct node names
                suffix += "-" + "-".join(queues)
            name = f"difftpt@{host}-{suffix}"
            argv = (sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-P", "solo",
                    "--prefetch-multiplier", "1", "-n", name, "-Q", ",".join(queues), "--loglevel", loglevel,
                    "--without-gossip", "--without-mingle")
            specs.append(ChildSpec(name=name, gpu=gpu, argv=argv, env=child_env(settings, gpu)))
    return specs


def claim_node_names(specs: list[ChildSpec], *, suffix: str) -> tuple[list[ChildSpec], list[socket.socket]]:
    """Celery node names must be unique on a host, and two supervisors with the same GPUs and queues would
    build the same ones (`celery inspect` then hears one of them). Each name is claimed by binding a Linux
    abstract socket named after it, held while this supervisor lives and released by the kernel when it
    dies; a name another supervisor holds gets `-suffix`. Elsewhere (no abstract sockets) names stay as built.

    Returns the specs, renamed where needed, and the sockets to keep open.
    """
    claimed, held = [], []
    for spec in specs:
        name = spec.name
        for candidate in (spec.name, f"{spec.name}-{suffix}"):
            holder = _bind_abstract(candidate)
            if holder is not None:
                name = candidate
                held.append(holder)
                break
        argv = tuple(name if arg == spec.name else arg for arg in spec.argv)
        claimed.append(dataclasses.replace(spec, name=name, argv=argv))
    return claimed, held


def _bind_abstract(name: str) -> socket.socket | None:
    """A socket bound in the abstract namespace to an address made from `name` (hashed: an address holds
    107 bytes, a node name with a long host name more); None when another process holds it or the platform
    has no abstract namespace (then a name cannot be checked and stays as built)."""
    if not sys.platform.startswith("linux"):
        return None
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        holder.bind("\0difftpt-ops-node:" + hashlib.sha256(name.encode()).hexdigest())
    except OSError:
        holder.close()
        return None
    return holder


def _die_with(supervisor_pid: int) -> Callable[[], None]:
    """Linux: the child gets SIGTERM if the supervisor is killed, instead of running on orphaned."""

    def set_parent_death_signal() -> None:
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != supervisor_pid:  # it died between fork and prctl: no signal will come
            os._exit(1)

    return set_parent_death_signal


def _say(message: str) -> None:
    sys.stderr.write(f"[difftpt-ops worker] {message}\n")
    sys.stderr.flush()


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0


class Supervisor:
    """Starts the children, restarts those that die (with backoff), stops them all on a signal."""

    def __init__(self, specs: list[ChildSpec], *, shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        self.children = [_Child(spec) for spec in specs]
        self.shutdown_timeout_s = shutdown_timeout_s
        self._stop = threading.Event()

    def _start(self, child: _Child) -> None:
        preexec = _die_with(os.getpid()) if sys.platform.startswith("linux") else None
        child.process = subprocess.Popen(child.spec.argv, env=child.spec.env, cwd=str(REPO_ROOT),  # noqa: S603
                                         start_new_session=True, preexec_fn=preexec)
        child.started = time.monotonic()
        _say(f"started {child.spec.name} (pid {child.process.pid}, CUDA_VISIBLE_DEVICES="
             f"{child.spec.env['CUDA_VISIBLE_DEVICES']!r})")

    def _check(self, child: _Child, now: float) -> None:
        if child.process is None:
            if now >= child.restart_at:
                self._start(child)
            return
        code = child.process.poll()
        if code is None:
            return
        child.failures = 0 if now - child.started >= HEALTHY_AFTER_S else child.failures + 1
        delay = min(2.0 ** child.failures - 1, RESTART_BACKOFF_MAX_S)
        _say(f"{child.spec.name} (pid {child.process.pid}) exited with {code}; restarting in {delay:.0f} s")
        child.process, child.restart_at = None, now + delay

    def request_stop(self, signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        self._stop.set()

    def run(self) -> int:
        """Supervise until SIGTERM or SIGINT; returns the exit code (0 after a clean stop)."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        while not self._stop.is_set():
            now = time.monotonic()
            for child in self.children:
                self._check(child, now)
            self._stop.wait(POLL_S)
        return self._shutdown()

    def _shutdown(self) -> int:
        running = [child.process for child in self.children if child.process and child.process.poll() is None]
        _say(f"stopping {len(running)} worker(s) (warm shutdown)")
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout_s
        for process in running:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _say(f"pid {process.pid} did not stop in {self.shutdown_timeout_s:.0f} s; killing it")
                process.kill()
                process.wait()
        return 0


def run_workers(settings: Settings, *, gpus: str = "all", queues: str = ",".join(QUEUES),
                concurrency_per_gpu: int = 1, loglevel: str = "INFO",
                shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S) -> int:
    """Validate, check the database and the broker, then supervise one worker per GPU until stopped.

    Raises:
        InputError: bad --gpus / --queues / --concurrency-per-gpu, or no broker configured.
        ServiceUnavailableError: the database or the broker cannot be reached.
    """
    # 1. Validate the arguments (nothing is started on bad input).
    if concurrency_per_gpu < 1:
        raise InputError("--concurrency-per-gpu", concurrency_per_gpu, "must be >= 1")
    if loglevel.upper() not in LOG_LEVELS:  # Celery would exit at once, and the supervisor restart it forever
        raise InputError("--loglevel", loglevel, f"must be one of {', '.join(LOG_LEVELS)}")
    queue_names = parse_queues(queues)
    devices = parse_gpus(gpus, visible_gpus())
    require_usable_cuda([gpu for gpu in devices if gpu is not None], gpus)
    if not settings.broker_url:
        raise InputError("DIFFTPT_OPS_BROKER_URL", "(unset)", "workers need a broker (redis://HOST:6379/0 or "
                         "amqp://...); without one, `submit` runs the work itself")
    # 2. The database and the broker must answer before any child starts.
    from difftpt_ops.services.workspace import open_database, remove_stale_temporaries
    from workers.tasks import dispatcher_for

    open_database(settings)
    dispatcher_for(settings).check()
    removed = remove_stale_temporaries(settings)
    if removed:
        _say(f"removed {removed} temporary files that killed writers left in {settings.artifact_root}")
    # 3. Supervise.
    specs = child_specs(settings, gpus=devices, queues=queue_names, concurrency_per_gpu=concurrency_per_gpu,
                        loglevel=loglevel)
    specs, held = claim_node_names(specs, suffix=str(os.getpid()))
    try:
        return Supervisor(specs, shutdown_timeout_s=shutdown_timeout_s).run()
    finally:
        for holder in held:
            holder.close()
