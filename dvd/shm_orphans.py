"""Shared memory that outlives the process that made it: find it and remove it.

A SIGKILLed (or OOM-killed) process runs no cleanup. What it leaves in /dev/shm stays until someone removes it,
and a host that restarts engines keeps losing memory:
- vLLM's message queues (`psm_*`, Python's `SharedMemory`) and multiprocessing's named semaphores (`sem.mp-*`):
  their owners keep them mapped for their whole life, so one that no live process maps or holds open is garbage;
- DvD's embedding segments (`dvd-*`): the language server that made one holds a shared flock on it, so one whose
  exclusive lock can be taken has no owner (`dvd.data_plane.remove_orphan_segments`); the vision server may still
  map it, which is why the flock rule, not the mapping rule, decides for these.

Whoever starts services runs this when one of them is gone (`dvd.procs.Service.stop`/`kill`: dvd-local, the test
fixtures, the benchmarks), and the language server at start (a container restarted in its pod finds its previous
engine's segments in the pod's /dev/shm).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from dvd.data_plane import SHM_DIR, remove_orphan_segments

log = logging.getLogger("dvd.shm_orphans")

# What vLLM (through Python's multiprocessing) leaves behind; nothing else is ever removed by the mapping rule.
FOREIGN = re.compile(r"psm_[0-9a-f]+|sem\.mp-[A-Za-z0-9_]+")
# A segment this young may be between its creation and its first mapping (microseconds, in practice). Its mtime is
# its creation: tmpfs does not update it for writes through a mapping, which is how both kinds are used.
MIN_AGE_S = 2.0


def shm_entries() -> set[str]:
    """Names in /dev/shm that the two rules look after: vLLM's, multiprocessing's and DvD's."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return set()
    return {n for n in names if FOREIGN.fullmatch(n) or n.startswith("dvd-")}


def used_inodes() -> set[int]:
    """Inodes of /dev/shm files that a live process maps or holds open (every process this user may inspect: all
    of them as root, this user's otherwise, and only this user's can use its 0600 entries).

    By inode, not by name: glibc's sem_open creates a semaphore under a temporary name, maps it, then links it to
    its real name and unlinks the temporary one, so its creator's mapping reads `/dev/shm/sem.XXXXXX (deleted)`.
    Matching names removed a starting vLLM engine's semaphore from under it (`sem_unlink`: no such file)."""
    used: set[int] = set()
    marker = f" {SHM_DIR}/".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                for line in f:
                    if marker in line:
                        used.add(int(line.split()[4]))  # address perms offset dev inode path
            fds = os.listdir(f"/proc/{pid}/fd")
        except (OSError, ValueError, IndexError):
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{SHM_DIR}/"):
                    used.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
            except OSError:
                continue
    return used


def unused(names: Iterable[str]) -> set[str]:
    """Those of `names` (entries of /dev/shm) that no live process maps or holds open."""
    used = used_inodes()
    out = set()
    for name in names:
        try:
            if Path(SHM_DIR, name).stat().st_ino not in used:
                out.add(name)
        except OSError:
            continue  # gone already
    return out


def remove_orphans(candidates: Iterable[str] | None = None) -> list[str]:
    """Remove what dead processes left: `candidates` (default: every entry of `shm_entries`) that no live process
    maps or holds open and that are older than MIN_AGE_S, plus DvD segments without an owner. Returns the names."""
    names = shm_entries() if candidates is None else set(candidates) & shm_entries()
    removed = []
    foreign = {n for n in names if FOREIGN.fullmatch(n)}
    if foreign:
        now = time.time()
        for name in sorted(unused(foreign)):
            path = Path(SHM_DIR, name)
            try:
                st = path.stat()
                if now - st.st_mtime < MIN_AGE_S or st.st_uid != os.geteuid():
                    continue
                path.unlink()
            except OSError:
                continue
            removed.append(name)
    if any(n.startswith("dvd-") for n in names):
        removed += remove_orphan_segments()
    if removed:
        log.info("removed shared memory left by dead processes", extra={"count": len(removed),
                                                                        "names": sorted(removed)[:8]})
    return removed
