"""Read-ahead policy for one open file handle.

The window (in blocks) starts at zero, becomes one block when a handle reads from its start or
continues where it left off, doubles each time the reader enters a new block sequentially, up to
`max_blocks` (so the bytes prefetched per handle are bounded by max_blocks * block_size), and
shrinks to a quarter on every non-sequential read, so random readers fetch only what they read.
Reads that arrive slightly out of order (the kernel issues several at once) within `slack` bytes
of the expected offset (default: a quarter block, at most 1 MiB) still count as sequential.

Blocks are requested in batches: only when what is already requested ahead of the reader falls
to half the window or less is the window topped up, so each request covers about half a window
(several blocks in one streamed GET) rather than one block per step.
"""

from __future__ import annotations


class ReadAhead:
    def __init__(self, block_size: int, max_blocks: int = 8, slack: int | None = None) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.slack = min(1024 * 1024, block_size // 4) if slack is None else slack
        self.window = 0
        self._next = 0
        self._block = -1
        self._requested_end = 0  # first block index not yet requested ahead of the reader

    def on_read(self, offset: int, size: int) -> range:
        """Records a read and returns the block indices to prefetch (possibly empty)."""
        block = offset // self.block_size
        last = (offset + max(size, 1) - 1) // self.block_size
        sequential = abs(offset - self._next) <= self.slack
        if sequential:
            if self.window == 0:
                self.window = 1
            elif block != self._block:
                self.window = min(self.window * 2, self.max_blocks)
            self._next = max(self._next, offset + size)
        else:
            self.window //= 4
            self._next = offset + size
            self._requested_end = 0
        self._block = block
        if self.window == 0:
            return range(0)
        self._requested_end = max(self._requested_end, last + 1)
        if self._requested_end - (last + 1) > self.window // 2:
            return range(0)
        target = last + 1 + self.window
        todo = range(self._requested_end, target)
        self._requested_end = target
        return todo
