"""/proc helpers for the security tests (no psutil in the environment): process trees,
listening sockets, and killing what a test started, by pid only."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

from lvd.flows.watchdog import children_map  # the /proc reading; what is checked is the outcome

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def tree(root: int) -> list[int]:
    """root and every descendant alive now."""
    kids, out, stack = children_map(), [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack += kids.get(pid, [])
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def comm(pid: int) -> str:
    """The kernel's short name of the process (the executable's basename, 15 chars)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def pids_matching(text: str) -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and text in cmdline(int(n))]


def _addr(hexaddr: str, family: int) -> str:
    raw = bytes.fromhex(hexaddr)
    if family == socket.AF_INET:
        return socket.inet_ntop(family, raw[::-1])
    return socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))


def listening(pids) -> list[tuple[int, str, str, int]]:
    """(pid, command, address, port) of every TCP socket in LISTEN owned by `pids`; the command
    starts with the process's short name, so a long install path cannot truncate it away."""
    inodes = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    out = []
    for family, path in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A = LISTEN
                continue
            ip, port = fields[1].split(":")
            pid = inodes[fields[9]]
            out.append((pid, f"{comm(pid)} {cmdline(pid)[:80]}", _addr(ip, family), int(port, 16)))
    return out


def kill_all(pids, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, each pid given (and nothing else)."""
    pids = [p for p in pids if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
