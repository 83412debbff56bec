"""connection_balance.RoundRobin on real sockets in this process: a reuseport group of listening sockets
on loopback, real connections, which socket accepted each (the pool's end to end: test_workers.py)."""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys

import pytest

from neuronserve.connection_balance import BalanceUnavailable, RoundRobin


@pytest.fixture
def listeners():
    """listeners(count, port=0): `count` sockets listening on one loopback port with SO_REUSEPORT (the
    first picks the port when 0); all closed after the test."""
    opened: list[socket.socket] = []

    def listen(count: int, port: int = 0) -> list[socket.socket]:
        group = []
        for _ in range(count):
            sock = socket.socket()
            opened.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(16)
            port = sock.getsockname()[1]
            group.append(sock)
        return group

    yield listen
    for sock in opened:
        sock.close()


def accepted_by(group: list[socket.socket], connections: int) -> list[int]:
    """Open `connections` one after another; for each, the index of the listening socket that got it."""
    port = port_of(group)
    order, clients = [], []
    for _ in range(connections):
        clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        ready, _, _ = select.select(group, [], [], 5)
        assert len(ready) == 1, f"{len(ready)} sockets with a connection waiting"
        conn, _ = ready[0].accept()
        conn.close()
        order.append(group.index(ready[0]))
    for client in clients:
        client.close()
    return order


@pytest.fixture
def program():
    def load(workers: int) -> RoundRobin:
        try:
            return RoundRobin.load(workers)
        except BalanceUnavailable as exc:
            if "not permitted" in str(exc):
                pytest.skip(f"this kernel refuses BPF to this process: {exc}")
            raise

    return load


def port_of(group: list[socket.socket]) -> int:
    return group[0].getsockname()[1]


def test_connections_alternate_between_the_sockets_of_the_group(program, listeners):
    group = listeners(2)
    listeners(1)  # another port: not attached
    assert program(2).attach(port_of(group)) == 2
    order = accepted_by(group, 10)
    assert all(a != b for a, b in zip(order, order[1:])), order
    assert sorted(order) == [0] * 5 + [1] * 5


def test_three_workers_in_turn(program, listeners):
    group = listeners(3)
    program(3).attach(port_of(group))
    order = accepted_by(group, 9)
    assert sorted(order[:3]) == [0, 1, 2] and order == order[:3] * 3, order


def test_a_group_one_socket_short_still_accepts_every_connection(program, listeners):
    """A worker down: the index past the group's end falls back to the kernel's hash, nothing is lost."""
    group = listeners(2)
    program(3).attach(port_of(group))
    assert len(accepted_by(group, 12)) == 12


def test_a_socket_that_joins_later_gets_its_turn(program, listeners):
    """A restarted worker's socket joins the group the program is attached to."""
    group = listeners(1)
    program(2).attach(port_of(group))
    group += listeners(1, port_of(group))
    assert sorted(accepted_by(group, 6)) == [0, 0, 0, 1, 1, 1]


def test_where_bpf_is_refused_the_pool_keeps_the_kernels_hash_and_says_why():
    """A process without CAP_BPF and CAP_SYS_ADMIN (setpriv drops them from root's bounding set; the
    kernel refuses BPF to it where kernel.unprivileged_bpf_disabled is set) gets no program and a
    warning naming the kernel's reason."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and util-linux's setpriv to start a process without CAP_BPF")
    code = (
        "import logging; logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s');"
        "from neuronserve.connection_balance import load_balance;"
        "print('program' if load_balance('round-robin', 2) else 'none')"
    )
    argv = ["setpriv", "--bounding-set", "-bpf,-sys_admin", sys.executable, "-c", code]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.stdout.strip() == "program":
        pytest.skip("this kernel lets unprivileged processes load BPF")
    assert done.stdout.strip() == "none", done.stderr
    assert "WARNING connections are hashed over the workers by the kernel" in done.stderr
    assert "Operation not permitted" in done.stderr
