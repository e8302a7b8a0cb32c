"""The processes a test started in its own session (start_new_session=True): list them, kill what is left.

A killed driver leaves Ray's processes behind (re-parented to init); they keep the session id of the
process the test started, so the session finds them without knowing their names.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def session_processes(sid: int) -> list[str]:
    """'PID COMMAND-LINE' (its first 80 characters) of every process in session `sid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    out.append(f"{entry.name} {cmdline[:80]}")
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                pass
    return out


def kill_session(sid: int) -> None:
    """SIGKILL every process left in session `sid`."""
    for line in session_processes(sid):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
