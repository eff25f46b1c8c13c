"""Read-ahead policy for one open file handle.

The window (in blocks) starts at zero, becomes one block when a handle reads from its start or
continues where it left off, doubles each time the reader enters a new block sequentially, up to
`max_blocks` (so the bytes prefetched per handle are bounded by max_blocks * block_size), and
shrinks to a quarter on every non-sequential read, so random readers fetch only what they read.
Reads that arrive slightly out of order (the kernel issues several at once) within `slack` bytes
of the expected offset (default: a quarter block, at most 1 MiB) still count as sequential.
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

    def on_read(self, offset: int, size: int) -> range:
        """Records a read and returns the block indices to prefetch (possibly empty)."""
        block = offset // self.block_size
        sequential = abs(offset - self._next) <= self.slack
        if sequential:
            if self.window == 0:
                self.window = 1
            elif block != self._block:
                self.window = min(self.window * 2, self.max_blocks)
        else:
            self.window //= 4
        self._next = max(self._next, offset + size) if sequential else offset + size
        self._block = block
        last = (offset + size - 1) // self.block_size
        return range(last + 1, last + 1 + self.window)
