"""Starting the DvD services as child processes: free ports, readiness waits, prefixed logs, clean shutdown.

Shared by the one-machine launcher (`dvd-local`), the test fixtures and the benchmarks, so that all of them start
the services exactly the same way: `vision_server`, `language_server` and `router` build each service's command
line in one place, `Service.wait_grpc` / `Service.wait_http` wait until it reports ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from dvd.runtime import PORTS_ENV, SHM_POLL_ENV
from dvd.shm_orphans import remove_orphans, shm_entries

if TYPE_CHECKING:
    from dvd.security import InternalAuth


PY = sys.executable
LOCALHOST = "127.0.0.1"


def usable_cpus() -> str:
    """This process's CPUs as a taskset/vLLM list ("0,1")."""
    return ",".join(map(str, sorted(os.sched_getaffinity(0))))


def engine_cpus(index: int) -> str:
    """The core for the `index`-th of several vLLM CPU engines on one host: one each, round-robin.

    vLLM's `auto` binding pins every engine's model worker to the same core, where an idle worker's sched_yield
    spin and a busy one starve each other until requests time out (docs/performance.md, "Settings behind the
    code")."""
    cpus = sorted(os.sched_getaffinity(0))
    return str(cpus[index % len(cpus)])


# The longest sleep of a CPU engine's processes between checks of vLLM's shared-memory queue (dvd.runtime.SHM_POLL_ENV;
# a user's own value wins). vLLM spins on sched_yield for 1 s after each message, so under load its worker and
# scheduler each burn a core waiting for the other; vLLM's own idle path (a zmq wake-up) loses wake-ups to its 5 s
# recheck. Each wake-up preempts a thread computing on the same cores, so readers back off from 0.1 ms to this
# (llm_server/vllm_patches/queue_polling.py, poll_pause): docs/performance.md, "Cores on one host".
CPU_SHM_POLL_S = 0.001


# libgomp (torch's OpenMP, in the vision server and in vLLM's CPU worker) lets a thread that finished its share of a
# parallel region spin 300,000 times before it sleeps; it spins 100 times only when it sees more threads than cores
# in its own process, and it cannot see another process's. Where the vision server and the language
# engine share cores (dvd-local, the benchmark), each runtime's waiting threads then burn the core a thread of the
# other needs (docs/performance.md, "Cores on one host"). A user's own GOMP_SPINCOUNT wins.
CPU_OMP_SPINCOUNT = "1000"


def shared_cpu_env() -> dict[str, str]:
    """Environment of a CPU service whose OpenMP threads share cores with another process's."""
    return {"GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", CPU_OMP_SPINCOUNT)}


def cpu_engine_env(cpus: str | None = None, kv_gib: int = 2, *, bind: bool = True) -> dict[str, str]:
    """vLLM on CPU: a fixed KV budget, no spinning on its message queue, and its OpenMP threads bound to `cpus`
    (default: every usable CPU; `bind=False` keeps vLLM's own `auto` binding).

    OpenMP's waiting threads spin briefly (`shared_cpu_env`), as for the vision server beside it.
    vLLM's own `auto` binding keeps one core for its scheduler process, which on 2 cores halves the model's
    compute; binding every CPU lets the language engine and the vision server share the machine, each taking
    the cores the other leaves idle. The API and scheduler processes keep one thread so that they do not spin
    against the model's threads.
    """
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib), SHM_POLL_ENV: os.environ.get(SHM_POLL_ENV, str(CPU_SHM_POLL_S)),
           **shared_cpu_env()}
    if bind:
        env |= {"VLLM_CPU_OMP_THREADS_BIND": cpus or usable_cpus(), "OMP_NUM_THREADS": "1"}
    return env


