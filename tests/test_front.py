"""The front (xgen's listening socket) against a real daemon and llama-server, over raw sockets:
what clients send that the openai SDK never does (pipelining, HTTP/1.0, Expect, chunked
uploads, garbage, HEAD), clients that stall or send too much, a backend killed under a request,
who counts as loopback, a taken port."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest
from conftest import ONE_MODEL, Daemon, launched

pytestmark = pytest.mark.integration

CHAT = {"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}


PATIENCE_S = 3  # server.client_timeout_s here


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, default_model: Path, tiny_gguf: Path,
          llama_server: Path) -> Iterator[Daemon]:
    spec = ("server: {{port: {PORT}, port_range: [{LOW}, {HIGH}], stop_grace_s: 5, client_timeout_s: "
            + str(PATIENCE_S) + "}}\n" + ONE_MODEL)
    with launched(tmp_path_factory.mktemp("front"), default_model, tiny_gguf, spec, header=False) as d:
        yield d


def connect(port: int) -> tuple[socket.socket, BinaryIO]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    return sock, sock.makefile("rb")


def post(path: str, body: bytes, extra: str = "", version: str = "1.1") -> bytes:
    return (f"POST {path} HTTP/{version}\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n").encode() + body


def read_response(f: BinaryIO, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One answer from a kept-alive connection: status, headers (lower-case), de-chunked body;
    a body with neither length nor chunks is read to the end of the connection."""
    status = int(f.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_only or status in (100, 204, 304):
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(f.readline().strip(), 16):
            body += f.read(size)
            f.readline()
        f.readline()
        return status, headers, body
    if "content-length" in headers:
        return status, headers, f.read(int(headers["content-length"]))
    return status, headers, f.read()


def test_pipelined_requests_are_answered_in_order(front: Daemon) -> None:
    sock, f = connect(front.port)
    chat = json.dumps(CHAT).encode()
    sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n" + post("/v1/chat/completions", chat)
                 + b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n" + post("/v1/chat/completions", b"not json"))
    answers = [read_response(f) for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 400]
    assert json.loads(answers[0][2]) == {"status": "ok"}
    assert json.loads(answers[1][2])["object"] == "chat.completion"
    assert {m["id"] for m in json.loads(answers[2][2])["data"]} == {"smollm2", "default"}
    assert json.loads(answers[3][2])["error"]["type"] == "invalid_request_error"
    sock.close()


def test_http10_clients_get_their_answer_and_the_end_of_the_connection(front: Daemon) -> None:
    for stream in (False, True):
        sock, f = connect(front.port)
        sock.sendall(post("/v1/chat/completions", json.dumps({**CHAT, "stream": stream}).encode(), version="1.0"))
        status, headers, body = read_response(f)
        assert status == 200 and headers.get("connection") == "close"
        assert body.rstrip().endswith(b"data: [DONE]") if stream else json.loads(body)["choices"]
        assert f.read() == b""  # closed
        sock.close()


def test_expect_100_continue_and_a_chunked_upload(front: Daemon) -> None:
    sock, f = connect(front.port)
    chat = json.dumps(CHAT).encode()
    head = post("/v1/chat/completions", b"", extra="expect: 100-continue\r\n").replace(
        b"content-length: 0", b"content-length: %d" % len(chat))
    sock.sendall(head)
    assert read_response(f)[0] == 100  # asked before the body is sent, as curl does past 1 KiB
    sock.sendall(chat)
    assert read_response(f)[0] == 200
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (chat[:10], chat[10:])) + b"0\r\n\r\n")
    sock.sendall(chunked)
    status, _, body = read_response(f)
    assert status == 200 and json.loads(body)["object"] == "chat.completion"
    sock.sendall(b"HEAD /health HTTP/1.1\r\nhost: x\r\n\r\nGET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    status, headers, _ = read_response(f, head_only=True)
    assert status == 200 and headers["content-length"] == "15"
    assert read_response(f)[2] == b'{"status":"ok"}'  # the same connection goes on after HEAD
    sock.close()


def test_garbage_gets_400_and_the_front_serves_on(front: Daemon) -> None:
    for junk in (b"\x00\xff\xfe nonsense\r\n\r\n", b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n",
                 b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"):
        sock, f = connect(front.port)
        sock.sendall(junk)
        status, headers, body = read_response(f)
        assert status == 400 and headers["connection"] == "close", body
        assert f.read() == b""
        sock.close()
    sock, f = connect(front.port)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"mod")
    sock.close()  # half a request, then gone
    assert front.http.post("/v1/chat/completions", json=CHAT).status_code == 200


def read_all(sock: socket.socket) -> bytes:
    """What arrives until the server closes (a reset after some bytes ends it too)."""
    out = b""
    try:
        while data := sock.recv(1 << 20):
            out += data
    except ConnectionResetError:
        pass
    return out


def metric(front: Daemon, line: str) -> float:
    """The value of the /metrics line that starts with `line` (0 when there is none yet)."""
    found = [row for row in front.http.get("/metrics").text.splitlines() if row.startswith(line + " ")]
    return float(found[0].rsplit(" ", 1)[1]) if found else 0.0


def dropped(front: Daemon, reason: str) -> float:
    return metric(front, f'xgen_front_clients_dropped_total{{reason="{reason}"}}')


def test_a_request_that_stops_arriving_gets_408_after_client_timeout_s(front: Daemon) -> None:
    """Half a head, half a body: neither holds a connection for ever (slowloris)."""
    counted = [dropped(front, "head_timeout"), dropped(front, "body_timeout")]
    for partial in (b"GET /health HTTP/1.1\r\nhost: x\r\n",
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"mod"):
        sock, f = connect(front.port)
        sock.sendall(partial)
        t0 = time.monotonic()
        status, headers, body = read_response(f)
        assert status == 408 and headers["connection"] == "close"
        assert "server.client_timeout_s" in json.loads(body)["error"]["message"]
        assert PATIENCE_S - 1 <= time.monotonic() - t0 < PATIENCE_S + 10
        assert f.read() == b""
        sock.close()
    assert "did not arrive within 3 s" in front.log() and "stopped arriving for 3 s" in front.log()
    assert [dropped(front, "head_timeout"), dropped(front, "body_timeout")] == [counted[0] + 1, counted[1] + 1]


def test_a_head_over_64_kib_gets_431(front: Daemon) -> None:
    """Sent in one write or dribbled in pieces, the head is not held past the limit."""
    huge = b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 200_000 + b"\r\n\r\n"
    pieces = [b"GET /health HTTP/1.1\r\n"] + [b"x-h%d: %s\r\n" % (i, b"v" * 2000) for i in range(40)]
    for parts in ([huge], pieces):
        sock, f = connect(front.port)
        try:
            for part in parts:
                sock.sendall(part)
                time.sleep(0.005)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before all of it was sent
        assert read_response(f)[0] == 431
        sock.close()
    assert front.http.get("/health").status_code == 200
    assert dropped(front, "head_too_large") >= 2


def test_a_client_that_takes_nothing_of_its_answer_is_disconnected(front: Daemon) -> None:
    """A 5.7 MB answer to a client that stops reading: cut after client_timeout_s, not held for ever."""
    body = json.dumps({"model": "smollm2", "content": "the quick brown fox jumps " * 40000, "with_pieces": True})
    whole = len(front.http.post("/tokenize", content=body).content)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", front.port))
    sock.sendall(post("/tokenize", body.encode()))
    assert metric(front, "xgen_front_clients") >= 2  # this one and the scrape's
    time.sleep(PATIENCE_S + 3)  # reads nothing
    sock.settimeout(30)
    got = read_all(sock)
    sock.close()
    assert got.startswith(b"HTTP/1.1 200") and len(got) < whole
    assert "took nothing of its answer for 3 s" in front.log()
    assert dropped(front, "answer_not_taken") >= 1
    assert front.http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_large_answer_leaves_its_backend_connection_fit_for_the_next_request(front: Daemon) -> None:
    """A direct answer over the client's buffer pauses the backend connection while it is written;
    that connection went back to the pool still paused, and the next request on it hung."""
    big = {"model": "smollm2", "content": "the quick brown fox jumps " * 40000, "with_pieces": True}
    with httpx.Client(base_url=front.url, timeout=20) as http:
        for _ in range(3):
            assert len(http.post("/tokenize", json=big).json()["tokens"]) > 100_000
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_waiting_longer_than_client_timeout_s_for_an_answer_is_not_a_stall(front: Daemon) -> None:
    """Only a client that sends or takes nothing is timed out, not one whose backend is slow."""
    pid = front.model("smollm2")["pid"]  # type: ignore[index]
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(front.http.post, "/v1/chat/completions", json=CHAT)
        time.sleep(0.5)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(PATIENCE_S + 2)
        os.kill(pid, signal.SIGCONT)
        assert answer.result(timeout=30).status_code == 200


def test_a_spoofed_forwarded_for_is_replaced_by_the_real_address(front: Daemon) -> None:
    # the app believes x-forwarded-for only from the front, which sets it to the real peer
    r = front.http.get("/api/management/status", headers={"x-forwarded-for": "203.0.113.9"})
    assert r.status_code == 200


def test_a_backend_killed_under_requests(front: Daemon) -> None:
    """Killed mid-stream: the client's stream is cut off (never a clean end it would trust);
    killed before it answers: a 502 that names the model; then the model comes back."""
    pid = front.model("smollm2")["pid"]  # type: ignore[index]
    body = {**CHAT, "stream": True, "max_tokens": 2000, "ignore_eos": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{front.url}/v1/chat/completions",
                                                       json=body) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in lines:
                pass
    pid = _restarted(front, pid)
    os.kill(pid, signal.SIGSTOP)  # it takes the request and never answers...
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(front.http.post, "/v1/chat/completions", json=CHAT)
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)  # ...then dies
        r = answer.result(timeout=30)
    assert r.status_code == 502 and "backend of 'smollm2'" in r.json()["error"]["message"]
    _restarted(front, pid)
    assert front.http.post("/v1/chat/completions", json=CHAT).status_code == 200
    metrics = front.http.get("/metrics").text
    assert 'xgen_proxy_requests_total{model="smollm2",status="502"} 1.0' in metrics
    assert 'xgen_proxy_inflight_requests{model="smollm2"} 0.0' in metrics


