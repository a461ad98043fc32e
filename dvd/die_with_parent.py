"""`python -m dvd.die_with_parent PARENT_PID COMMAND...`: run COMMAND so that it gets SIGTERM when PARENT_PID dies.

Linux's parent-death signal survives exec, so the service itself (and its graceful SIGTERM shutdown, which stops
its own children) is what receives it, however the launcher ends: Ctrl-C, SIGTERM, SIGKILL or a crash. Without it a
killed launcher leaves every service running, holding its ports, memory and GPUs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def arm(sig: int = signal.SIGTERM) -> None:
    """From now on this process gets `sig` when its parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))


def main(argv: list[str]) -> None:
    parent, command = int(argv[0]), argv[1:]
    arm()
    if os.getppid() != parent:  # the launcher died before the signal was armed
        sys.exit(f"dvd.die_with_parent: launcher {parent} is gone; not starting {command[0]}")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
