"""The load generator's latency histograms: HdrHistograms of microseconds, one shape everywhere.

Every histogram the client processes fill and the parent merges (latencies, send lateness, the
per-second progress) is made here, so their encoded forms can be added to one another.
"""

from __future__ import annotations

HIST_MAX_US = 120_000_000  # 2 minutes: the histogram's highest trackable latency
HIST_DIGITS = 3


def new_histogram():
    """An empty histogram of microseconds, 1 us to HIST_MAX_US at HIST_DIGITS significant digits."""
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(1, HIST_MAX_US, HIST_DIGITS)


def decode_histogram(encoded: bytes):
    """A histogram from its encoded form (empty bytes: an empty histogram)."""
    hist = new_histogram()
    if encoded:
        hist.decode_and_add(encoded)
    return hist


def count_above(hist, bound: float) -> int:
    """How many recorded values are above `bound` (at the histogram's precision)."""
    if hist.get_total_count() == 0:
        return 0
    return sum(
        it.count_at_value_iterated_to
        for it in hist.get_recorded_iterator()
        if hist.get_lowest_equivalent_value(it.value_iterated_to) > bound
    )


def micros(seconds: float) -> int:
    """A duration in whole microseconds, clamped to what a histogram tracks."""
    return min(HIST_MAX_US, max(1, int(seconds * 1e6)))
