"""Deal a pool's new connections to its workers in turn (`--connection-balance`, docs/workers.md).

The workers share the gRPC port with SO_REUSEPORT, and the kernel hands each new connection to one of
them by a hash of its addresses: a client's few long connections land unevenly (perf_analyzer's three
all on one worker about one run in four). RoundRobin is a 13-instruction eBPF program for the port's
reuseport group (SO_ATTACH_REUSEPORT_EBPF): connection n goes to socket n mod workers, n counted in a
one-slot BPF array, so any 2k connections opened one after another split k and k. While a worker is
down the group is one socket short; an index past its end makes the kernel fall back to its hash.

By hand through the bpf syscall because the loaders (bcc, libbpf's Python bindings) need a compiler,
kernel headers or a native library at run time for what is 13 fixed instructions.

Contract: RoundRobin.load(workers) in the supervisor before any worker forks (the workers inherit the
program's descriptor); each worker calls attach(port) once it listens on the shared port. load raises
BalanceUnavailable, with the kernel's reason, where BPF is refused (no CAP_BPF or CAP_SYS_ADMIN while
kernel.unprivileged_bpf_disabled is set, a seccomp profile, not Linux); the pool then keeps the hash.
reserve_port, in the supervisor too, holds the port (bound, not listening) while workers come and go.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import socket
import struct
import sys

from neuronserve.errors import ConfigError

log = logging.getLogger(__name__)

BALANCES = ("round-robin", "hash")

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}  # __NR_bpf
_BPF_MAP_CREATE, _BPF_PROG_LOAD = 0, 5
_BPF_MAP_TYPE_ARRAY, _BPF_PROG_TYPE_SOCKET_FILTER = 2, 1
_SO_ATTACH_REUSEPORT_EBPF = 52


class BalanceUnavailable(Exception):
    """The kernel would not load the program; the message says why."""


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def _program(map_fd: int, workers: int) -> bytes:
    """r0 = (++counter[0]) % workers, or 0xffffffff (the kernel's hash) if the lookup fails."""
    return b"".join(
        (
            _insn(0x62, dst=10, off=-4, imm=0),  # *(u32 *)(r10 - 4) = 0: the key, on the stack
            _insn(0xBF, dst=2, src=10),  # r2 = r10
            _insn(0x07, dst=2, imm=-4),  # r2 += -4
            _insn(0x18, dst=1, src=1, imm=map_fd),  # r1 = the map (a 16-byte load: this and the next)
            _insn(0x00),
            _insn(0x85, imm=1),  # r0 = bpf_map_lookup_elem(r1, r2)
            _insn(0x15, dst=0, off=5, imm=0),  # if r0 == 0 goto the fallback
            _insn(0xB7, dst=1, imm=1),  # r1 = 1
            _insn(0xC3, dst=0, src=1),  # lock *(u32 *)(r0 + 0) += r1
            _insn(0x61, dst=0, src=0),  # r0 = *(u32 *)(r0 + 0)
            _insn(0x94, dst=0, imm=workers),  # w0 %= workers
            _insn(0x95),  # exit
            _insn(0xB7, dst=0, imm=-1),  # the fallback: r0 = an index past the group
            _insn(0x95),  # exit
        )
    )


def _bpf(command: int, attr: bytes) -> int:
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None or not sys.platform.startswith("linux"):
        raise BalanceUnavailable(f"no bpf syscall known on {platform.system()} {platform.machine()}")
    buffer = ctypes.create_string_buffer(attr, len(attr))
    fd = ctypes.CDLL(None, use_errno=True).syscall(number, command, buffer, len(attr))
    if fd < 0:
        code = ctypes.get_errno()
        raise BalanceUnavailable(f"bpf() refused: {os.strerror(code)} (CAP_BPF or CAP_SYS_ADMIN lets it)")
    return fd


class RoundRobin:
    """The loaded program: its descriptor, attachable to any number of listening sockets."""

    def __init__(self, program_fd: int) -> None:
        self.program_fd = program_fd

    @classmethod
    def load(cls, workers: int) -> RoundRobin:
        counter = _bpf(_BPF_MAP_CREATE, struct.pack("<5I", _BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0).ljust(72, b"\0"))
        try:
            code = _program(counter, workers)
            instructions = ctypes.create_string_buffer(code, len(code))
            license = ctypes.create_string_buffer(b"GPL")
            attr = struct.pack(
                "<IIQQ",
                _BPF_PROG_TYPE_SOCKET_FILTER,
                len(code) // 8,
                ctypes.addressof(instructions),
                ctypes.addressof(license),
            ).ljust(128, b"\0")
            return cls(_bpf(_BPF_PROG_LOAD, attr))
        finally:
            os.close(counter)  # the program holds the map

    def attach(self, port: int) -> int:
        """Attach to each TCP socket of this process listening on `port` (its reuseport group: the
        program then chooses for every socket of the group); the number attached."""
        attached = 0
        for name in os.listdir("/proc/self/fd"):
            try:
                if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    continue
                sock = socket.socket(fileno=int(name))
            except OSError:  # closed meanwhile
                continue
            try:
                if (
                    sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port
                ):
                    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_EBPF, self.program_fd)
                    attached += 1
            finally:
                sock.detach()  # gRPC's descriptor: left open
        return attached


def load_balance(balance: str, workers: int) -> RoundRobin | None:
    """The supervisor's choice for `--connection-balance`: the program, or None (the kernel's hash),
    logged either way."""
    if balance == "round-robin":
        try:
            program = RoundRobin.load(workers)
        except BalanceUnavailable as exc:
            log.warning("connections are hashed over the workers by the kernel, not dealt in turn: %s", exc)
            return None
        log.info("new connections are dealt to the %d workers in turn (eBPF on the port's reuseport group)", workers)
        return program
    log.info("new connections are hashed over the workers by the kernel (--connection-balance hash)")
    return None


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound to host:port with SO_REUSEPORT, not listening (the kernel hands connections only to
    listening sockets): it keeps the port ours while workers come and go. A port someone else holds
    fails here, before any worker starts."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if port:
        probe = socket.socket(family, kind, proto)
        probe.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as gRPC does: old TIME_WAIT connections do not hold the port
        try:
            probe.bind(address)  # without SO_REUSEPORT: fails if anyone holds the port, even another pool
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} for gRPC ({exc.strerror}); choose another --port or --host"
            ) from None
        finally:
            probe.close()
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock, sock.getsockname()[1]
