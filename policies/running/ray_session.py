"""Starting and stopping Ray for one command: one helper, dashboard off unless asked, nothing left behind.

    with ray_session():            # starts a local Ray instance unless one is up (or connects: address=...)
        ...                        # SIGTERM acts as Ctrl-C (Tune stops gracefully, saving its state)
                                   # on the way out: ray.shutdown(), then SIGKILL for any Ray process left

Why each part:
- The dashboard costs 10-25 s of start-up on 2 cores and nothing here reads it: off unless asked.
- SIGTERM (what `kill` and service managers send) would end Python without running `finally`, so
  Ray would never be shut down; it is turned into the SIGINT path instead.
- `ray.shutdown()` stops the processes this driver started, but `ray::DashboardAgent` and
  `ray::RuntimeEnvAgent` catch SIGTERM and can outlive it (seen after a killed driver: they stay
  forever, re-parented to init). The Ray processes under this driver are listed before the
  shutdown, and the ones still alive a few seconds after it are killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

SURVIVOR_GRACE_S = 5.0


def init_ray(*, dashboard: bool = False, **kwargs) -> bool:
    """Start (or connect to) Ray unless it is up; returns whether this call did. kwargs go to ray.init."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(include_dashboard=dashboard, log_to_driver=False, configure_logging=False, **kwargs)
    return True


def shutdown_ray(grace_s: float = SURVIVOR_GRACE_S) -> list[int]:
    """ray.shutdown(), then SIGKILL the Ray processes under this process that outlived it.

    Returns the pids that had to be killed.
    """
    import ray

    before = ray_descendants()
    ray.shutdown()
    deadline = time.time() + grace_s
    alive = [p for p in before if p.alive()]
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if p.alive()]
    for p in alive:
        p.kill()
    return [p.pid for p in alive]


@contextlib.contextmanager
def ray_session(*, dashboard: bool = False, **kwargs):
    """Ray for the duration of a command (see the module docstring). Leaves a Ray instance that was
    already up (a test's, a caller's) running."""
    started = init_ray(dashboard=dashboard, **kwargs)
    restore = _sigterm_as_sigint()
    try:
        yield
    finally:
        restore()
        if started:
            shutdown_ray()


def _sigterm_as_sigint():
    """Route SIGTERM to whatever handles SIGINT now (Tune's graceful stop, or KeyboardInterrupt);
    returns a function that puts the previous SIGTERM and SIGINT handlers back (Tune leaves its own
    SIGINT handler installed after a run it was not interrupted in, which would swallow a later Ctrl-C).
    A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_sigterm(signum, frame):
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    previous_int = signal.getsignal(signal.SIGINT)
    previous_term = signal.signal(signal.SIGTERM, on_sigterm)

    def restore():
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)

    return restore


class _Process:
    """A pid with its start time, so a recycled pid is never killed."""

    def __init__(self, pid: int, start: str):
        self.pid, self.start = pid, start

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[2] == self.start and stat[1] != "Z"

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)


def _stat(pid: int):
    """(ppid, state, start time) of a process from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], fields[19]


def ray_descendants(root: int | None = None) -> list[_Process]:
    """The processes under `root` (default: this one) whose command line mentions ray (Linux /proc)."""
    root = os.getpid() if root is None else root
    if not Path("/proc").is_dir():
        return []
    children: dict[int, list[int]] = {}
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                stats[int(entry.name)] = stat
                children.setdefault(stat[0], []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"ray" in cmdline:
            found.append(_Process(pid, stats[pid][2]))
    return found


__all__ = ["init_ray", "ray_descendants", "ray_session", "shutdown_ray"]
