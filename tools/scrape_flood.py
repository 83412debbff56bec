"""A /metrics scrape flood: LOOPS threads (default 16) each scraping URL back to back for SECONDS; prints
the scrapes, their rate and their HTTP statuses. docs/benchmarks.md, "/metrics under a scrape flood".

    python tools/scrape_flood.py http://127.0.0.1:9312/metrics 9 [16]
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import urllib.error
import urllib.request


def main(url: str, seconds: float, loops: int) -> None:
    end = time.monotonic() + seconds
    codes: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def loop() -> None:
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    response.read()
                    code: object = response.status
            except urllib.error.HTTPError as exc:
                code = exc.code
            except OSError as exc:
                code = type(exc).__name__
            with lock:
                codes[code] += 1

    threads = [threading.Thread(target=loop) for _ in range(loops)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed, total = time.monotonic() - start, sum(codes.values())
    print(f"flood: {loops} loops, {total} scrapes in {elapsed:.1f} s ({total / elapsed:.0f}/s), {dict(codes)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 16)
