"""Services started through dvd.procs never outlive their launcher, however it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

LAUNCHER = """
import sys, time
from dvd.procs import Service
svc = Service("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], sink=None)
time.sleep(0.5)
print(svc.proc.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_child_dies_with_its_launcher(sig: signal.Signals) -> None:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    child = int(launcher.stdout.readline())
    assert _alive(child)
    launcher.send_signal(sig)
    launcher.wait(10)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the service outlived its launcher"


def test_services_start_while_others_grab_ports(tiny_ckpt) -> None:
    """Launchers never pick a port ahead of the service: each binds port 0 and reports it (dvd.runtime.report_ports),
    so a neighbour grabbing ephemeral ports meanwhile (vLLM's engines do, while they start) cannot break a launch."""
    import socket
    import threading

    import httpx

    from dvd.procs import grpc_serving, router
    from tests.conftest import start_vision

    grabbed: list[socket.socket] = []
    stop = threading.Event()

    def grab() -> None:
        while not stop.is_set() and len(grabbed) < 2000:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen()
            grabbed.append(s)
            time.sleep(0.002)

    neighbour = threading.Thread(target=grab, daemon=True)
    neighbour.start()
    vision = front = None
    try:
        vision, address = start_vision("vision-port-race", tiny_ckpt)
        front = router("127.0.0.1:1", name="router-port-race")
        port = front.wait_port("http", 60)
        assert grpc_serving(address)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        taken = {s.getsockname()[1] for s in grabbed}
        assert len(taken) > 100 and int(address.rsplit(":", 1)[1]) not in taken and port not in taken
    finally:
        stop.set()
        neighbour.join(5)
        for svc in (vision, front):
            if svc is not None:
                svc.stop()
        for s in grabbed:
            s.close()


ENGINE_LAUNCHER = """
import sys, time
from dvd.procs import Service
svc = Service("llm", [sys.executable, "-m", "llm_server", "--model", sys.argv[1], "--port", "0",
                      "--vision", "127.0.0.1:1", "--max-model-len", "4096"],
              env={"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}, sink=None)
print(svc.proc.pid, flush=True)
time.sleep(600)
"""


def test_killed_launcher_leaves_no_engine_behind(tiny_ckpt) -> None:
    """SIGKILL of a launcher while vLLM's engine is starting: the language server and EngineCore both go.

    vLLM's EngineCore only notes a SIGTERM while it starts (it keeps waiting for its frontend): without the
    language server's start-up handler it outlived everything, orphaned, for minutes."""
    import psutil

    launcher = subprocess.Popen([sys.executable, "-c", ENGINE_LAUNCHER, str(tiny_ckpt)], stdout=subprocess.PIPE,
                                text=True)
    assert launcher.stdout is not None
    llm = psutil.Process(int(launcher.stdout.readline()))
    family: list[psutil.Process] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not family:  # the engine process exists: start-up is under way
        family = [c for c in llm.children(recursive=True) if "spawn_main" in " ".join(c.cmdline())
                  or "EngineCore" in c.name() + " ".join(c.cmdline())]
        time.sleep(0.2)
    assert family, "the language server never started its engine"
    family = [llm, *llm.children(recursive=True)]
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(10)
    _, alive = psutil.wait_procs(family, timeout=60)
    for p in alive:
        p.kill()
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


def test_engine_queue_polling_backs_off_with_the_wait() -> None:
    """A quick answer is seen within 0.1 ms; a long wait wakes the reader at most every DVD_SHM_POLL_S (the
    wake-ups stall OpenMP threads computing on the same cores) and never sleeps longer than that."""
    from dvd.procs import CPU_SHM_POLL_S
    from llm_server.vllm_patches.queue_polling import MIN_POLL_S, poll_pause

    assert poll_pause(0.0, CPU_SHM_POLL_S) == MIN_POLL_S == 0.0001
    pauses = [poll_pause(w / 1e4, CPU_SHM_POLL_S) for w in range(0, 1000)]
    assert pauses == sorted(pauses) and max(pauses) == CPU_SHM_POLL_S
    assert poll_pause(0.002, CPU_SHM_POLL_S) == 0.0005  # a quarter of the time already waited
    assert poll_pause(0.9, CPU_SHM_POLL_S) == CPU_SHM_POLL_S
    # a reader waiting through a 50 ms step wakes about 60 times, not 250 (0.2 ms) or 1 per sched_yield
    t, wakes = 0.0, 0
    while t < 0.05:
        t, wakes = t + poll_pause(t, CPU_SHM_POLL_S), wakes + 1
    assert 45 <= wakes <= 70


LEAKER = """
import multiprocessing, time
from multiprocessing import shared_memory
shm = shared_memory.SharedMemory(create=True, size=4096)  # what vLLM's message queues are (psm_*)
lock = multiprocessing.get_context("spawn").Lock()  # a named semaphore (sem.mp-*), as vLLM's processes use
print(shm.name, lock._semlock.name, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_services_shared_memory_is_removed(how: str) -> None:
    """SIGKILL runs no cleanup and takes multiprocessing's resource tracker with it (same process group): the
    launcher removes what the service's processes left in /dev/shm; what a live process uses is never touched."""
    from multiprocessing import shared_memory

    from dvd.procs import Service
    from dvd.shm_orphans import MIN_AGE_S

    bystander = shared_memory.SharedMemory(create=True, size=4096)  # a live process's segment, made meanwhile
    try:
        svc = Service("leaker", [sys.executable, "-c", LEAKER], sink=None)
        deadline = time.monotonic() + 30
        while not svc.tail and time.monotonic() < deadline:
            time.sleep(0.1)
        segment, semaphore = svc.tail[0].split()
        names = [segment, "sem." + semaphore.lstrip("/")]
        assert all(os.path.exists(f"/dev/shm/{n}") for n in names), names
        time.sleep(MIN_AGE_S + 0.5)  # the launcher leaves younger entries alone (created, not yet mapped)
        if how == "kill":
            svc.kill()
        else:
            os.killpg(svc.proc.pid, signal.SIGKILL)  # it died on its own; the launcher stops it later
            svc.proc.wait(10)
            svc.stop()
        assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
        assert os.path.exists(f"/dev/shm/{bystander.name}")
    finally:
        bystander.close()
        bystander.unlink()