def _restarted(front: Daemon, pid: int) -> int:
    status = front.until(lambda s: any(m["name"] == "smollm2" and m["state"] == "LOADED" and m["pid"] != pid
                                       for m in s["loaded_models"]), what="the restart")
    return int(next(m["pid"] for m in status["loaded_models"] if m["name"] == "smollm2"))


def _outside_address() -> str | None:
    """An address of this machine that is not loopback, or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: the route picks the address
            address: str = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_status_is_for_loopback_unless_public_even_with_a_forged_header(tmp_path: Path, default_model: Path,
                                                                       tiny_gguf: Path, llama_server: Path) -> None:
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback")
    spec = ("server: {{host: 0.0.0.0, port: {PORT}, port_range: [{LOW}, {HIGH}], stop_grace_s: 5}}\n"
            + ONE_MODEL)
    with launched(tmp_path, default_model, tiny_gguf, spec, header=False) as d, \
            httpx.Client(base_url=f"http://{outside}:{d.port}", timeout=30) as http:
        r = http.get("/api/management/status", headers={"x-forwarded-for": "127.0.0.1"})
        assert r.status_code == 403 and "loopback" in r.json()["error"]
        assert http.get("/metrics").status_code == 403
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200  # /v1 is for everyone
        assert d.http.get("/api/management/status").status_code == 200


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path, default_model: Path,
                                                       tiny_gguf: Path, llama_server: Path) -> None:
    d = Daemon(tmp_path, default_model, tiny_gguf)
    with socket.create_server(("127.0.0.1", d.port)):
        d.write(ONE_MODEL)
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "reconciler.cli", "serve", d.file.name], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"port {d.port} on 127.0.0.1 is taken" in done.stderr
    assert time.monotonic() - t0 < 30 and "llama-server" not in done.stderr  # no model was started
    assert not list((tmp_path / ".xgen").glob("**/*.pid"))


def test_sigterm_with_a_client_idle_on_a_kept_alive_connection_exits_at_once(tmp_path: Path, default_model: Path,
                                                                          tiny_gguf: Path,
                                                                          llama_server: Path) -> None:
    """An idle kept-alive client must not hold the drain for its 30 s."""
    d = Daemon(tmp_path, default_model, tiny_gguf)
    d.launch(ONE_MODEL)
    sock, f = connect(d.port)
    sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    assert read_response(f)[0] == 200
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 10
    assert f.read() == b""
    sock.close()



def test_a_low_open_files_limit_is_raised_so_every_client_is_served(tmp_path: Path, default_model: Path,
                                                                   tiny_gguf: Path, llama_server: Path) -> None:
    """Started with a service's low soft limit (here 256), xgen raises it to the hard one, as Go
    programs do: 400 clients at once (and as many app connections) are all answered. Before,
    the connections past the limit were dropped and nothing said why."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard open files limit here is {hard}")
    d = Daemon(tmp_path, default_model, tiny_gguf)
    d.preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    d.launch(ONE_MODEL)
    clients = [connect(d.port) for _ in range(400)]
    try:
        assert d.proc is not None
        limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
        soft = next(line.split()[3] for line in limits.splitlines() if line.startswith("Max open files"))
        assert soft != "256" and "open files at most" in d.log()
        for sock, _ in clients:
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert [read_response(f)[0] for _, f in clients] == [200] * 400
    finally:
        for sock, _ in clients:
            sock.close()
        d.stop()
