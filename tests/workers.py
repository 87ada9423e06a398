"""Which worker process of a `serve --workers N` answered a connection (Linux /proc).

The service's samples carry no process label, so a test that wants to know which worker served
it looks the connection up: the server side of the TCP connection (in /proc/net/tcp*) is a
socket inode, and exactly one worker holds a file descriptor on it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path


def worker_pids(supervisor_pid: int) -> list[int]:
    """The supervisor's child processes (its workers)."""
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()
    return [int(p) for p in children]


def _server_inode(client: socket.socket) -> str | None:
    client_port = client.getsockname()[1]
    server_port = client.getpeername()[1]
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == server_port and \
                    int(remote.rsplit(":", 1)[1], 16) == client_port:
                return inode
    return None


def serving_pid(client: socket.socket, pids: Iterable[int]) -> int | None:
    """The pid among ``pids`` holding the server end of ``client``'s connection (call it after
    a response came back, so the connection has been accepted)."""
    inode = _server_inode(client)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return pid
            except OSError:
                continue
    return None
