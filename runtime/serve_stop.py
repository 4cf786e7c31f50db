"""What is left when probres-serve stops: the processes and shared memory PyTriton's stop leaves behind.

    python -c "import os; from runtime.serve_stop import descendants; print(descendants(os.getppid()))"

PyTriton stops tritonserver, which gives its Python-backend stubs Triton's exit timeout (5 s);
a stub still busy then outlives it, orphaned, for minutes (issue 24 item 5). runtime/serve.py
makes itself the child subreaper at start, so such orphans stay its descendants, and at the stop
ends whatever still descends from it (end_descendants), then removes the stubs' shared-memory
regions (remove_own_shm). Linux /proc; elsewhere these do nothing.
"""

from __future__ import annotations

import os
import signal
import time

STOP_GRACE_S = 5.0      # SIGTERM to what is left, SIGKILL this much later (the stubs ignore SIGTERM)


def become_subreaper() -> None:
    """Have orphaned descendants (a stub whose tritonserver has exited) reparented to this process
    instead of init, so that descendants() still finds them at the stop (Linux prctl; else nothing)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1)      # PR_SET_CHILD_SUBREAPER, Linux >= 3.4
    except (OSError, AttributeError):
        pass


def _processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, state) of every process, from /proc ([] without /proc)."""
    procs = []
    for p in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{p}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]   # the name may hold spaces and ')'
            procs.append((int(p), int(ppid), state))
        except (OSError, IndexError, ValueError):
            continue
    return procs


def descendants(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent chain leads to `pid`."""
    children: dict[int, list[int]] = {}
    for p, ppid, state in _processes():
        if state != "Z":
            children.setdefault(ppid, []).append(p)
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def end_descendants(grace_s: float = STOP_GRACE_S) -> list[str]:
    """SIGTERM every process still descending from this one, SIGKILL those alive grace_s later; waits
    at most 2 * grace_s. Returns their names and pids (PyTriton's stop leaves stubs when tritonserver
    runs out its exit timeout). Python's resource tracker, which ignores SIGTERM and ends with this
    process, is left to do that."""
    from multiprocessing import resource_tracker

    keep = {getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None)}
    left = [p for p in descendants(os.getpid()) if p not in keep]
    names = []
    for pid in left:
        try:
            with open(f"/proc/{pid}/comm") as f:
                names.append(f"{f.read().strip()} ({pid})")
        except OSError:
            names.append(str(pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [p for p in descendants(os.getpid()) if p not in keep]
    for pid, ppid, state in _processes():   # a subreaper reaps its adopted orphans (PID 1 may not)
        if ppid == os.getpid() and state == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
    return names


def remove_own_shm(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink the Python backend's shared-memory regions that a stub ended by force left behind: PyTriton
    names them pytrtion<this pid>-... (its own spelling), so once every descendant is gone they are
    this server's and unused. Returns the names removed."""
    prefix = f"pytrtion{os.getpid()}-"
    try:
        names = [n for n in os.listdir(shm_dir) if n.startswith(prefix)]
    except OSError:
        return []
    for name in names:
        try:
            os.unlink(os.path.join(shm_dir, name))
        except OSError:
            pass
    return names
