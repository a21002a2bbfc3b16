"""The real `outrigger serve` over HTTPS under hostile clients, load and SIGTERM.

Raw TLS sockets play the clients the API server (or an attacker) can be: one that sends half
its headers, a chunked body without its end or less body than its Content-Length (all cut off
with 408 within the read timeout); a stream of the largest admissible reviews while the probes
are called (answered meanwhile); thousands of distinct pods with large annotations (memory
stays bounded); and SIGTERM under keep-alive load (every request written is answered, idle
connections included, and the process exits within its bound). Loops are bounded in count and
time; the figures are printed (`pytest -s`) rather than asserted, but for generous bounds that
the old behaviour (never, 5-9 s, +103 MiB) broke.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import admission_review, largest_admissible_config
from tests.test_https import Server, _stop, start_server


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, subprocess.Popen[bytes]]]:
    server, process = start_server(tmp_path_factory.mktemp("hardening"))
    try:
        yield server, process
    finally:
        _stop(process)


def connect(server: Server, timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    return server.trusting_ca().wrap_socket(raw, server_hostname="localhost")


def request_bytes(body: bytes, extra: str = "") -> bytes:
    head = (
        "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def read_response(sock: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes] | None:
    """One HTTP/1.1 response, or None when the connection closes before any of it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            if data:
                raise AssertionError(f"connection closed mid-response: {data[:200]!r}")
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed mid-body")
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def read_until_closed(sock: ssl.SSLSocket) -> bytes:
    """Everything the server sends until it closes the connection (or resets it)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return received


def review_body(annotations: dict[str, str], name: str = "p") -> bytes:
    pod = {
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }
    return orjson.dumps(admission_review(pod, uid=f"uid-{name}"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# Slow clients --------------------------------------------------------------------------------

SLOW_CLIENTS = {
    "partial-headers": b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Ty",
    "chunked-without-end": (
        b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"api\r\n'
    ),
    "short-body": b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{}",
    "silent": b"",
}


def test_slow_clients_are_cut_off(running: tuple[Server, subprocess.Popen[bytes]]) -> None:
    server, _ = running
    outcomes: dict[str, tuple[float, bytes]] = {}

    def slow(name: str, data: bytes) -> None:
        sock = connect(server, timeout=30)
        started = time.monotonic()
        sock.sendall(data)
        received = read_until_closed(sock)
        outcomes[name] = (time.monotonic() - started, received)
        sock.close()

    threads = [threading.Thread(target=slow, args=item) for item in SLOW_CLIENTS.items()]
    for thread in threads:
        thread.start()
    # Meanwhile the server answers everyone else.
    with httpx.Client(verify=server.trusting_ca(), timeout=5) as client:
        assert client.get(f"{server.url}/healthz").status_code == 200
    for thread in threads:
        thread.join(timeout=40)
    print({name: round(seconds, 2) for name, (seconds, _) in outcomes.items()})
    assert set(outcomes) == set(SLOW_CLIENTS), "a slow client was never disconnected"
    for name, (seconds, received) in outcomes.items():
        assert seconds < 30, f"{name} held its connection for {seconds:.0f} s"
        assert received.startswith(b"HTTP/1.1 408 "), (name, received[:100])


# One heavy review does not starve the others ---------------------------------------------


def test_heavy_reviews_do_not_starve_the_probes(
    running: tuple[Server, subprocess.Popen[bytes]],
) -> None:
    server, _ = running
    config = largest_admissible_config()
    stop = threading.Event()
    answered: list[int] = []

    def heavy() -> None:
        sock = connect(server)
        index = 0
        while not stop.is_set():
            index += 1  # distinct pods: nothing cached
            annotations = {
                "outrigger.dev/inject": "ambassador",
                "outrigger.dev/ambassador-config": config + f"\n# {index}",
            }
            sock.sendall(request_bytes(review_body(annotations, f"heavy-{index}")))
            response = read_response(sock)
            assert response is not None and response[0] == 200
            answered.append(index)
        sock.close()

    workers = [threading.Thread(target=heavy) for _ in range(2)]
    for worker in workers:
        worker.start()
    latencies = []
    try:
        with httpx.Client(verify=server.trusting_ca(), timeout=2.0) as client:
            time.sleep(0.3)
            for _ in range(40):
                started = time.monotonic()
                assert client.get(f"{server.url}/healthz").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.02)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    print(f"heavy reviews answered: {len(answered)}; /healthz worst {max(latencies) * 1000:.1f} ms")
    assert answered, "no heavy review was answered"


# Memory ------------------------------------------------------------------------------------


def test_memory_stays_bounded_over_distinct_large_pods(
    running: tuple[Server, subprocess.Popen[bytes]],
) -> None:
    server, process = running
    padding = "#" * 12_000
    sock = connect(server)

    def send(index: int) -> None:
        upstream = f"{{a: {{address: 'a{index}.example.com:80', port: 9000}}}}"
        config = f"upstreams: {upstream}\n{padding}{index}"
        annotations = {
            "outrigger.dev/inject": "ambassador",
            "outrigger.dev/ambassador-config": config,
        }
        sock.sendall(request_bytes(review_body(annotations, f"m{index}")))
        response = read_response(sock)
        assert response is not None and response[0] == 200

    for index in range(200):  # warm up: allocator pools, code paths
        send(index)
    before = rss_kib(process.pid)
    for index in range(200, 2200):
        send(index)
    after = rss_kib(process.pid)
    sock.close()
    print(f"RSS {before} KiB after 200 pods, {after} KiB after 2,200 ({after - before:+d} KiB)")
    assert after - before < 40 * 1024, "RSS grew by more than 40 MiB over 2,000 distinct pods"


# SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_under_load_answers_every_request_it_was_sent(tmp_path: Path) -> None:
    server, process = start_server(tmp_path)
    body = review_body({"outrigger.dev/inject": "log-watcher"})
    lost: list[str] = []
    answered: list[int] = []
    stalled = connect(server, timeout=30)
    stalled.sendall(b"POST /mutate HTTP/1.1\r\nHost: localhost\r\n")  # never finishes
    idle = connect(server)
    idle.sendall(request_bytes(body))
    assert read_response(idle) is not None  # now an idle keep-alive connection

    def client() -> None:
        while True:
            try:
                sock = connect(server, timeout=10)
            except OSError:
                return  # no longer accepting: the shutdown has begun
            while True:
                try:
                    sock.sendall(request_bytes(body))
                except OSError:
                    break  # closed before this request was written: not lost
                try:
                    response = read_response(sock)
                except (OSError, AssertionError) as error:
                    lost.append(repr(error))
                    break
                if response is None:
                    lost.append("closed with no answer to a written request")
                    break
                answered.append(response[0])
                if response[1].get("connection") == "close":
                    break
            sock.close()

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(0.5)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the idle connection's next request, after SIGTERM
    idle.sendall(request_bytes(body))
    late = read_response(idle)
    for thread in clients:
        thread.join(timeout=30)
    returncode = process.wait(timeout=30)
    took = time.monotonic() - signalled
    stalled.close()
    print(f"answered {len(answered)}, lost {len(lost)}, exit {returncode} after {took:.1f} s")
    assert lost == []
    assert answered and set(answered) == {200}
    assert late is not None and late[0] == 200 and late[1].get("connection") == "close"
    assert returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    assert took < 20, "a stalled client kept the server alive"


# Reviews answered in place, and the requests that still go through ASGI ---------------------


def _exchange(
    server: Server, raw: bytes, answers: int = 1
) -> list[tuple[int, dict[str, str], bytes]]:
    sock = connect(server)
    try:
        sock.sendall(raw)
        responses = [read_response(sock) for _ in range(answers)]
    finally:
        sock.close()
    assert all(response is not None for response in responses)
    return [response for response in responses if response is not None]


def test_a_review_gets_the_same_answer_whichever_way_it_is_framed(
    running: tuple[Server, subprocess.Popen[bytes]],
) -> None:
    """The API server's reviews (Content-Length, a `?timeout=` query) are answered by the
    protocol in place; chunked bodies and requests pipelined behind another go through
    uvicorn's ASGI cycle. Both must give the same answer, framed alike."""
    server, _ = running
    body = review_body({"outrigger.dev/inject": "log-watcher"}, "framed")
    plain = _exchange(server, request_bytes(body))[0]
    with_query = _exchange(server, request_bytes(body).replace(b"/mutate", b"/mutate?timeout=10s"))[
        0
    ]
    chunked_head = (
        b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    half = len(body) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:]))
    chunked = _exchange(server, chunked_head + chunks + b"0\r\n\r\n")[0]
    health = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    behind_health = _exchange(server, health + request_bytes(body), answers=2)
    assert behind_health[0][0] == 200 and b"ok" in behind_health[0][2]
    answers = [plain, with_query, chunked, behind_health[1]]
    assert {status for status, _, _ in answers} == {200}
    assert len({answer for _, _, answer in answers}) == 1
    assert orjson.loads(plain[2])["response"]["patchType"] == "JSONPatch"
    for _, headers, answer in answers:
        assert headers["content-type"] == "application/json"
        assert int(headers["content-length"]) == len(answer)
        assert "date" in headers


def test_an_http_1_0_review_is_answered_and_the_connection_closed(
    running: tuple[Server, subprocess.Popen[bytes]],
) -> None:
    server, _ = running
    body = review_body({"outrigger.dev/inject": "log-watcher"}, "old")
    sock = connect(server)
    sock.sendall(request_bytes(body).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    response = read_response(sock)
    assert response is not None and response[0] == 200
    assert response[1].get("connection") == "close"
    assert orjson.loads(response[2])["response"]["uid"] == "uid-old"
    assert read_until_closed(sock) == b""  # closed after the answer
    sock.close()


def test_a_malformed_review_in_place_is_a_400_and_the_connection_stays_usable(
    running: tuple[Server, subprocess.Popen[bytes]],
) -> None:
    server, _ = running
    good = review_body({"outrigger.dev/inject": "log-watcher"}, "after")
    bad, after = _exchange(server, request_bytes(b'{"kind": 7') + request_bytes(good), answers=2)
    assert bad[0] == 400
    assert orjson.loads(bad[2])["error"].startswith("body is not valid JSON")
    assert after[0] == 200 and orjson.loads(after[2])["response"]["uid"] == "uid-after"
