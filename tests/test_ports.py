"""Port allocation: free ports by probing, foreign listeners skipped, TIME_WAIT reusable."""

from __future__ import annotations

import socket

import pytest

from reconciler.ports import PortAllocator, PortsExhausted, is_free


def listener(port: int = 0) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_skips_a_port_held_by_another_process_and_prefers_the_previous_one() -> None:
    with listener() as held:
        port = held.getsockname()[1]
        alloc = PortAllocator(port, port + 5)
        assert alloc.allocate("a") == port + 1
        assert alloc.allocate("b") == port + 2
        alloc.release("a")
        assert alloc.allocate("c", prefer=port + 4) == port + 4
        assert alloc.allocate("a") == port + 1


def test_exhausted_range_says_what_to_do() -> None:
    with listener() as held:
        port = held.getsockname()[1]
        with pytest.raises(PortsExhausted, match=rf"no free port in {port}-{port}.*widen server.port_range"):
            PortAllocator(port, port).allocate("a")


def test_pinned_port_in_use_is_an_error() -> None:
    with listener() as held:
        port = held.getsockname()[1]
        with pytest.raises(PortsExhausted, match=f"port {port} \\(pinned by the spec\\) is in use"):
            PortAllocator(1, 2).allocate("a", fixed=port)


def test_port_with_connections_in_time_wait_is_free() -> None:
    """After a backend stops, its port holds TIME_WAIT connections; backends (llama-server's
    HTTP library) bind with SO_REUSEADDR, so the port is free for the next one."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end goes to TIME_WAIT
    client.close()
    server.close()
    assert is_free(port)
