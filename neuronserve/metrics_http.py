"""GET /metrics served off the serving event loop: a small HTTP/1.1 server on an event loop of its own, in
its own thread ("metrics-http"), with a bound on how often the page is rendered.

Why a bound on renders and not only a thread: the render (prometheus-client writing the page) holds the
GIL, so a thread alone moves the sockets off the serving loop but not the CPU; 16 scrape loops on the
old in-loop server raised gRPC P99 from 8 ms to 690 ms. So scrapes are coalesced: at most one render
runs at a time, renders start at least `min_interval_s` apart (default 0.25 s: at most 4 renders a
second, whatever the scrape rate), and every scrape waiting for the next render shares it. A scrape is
always answered by a render that started after it arrived (never a cached page: a scrape after a request
sees that request counted), at the cost of waiting up to min_interval_s when scrapes come faster than
that (Prometheus scrapes every 15 s or so and never waits). Scrapes waiting beyond `max_waiting` (64) are
answered 503 at once, so an open-loop flood cannot pile up connections either. The wait also throttles
closed-loop scrapers: 16 loops make 16 requests per render, not 1,000 a second.

HTTP as before: GET or HEAD /metrics -> 200 text/plain; version=0.0.4; another method 405 (Allow: GET,
HEAD); another path or a malformed or oversized request line 404; one request per connection, its head
read within READ_TIMEOUT_S. The source is any object with `render()` -> str, or an awaitable of one (the
pool's gathers its workers' pages on this loop), and optionally `add_collector(fn)`: the server adds its
own counters (neuronserve_metrics_renders_total, neuronserve_metrics_scrapes_total{result}) through it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import threading
import time
from dataclasses import dataclass

from neuronserve.metric_families import Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScrapeStats:
    """Cumulative counts of one MetricsServer: renders started; scrapes answered by a render they started
    (rendered), by one another scrape started (shared), or refused with 503 (rejected)."""

    renders: int
    rendered: int
    shared: int
    rejected: int


class MetricsServer:
    """GET /metrics -> source.render(), on a thread and event loop of its own; `start(host, port) -> port`
    and `close()` are awaited on the caller's loop. See the module docstring for the render bound."""

    READ_TIMEOUT_S = 5.0
    MIN_INTERVAL_S = 0.25
    MAX_WAITING = 64
    CLOSE_TIMEOUT_S = 5.0

    def __init__(self, source, *, min_interval_s: float = MIN_INTERVAL_S, max_waiting: int = MAX_WAITING) -> None:
        self.source = source
        self.min_interval_s = float(min_interval_s)
        self.max_waiting = int(max_waiting)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        # Render state, touched on the metrics loop only.
        self._next: asyncio.Future | None = None  # the render scrapes now waiting will share (not started)
        self._render_lock: asyncio.Lock | None = None
        self._last_start = float("-inf")
        self._waiting = 0
        # Counters: written on the metrics loop, read anywhere (ints).
        self._renders = 0
        self._rendered = 0
        self._shared = 0
        self._rejected = 0
        add_collector = getattr(source, "add_collector", None)
        if add_collector is not None:
            add_collector(self.samples)

    # -- lifecycle (called on the caller's event loop) ------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port) from the metrics thread; returns the bound port. OSError
        (e.g. the port is taken) is raised here, with the thread already stopped."""
        if self._loop is not None:
            raise RuntimeError("MetricsServer already started")
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(loop,), name="metrics-http", daemon=True)
        self._thread.start()
        try:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._listen(host, port), loop))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening, end open scrapes (their connections are closed unanswered) and the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            await asyncio.wait_for(
                asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._shutdown(), loop)), self.CLOSE_TIMEOUT_S
            )
        except (asyncio.TimeoutError, RuntimeError) as exc:  # a render stuck in a collector: the thread is a daemon
            log.warning("the metrics server did not stop cleanly: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, self.CLOSE_TIMEOUT_S)
        if not thread.is_alive():
            loop.close()

    def stats(self) -> ScrapeStats:
        return ScrapeStats(self._renders, self._rendered, self._shared, self._rejected)

    def samples(self) -> list[Sample]:
        """The server's own counters, as a metrics collector."""
        return [
            Sample("neuronserve_metrics_renders_total", (), self._renders),
            Sample("neuronserve_metrics_scrapes_total", (("result", "rendered"),), self._rendered),
            Sample("neuronserve_metrics_scrapes_total", (("result", "shared"),), self._shared),
            Sample("neuronserve_metrics_scrapes_total", (("result", "rejected"),), self._rejected),
        ]

    # -- the metrics thread -----------------------------------------------------------------------

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    async def _listen(self, host: str, port: int) -> int:
        self._render_lock = asyncio.Lock()
        if host != "::":
            self._server = await asyncio.start_server(self._handle, host, port)
        else:  # the IPv6 wildcard takes IPv4 too, as gRPC's port does (asyncio alone would set IPV6_V6ONLY)
            sock = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
            try:
                self._server = await asyncio.start_server(self._handle, sock=sock)
            except BaseException:
                sock.close()
                raise
        return int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _page(self) -> str:
        """A page rendered after now: join the render not yet started, or start one (after the previous
        render and at least min_interval_s after its start)."""
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._rendered += 1
            self._next = loop.create_future()
            loop.create_task(self._render(self._next))
        else:
            self._shared += 1
        return await asyncio.shield(self._next)

    async def _render(self, result: asyncio.Future) -> None:
        assert self._render_lock is not None
        try:
            async with self._render_lock:  # one render at a time
                delay = self._last_start + self.min_interval_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._next = None  # scrapes arriving from now on wait for a later render
                self._last_start = time.monotonic()
                self._renders += 1
                started = time.perf_counter()
                text = self.source.render()
                if inspect.isawaitable(text):
                    text = await text
                log.debug("rendered metrics in %.1f ms", (time.perf_counter() - started) * 1e3)
                result.set_result(text)
        except asyncio.CancelledError:  # the server is closing
            result.cancel()
            raise
        except Exception as exc:
            log.exception("rendering /metrics failed")
            result.set_exception(exc)
            result.exception()  # retrieved: no "never retrieved" warning when nobody waits for it any more

    async def _read_request_line(self, reader: asyncio.StreamReader) -> bytes:
        """The request line; the headers are read and ignored. Lines are bounded by the reader's limit."""
        request_line = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        return request_line

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:  # one deadline for the whole request: a client dripping header lines is cut off too
                request_line = await asyncio.wait_for(self._read_request_line(reader), self.READ_TIMEOUT_S)
            except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):  # a line past the limit
                request_line = b""
            parts = request_line.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            extra, ctype = "", "text/plain; charset=utf-8"
            if path != "/metrics":
                status, body = "404 Not Found", b"not found: GET /metrics\n"
            elif method not in ("GET", "HEAD"):
                status, body, extra = (
                    "405 Method Not Allowed",
                    b"method not allowed: GET /metrics\n",
                    "Allow: GET, HEAD\r\n",
                )
            elif self._waiting >= self.max_waiting:
                self._rejected += 1
                status, body, extra = "503 Service Unavailable", b"too many concurrent scrapes\n", "Retry-After: 1\r\n"
            else:
                self._waiting += 1
                try:
                    text = await self._page()
                    status, body, ctype = "200 OK", text.encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8"
                except Exception:  # logged by _render
                    status, body = "500 Internal Server Error", b"rendering the metrics failed\n"
                finally:
                    self._waiting -= 1
            body_out = b"" if method == "HEAD" else body
            head = f"HTTP/1.1 {status}\r\n{extra}Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode("latin-1") + body_out)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
