"""What one request costs on this mount's link, measured from the mount's own requests.

A GET costs a round trip before its first byte (the server's time to first byte plus the
network's) and then its bytes at one connection's bandwidth. Both are estimated here from the
block fetches the cache makes anyway (no probe of its own):
- a streamed GET of several blocks gives both: its first block arrived `rtt + block/bandwidth`
  after the request, the later ones `block/bandwidth` apart;
- a small exact range gives the round trip alone.
The estimates are moving averages (EWMA_WEIGHT per sample), so a link that changes is followed.
Nothing is decided on them before KNOWN_AFTER samples (until then the cache fetches as if
requests were dear: long GETs, one stream per run); DEFAULT_RTT and DEFAULT_BANDWIDTH only start
the averages.

What they decide (`blocks_per_rtt`): how many blocks one connection delivers in the time a new
request waits for its first byte. A block a reader is waiting for that a running stream would
reach later than a new request would bring it is fetched by a new request (sidecar.cache.streams),
and blocks a reader waits for are fetched as parts of that size, in parallel (sidecar.cache.blocks).
"""

from __future__ import annotations

DEFAULT_RTT = 0.02  # s before a response's first byte
DEFAULT_BANDWIDTH = 50e6  # bytes/s of one connection
EWMA_WEIGHT = 0.2  # of a new sample in the running estimate
SMALL_RANGE = 64 * 1024  # an exact range this small costs about a round trip alone
KNOWN_AFTER = 4  # samples of the round trip before the estimate decides anything
MIN_STREAM_SPAN = 0.002  # s between a stream's first and last block, below which it says nothing of bandwidth


class LinkEstimate:
    def __init__(self, rtt: float = DEFAULT_RTT, bandwidth: float = DEFAULT_BANDWIDTH) -> None:
        self.rtt = rtt
        self.bandwidth = bandwidth
        self.samples = 0

    def _mix(self, old: float, new: float) -> float:
        return new if self.samples == 0 else old + EWMA_WEIGHT * (new - old)

    def observe_stream(self, started: float, first_at: float, last_at: float, first_bytes: int, later_bytes: int) -> None:
        """A GET asked at `started` whose first piece (`first_bytes`) arrived at `first_at` and
        whose following `later_bytes` had arrived by `last_at` (monotonic seconds)."""
        if later_bytes > 0 and last_at - first_at >= MIN_STREAM_SPAN:
            self.bandwidth = self._mix(self.bandwidth, later_bytes / (last_at - first_at))
        rtt = first_at - started - first_bytes / self.bandwidth
        if rtt > 0:
            self.rtt = self._mix(self.rtt, rtt)
            self.samples += 1

    def observe_request(self, seconds: float, size: int) -> None:
        """A small GET (an exact range) that took `seconds` for `size` bytes."""
        if size <= SMALL_RANGE:
            rtt = seconds - size / self.bandwidth
            if rtt > 0:
                self.rtt = self._mix(self.rtt, rtt)
                self.samples += 1

    def blocks_per_rtt(self, block_size: int) -> float | None:
        """Blocks one connection delivers while a new request waits for its first byte; None
        while the link is not measured yet."""
        if self.samples < KNOWN_AFTER:
            return None
        return self.rtt * self.bandwidth / block_size

    def waited_part(self, block_size: int, most: int) -> int:
        """Blocks per GET for blocks a reader waits for: what one connection brings in a round
        trip (at least one, at most `most`, which is also the answer until the link is measured)."""
        per_rtt = self.blocks_per_rtt(block_size)
        return most if per_rtt is None else max(1, min(most, round(per_rtt)))

    def as_dict(self) -> dict[str, float]:
        return {"rtt_ms": round(self.rtt * 1000, 2), "bandwidth_mbps": round(self.bandwidth / 1e6, 1), "samples": self.samples}
