"""A small, fast HTTP/1.1 load generator for loopback floods, and a raw-bytes exchange for odd requests.

Locust spends far more CPU per request than the app, so it cannot outrun it on a small machine. This one
writes pre-built request bytes on plain sockets with asyncio and parses only the status line and the
headers it needs. It keeps a connection alive while the server does (gunicorn's sync workers close after
every answer, so it then reconnects), and counts, per (path, status), every answer it read in full.
Anything that is not an HTTP answer (refused or reset connections, timeouts, truncated answers) is a
transport error, counted by kind, never mixed into the answers.

Bounded twice: it stops at `seconds` or after `max_requests` attempts, whichever comes first.

    python -m tooling.native.flood http://127.0.0.1:5000 --seconds 30 --max-requests 500000 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# Weights like locustfile.py: mostly dice rolls, some health checks, a few intentional failures.
DEFAULT_MIX = {"/": 10, "/health": 2, "/fail": 1}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class TransportError(Exception):
    """No complete HTTP answer; the message is the kind counted in FloodResult.errors."""


@dataclass
class FloodResult:
    counts: Counter = field(default_factory=Counter)  # (path, status) -> answers
    errors: Counter = field(default_factory=Counter)  # kind of transport error -> occurrences
    attempts: int = 0
    seconds: float = 0.0
    # path -> requests written but not answered: the app may or may not have served (and counted) them.
    unanswered: Counter = field(default_factory=Counter)
    per_second: list[int] = field(default_factory=list)  # answers in each second of the run, in order

    @property
    def answered(self) -> int:
        return sum(self.counts.values())

    @property
    def rate(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        return {
            "counts": [{"path": p, "status": s, "count": n} for (p, s), n in sorted(self.counts.items())],
            "errors": dict(self.errors), "attempts": self.attempts, "seconds": self.seconds,
            "unanswered": dict(self.unanswered), "per_second": self.per_second,
        }

    @classmethod
    def from_json(cls, data: dict) -> FloodResult:
        return cls(Counter({(r["path"], r["status"]): r["count"] for r in data["counts"]}),
                   Counter(data["errors"]), data["attempts"], data["seconds"], Counter(data["unanswered"]),
                   data["per_second"])


def request_bytes(method: str, path: str, host: str, extra_headers: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: zerocode-flood\r\n"
            f"Accept: */*\r\n{extra_headers}\r\n").encode("latin-1")


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and lower-cased headers of a response head (without the final blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise TransportError("bad status line")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def keeps_alive(head: bytes, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if head.startswith(b"HTTP/1.0"):
        return connection == "keep-alive"
    return connection != "close"


async def _read_answer(reader: asyncio.StreamReader, head_only: bool = False) -> tuple[int, bool]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise TransportError("closed before an answer" if not exc.partial else "truncated head") from None
    except asyncio.LimitOverrunError:
        raise TransportError("head too long") from None
    status, headers = parse_head(head[:-4])
    alive = keeps_alive(head, headers)
    if head_only or status in (204, 304) or 100 <= status < 200:
        return status, alive
    if "content-length" in headers:
        try:
            await reader.readexactly(int(headers["content-length"]))
        except asyncio.IncompleteReadError:
            raise TransportError("truncated body") from None
        return status, alive
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise TransportError("chunked answers are not supported")
    await reader.read()  # delimited by the end of the connection
    return status, False


class _Budget:
    def __init__(self, deadline: float, max_requests: int):
        self.deadline, self.left = deadline, max_requests

    def take(self) -> bool:
        if self.left <= 0 or time.monotonic() >= self.deadline:
            return False
        self.left -= 1
        return True


async def _connection_loop(host: str, port: int, paths, requests: dict[str, bytes], budget: _Budget,
                           result: FloodResult, timeout: float, started: float) -> None:
    reader = writer = None

    def close():
        nonlocal reader, writer
        if writer is not None:
            writer.transport.abort()  # no FIN handshake to wait for: the next request needs the CPU
        reader = writer = None

    while budget.take():
        result.attempts += 1
        path = next(paths)
        if writer is None:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            except (OSError, TimeoutError) as exc:
                result.errors[f"connect: {type(exc).__name__}"] += 1
                close()
                await asyncio.sleep(0.01)  # a refusing server is not hammered in a tight loop
                continue
        try:
            writer.write(requests[path])
            status, alive = await asyncio.wait_for(_read_answer(reader), timeout)
        except (OSError, TimeoutError, TransportError) as exc:
            kind = str(exc) if isinstance(exc, TransportError) else type(exc).__name__
            result.errors[kind] += 1
            result.unanswered[path] += 1
            close()
            continue
        result.counts[(path, status)] += 1
        second = int(time.monotonic() - started)
        while len(result.per_second) <= second:
            result.per_second.append(0)
        result.per_second[second] += 1
        if not alive:
            close()
    close()


async def flood_async(url: str, seconds: float, max_requests: int, concurrency: int = 32,
                      mix: dict[str, int] | None = None, timeout: float = 10.0) -> FloodResult:
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    if host not in LOOPBACK:
        raise ValueError(f"the flood only targets loopback, not {host}")
    mix = mix or DEFAULT_MIX
    # A fixed, interleaved order: the mix is exact over every full cycle and no random numbers are drawn.
    order = [p for p, _ in sorted(mix.items())]
    cycle = list(itertools.chain.from_iterable(
        [p for p in order if mix[p] > i] for i in range(max(mix.values()))))
    paths = itertools.cycle(cycle)
    requests = {p: request_bytes("GET", p, f"{host}:{port}") for p in mix}
    result = FloodResult()
    started = time.monotonic()
    budget = _Budget(started + seconds, max_requests)
    await asyncio.gather(*(_connection_loop(host, port, paths, requests, budget, result, timeout, started)
                           for _ in range(concurrency)))
    result.seconds = time.monotonic() - started
    return result


def flood(url: str, seconds: float, max_requests: int, concurrency: int = 32,
          mix: dict[str, int] | None = None, timeout: float = 10.0) -> FloodResult:
    return asyncio.run(flood_async(url, seconds, max_requests, concurrency, mix, timeout))


# ------------------------------------------------------------------------------ one raw exchange


@dataclass
class RawAnswer:
    status: int | None  # None: the server closed without an HTTP answer
    head: bytes
    error: str | None = None


def raw_exchange(host: str, port: int, data: bytes, timeout: float = 5.0, head_only: bool = False) -> RawAnswer:
    """Send `data` exactly as given on a new connection and read the first answer's status line and head."""
    if host not in LOOPBACK:
        raise ValueError(f"raw requests only go to loopback, not {host}")
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError as exc:  # the server may answer and close before reading everything
            error = type(exc).__name__
        else:
            error = None
        received = b""
        deadline = time.monotonic() + timeout
        try:
            while b"\r\n\r\n" not in received and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except OSError as exc:
            error = error or type(exc).__name__
    head = received.split(b"\r\n\r\n", 1)[0]
    try:
        status, _ = parse_head(head) if head else (None, {})
    except TransportError:
        status = None
    return RawAnswer(status, head, error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="base URL on loopback, e.g. http://127.0.0.1:5000")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-requests", type=int, default=500_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = flood(args.url, args.seconds, args.max_requests, args.concurrency)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result.to_json(), out)
    print(f"{result.answered} answers in {result.seconds:.1f}s ({result.rate:.0f}/s); "
          f"by path and status {dict(result.counts)}; transport errors {dict(result.errors)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