def free_port() -> int:
    """A port free right now. Only for processes that cannot report the port they bind (stock vLLM): anything
    else may take it before the service binds it. DvD's services take port 0 and report (`Service.wait_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One child process whose output is copied, line by line and prefixed, to a sink (and kept for errors)."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 sink: IO[str] | None = None, log_file: Path | None = None, cpus: str | None = None) -> None:
        """`cpus` pins the service and every process it starts to a CPU list ("0", "1-3") with taskset."""
        self.name = name
        self.argv = ["taskset", "-c", cpus, *argv] if cpus else list(argv)
        self.tail: deque[str] = deque(maxlen=200)
        self._sink = sink if sink is not None else sys.stderr
        self._log = open(log_file, "a") if log_file else None  # noqa: SIM115 - closed in stop()
        self._ports_dir = Path(tempfile.mkdtemp(prefix="dvd-ports-"))
        self.ports_file = self._ports_dir / "ports.json"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", PORTS_ENV: str(self.ports_file), **(env or {})}
        self._shm_before = shm_entries()  # what /dev/shm held before this service: never its to remove
        # The child dies with this process (dvd/die_with_parent.py), even when this process is SIGKILLed.
        guarded = [sys.executable, "-m", "dvd.die_with_parent", str(os.getpid()), *self.argv]
        self.proc = subprocess.Popen(guarded, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, start_new_session=True)
        self._pump = threading.Thread(target=self._copy_output, name=f"log-{name}", daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(line.rstrip("\n"))
            if self._log:
                self._log.write(line)
                self._log.flush()
            if self._sink:
                with contextlib.suppress(ValueError):
                    self._sink.write(f"[{self.name}] {line}")

    def last_lines(self, n: int) -> str:
        """The service's last `n` output lines, for error messages."""
        return "\n".join(list(self.tail)[-n:])

    def pids(self) -> list[int]:
        """The service and every process it started (its process group: each service has its own session)."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(stat[2]) == self.proc.pid:  # the process group id
                    pids.append(int(entry))
        return pids

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the processes of `pids()` that are still running."""
        ticks = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
        return ticks / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, probe: Callable[[], bool], timeout: float) -> None:
        """Poll `probe` until it returns True; raise with the service's last output if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was ready:\n"
                                   + self.last_lines(40))
            with contextlib.suppress(Exception):
                if probe():
                    return
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} was not ready after {timeout:.0f}s:\n" + self.last_lines(40))

    def wait_port(self, name: str = "grpc", timeout: float = 600.0) -> int:
        """The port the service reports it bound under `name` (it was started with port 0)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                ports = json.loads(self.ports_file.read_text())
                if name in ports:
                    return int(ports[name])
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it bound its "
                                   f"{name} port:\n" + self.last_lines(40))
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not report its {name} port after {timeout:.0f}s:\n"
                           + self.last_lines(40))

    def wait_grpc(self, timeout: float = 600.0, auth: InternalAuth | None = None) -> str:
        """host:port of the service's gRPC port, once its grpc.health.v1 says SERVING (model or engine ready)."""
        address = f"{LOCALHOST}:{self.wait_port('grpc', timeout)}"
        self.wait_ready(lambda: grpc_serving(address, auth), timeout)
        return address

    def wait_http(self, timeout: float = 60.0, path: str = "/ready", host: str = LOCALHOST) -> str:
        """http://host:port of the service's HTTP port, once `path` answers 200."""
        base = f"http://{host}:{self.wait_port('http', timeout)}"
        self.wait_ready(lambda: http_ok(base + path), timeout)
        return base

    def kill(self) -> None:
        """SIGKILL the service and everything it started (its process group), as a crash or OOM kill would, then
        remove the shared memory its processes left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.remove_leftovers()

    def remove_leftovers(self) -> None:
        """Shared memory that appeared while the service ran and that no live process uses any more (vLLM's queues
        and semaphores, DvD's segments: dvd.shm_orphans). Its whole process group must be gone first."""
        for _ in range(50):  # the group's last processes may take a moment to exit after the leader
            if not self.pids():
                break
            time.sleep(0.1)
        remove_orphans(shm_entries() - self._shm_before)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the whole process group (vLLM spawns workers), then SIGKILL what is left, and remove the shared
        memory a killed process could not."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.remove_leftovers()
        if self._log:
            self._log.close()
            self._log = None
        shutil.rmtree(self._ports_dir, ignore_errors=True)


def http_ok(url: str) -> bool:
    import httpx

    return httpx.get(url, timeout=2.0).status_code == 200


def grpc_serving(address: str, auth: InternalAuth | None = None) -> bool:
    """True when the gRPC server at `address` reports SERVING (grpc.health.v1: model or engine ready)."""
    from dvd.health import check

    return check(address, auth=auth)


def vision_server(model: str | Path, *args: str, name: str = "vision", port: int = 0, devices: str = "cpu",
                  **kw: Any) -> Service:
    """A vision server on this host (port 0: any free one, `wait_grpc` says which); `args` are its CLI options,
    `kw` Service's (env, sink, log_file, cpus)."""
    return Service(name, [PY, "-m", "vision_server", "--model", str(model), "--host", LOCALHOST, "--port", str(port),
                          "--devices", devices, *args], **kw)


def language_server(model: str | Path, vision: str, *args: str, name: str = "llm", port: int = 0,
                    **kw: Any) -> Service:
    """A language server on this host, fed by the vision server(s) at `vision` ("host:port,...")."""
    return Service(name, [PY, "-m", "llm_server", "--model", str(model), "--host", LOCALHOST, "--port", str(port),
                          "--vision", vision, *args], **kw)


def router(llm: str, *args: str, name: str = "router", host: str = LOCALHOST, port: int = 0, **kw: Any) -> Service:
    """The OpenAI gateway in front of the language server(s) at `llm` ("host:port,...")."""
    return Service(name, [PY, "-m", "router", "--host", host, "--port", str(port), "--llm", llm, *args], **kw)
