"""Byte stores behind a connection, positioned by absolute stream offsets.

Absolute offsets (Python ints counting bytes since the start of the stream) never wrap;
the connection maps sequence numbers onto them. All stored data is immutable ``bytes``
so that views handed out (outgoing payloads, ``received()``) stay valid whatever the
engine does next.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque

__all__ = ["SendBuffer", "ReceiveQueue", "Reassembly", "Scoreboard", "PIECE_COST", "BLOCK_COST"]

_SMALL = 4096
#: In-order segments shorter than this are appended to the receive queue's last chunk
#: (while it is small), so a peer sending tiny segments cannot make the queue hold a
#: Python object per byte or two. Bulk segments are never copied.
_MERGE = 512
#: Memory an out-of-order piece costs beyond its payload (the bytes object and its list
#: slot), and a separate block (its start, end and piece list): measured with
#: tracemalloc, rounded up. Budgets charge them so that tiny segments with gaps cost
#: what they really hold.
PIECE_COST = 48
BLOCK_COST = 128


class SendBuffer:
    """Data the application gave us that the peer has not acknowledged.

    A list of immutable chunks (the application's own ``bytes`` objects, so a large
    ``send`` costs no copy); ``read`` returns a zero-copy view when the range lies in
    one chunk. Small writes are merged so the list stays short.
    """

    __slots__ = ("_chunks", "_starts", "_first", "start", "end")

    def __init__(self) -> None:
        self._chunks: list[bytes | None] = []
        self._starts: list[int] = []
        self._first = 0
        #: Absolute offset of the first byte held (everything before is acknowledged).
        self.start = 0
        #: Absolute offset just past the last byte held.
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, data: bytes) -> None:
        n = len(data)
        if not n:
            return
        chunks = self._chunks
        if n < _SMALL and len(chunks) > self._first and len(chunks[-1]) < _SMALL:
            chunks[-1] = chunks[-1] + data
        else:
            chunks.append(data)
            self._starts.append(self.end)
        self.end += n

    def read(self, off: int, n: int) -> bytes | memoryview:
        """``n`` bytes from absolute offset ``off`` (``start <= off``, ``off + n <= end``)."""
        starts = self._starts
        i = bisect_right(starts, off, self._first) - 1
        chunks = self._chunks
        c = chunks[i]
        o = off - starts[i]
        clen = len(c)
        if o + n <= clen:
            if o == 0 and n == clen:
                return c
            return memoryview(c)[o:o + n]
        parts = [memoryview(c)[o:]]
        need = n - (clen - o)
        while need > 0:
            i += 1
            c = chunks[i]
            if len(c) >= need:
                parts.append(memoryview(c)[:need])
                break
            parts.append(c)
            need -= len(c)
        return b"".join(parts)

    def drop(self, n: int) -> None:
        """Forget the first ``n`` bytes (acknowledged)."""
        self.start += n
        if self.start >= self.end:
            self.start = self.end
            self._chunks.clear()
            self._starts.clear()
            self._first = 0
            return
        starts, chunks = self._starts, self._chunks
        first, k, start = self._first, len(starts), self.start
        while first + 1 < k and starts[first + 1] <= start:
            chunks[first] = None
            first += 1
        if first > 32 and first * 2 > k:
            del chunks[:first]
            del starts[:first]
            first = 0
        self._first = first


class ReceiveQueue:
    """In-order data the application has not consumed yet."""

    __slots__ = ("_chunks", "_head", "size")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._head = 0
        self.size = 0

    def append(self, data: bytes) -> None:
        n = len(data)
        chunks = self._chunks
        if n < _MERGE and chunks and len(chunks[-1]) < _SMALL:
            chunks[-1] = chunks[-1] + data
        else:
            chunks.append(data)
        self.size += n

    def clear(self) -> None:
        self._chunks.clear()
        self._head = 0
        self.size = 0

    def peek(self) -> memoryview:
        """All unconsumed data as one contiguous read-only view (joins chunks if needed)."""
        chunks = self._chunks
        if not chunks:
            return memoryview(b"")
        if len(chunks) > 1:
            first = chunks.popleft()
            joined = b"".join([memoryview(first)[self._head:], *chunks])
            chunks.clear()
            chunks.append(joined)
            self._head = 0
        return memoryview(chunks[0])[self._head:]

    def buffers(self) -> list[memoryview]:
        """Unconsumed data as a list of views, for ``socket.sendmsg``; no copy."""
        chunks = self._chunks
        if not chunks:
            return []
        out = [memoryview(c) for c in chunks]
        if self._head:
            out[0] = out[0][self._head:]
        return out

    def consume(self, n: int) -> None:
        if n < 0 or n > self.size:
            raise ValueError(f"cannot consume {n} bytes, {self.size} available")
        self.size -= n
        chunks = self._chunks
        head = self._head
        while n:
            avail = len(chunks[0]) - head
            if n < avail:
                head += n
                break
            n -= avail
            chunks.popleft()
            head = 0
        self._head = head


class Reassembly:
    """Out-of-order data: sorted, disjoint, non-adjacent blocks of immutable pieces.

    Bytes already held are never replaced: a retransmission that overlaps stored data
    only fills the gaps, so the first bytes received for any offset win.
    """

    __slots__ = ("_starts", "_ends", "_pieces", "size", "npieces", "max_bytes", "max_pieces",
                 "max_blocks", "last")

    def __init__(self, max_bytes: int, max_pieces: int, max_blocks: int = 256) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._pieces: list[list[bytes]] = []
        self.size = 0
        self.npieces = 0
        self.max_bytes = max_bytes
        self.max_pieces = max_pieces
        self.max_blocks = max_blocks
        #: Start of the block most recently added to (reported first in SACK).
        self.last = -1

    def __bool__(self) -> bool:
        return bool(self._starts)

    @property
    def first_start(self) -> int | None:
        return self._starts[0] if self._starts else None

    @property
    def nblocks(self) -> int:
        return len(self._starts)

    @property
    def cost(self) -> int:
        """Memory held, for budgets: payload plus the fixed cost of each piece and block."""
        return self.size + self.npieces * PIECE_COST + len(self._starts) * BLOCK_COST

    def insert(self, s: int, data: bytes | memoryview, room: int | None = None) -> int:
        """Store ``data`` at absolute offset ``s``; returns bytes newly stored, -1 if it
        would exceed a cap, or -2 if it would add more than ``room`` to :attr:`cost` (a
        budget); then nothing is stored."""
        e = s + len(data)
        starts, ends, pieces = self._starts, self._ends, self._pieces
        i = bisect_left(ends, s)            # first block ending at or after s
        j = bisect_right(starts, e) - 1     # last block starting at or before e
        if i > j:
            n = e - s
            if (self.size + n > self.max_bytes or self.npieces >= self.max_pieces
                    or len(starts) >= self.max_blocks):
                return -1
            if room is not None and n + PIECE_COST + BLOCK_COST > room:
                return -2
            starts.insert(i, s)
            ends.insert(i, e)
            pieces.insert(i, [bytes(data)])
            self.size += n
            self.npieces += 1
            self.last = s
            return n
        # Gaps of [s, e) not covered by blocks i..j.
        gaps = []
        pos = s
        for k in range(i, j + 1):
            bs = starts[k]
            if pos < bs:
                gaps.append((pos, bs))
            if ends[k] > pos:
                pos = ends[k]
        if pos < e:
            gaps.append((pos, e))
        added = sum(b - a for a, b in gaps)
        if not added:
            self.last = starts[i]
            return 0
        if (self.size + added > self.max_bytes
                or self.npieces + len(gaps) > self.max_pieces):
            return -1
        if room is not None and added + len(gaps) * PIECE_COST > room:
            return -2
        merged: list[bytes] = []
        g = 0
        for k in range(i, j + 1):
            bs = starts[k]
            if g < len(gaps) and gaps[g][1] <= bs:
                a, b = gaps[g]
                merged.append(bytes(data[a - s:b - s]))
                g += 1
            merged.extend(pieces[k])
        if g < len(gaps):
            a, b = gaps[g]
            merged.append(bytes(data[a - s:b - s]))
        ms = min(s, starts[i])
        me = max(e, ends[j])
        starts[i:j + 1] = [ms]
        ends[i:j + 1] = [me]
        pieces[i:j + 1] = [merged]
        self.size += added
        self.npieces += len(gaps)
        self.last = ms
        return added

    def pop_first(self) -> tuple[int, int, list[bytes]]:
        s = self._starts.pop(0)
        e = self._ends.pop(0)
        p = self._pieces.pop(0)
        self.size -= e - s
        self.npieces -= len(p)
        return s, e, p

    def blocks(self, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` (start, end) blocks for SACK: the most recently extended block
        first, then the others from the highest down."""
        starts, ends = self._starts, self._ends
        if not starts:
            return []
        k = bisect_right(starts, self.last) - 1
        if k < 0:
            k = len(starts) - 1
        out = [(starts[k], ends[k])]
        i = len(starts) - 1
        while len(out) < limit and i >= 0:
            if i != k:
                out.append((starts[i], ends[i]))
            i -= 1
        return out

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self._pieces.clear()
        self.size = 0
        self.npieces = 0


class Scoreboard:
    """Sender-side record of ranges the peer has SACKed (absolute offsets), merged."""

    __slots__ = ("starts", "ends", "size", "max_blocks")

    def __init__(self, max_blocks: int = 32) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        #: Bytes covered.
        self.size = 0
        self.max_blocks = max_blocks

    def __bool__(self) -> bool:
        return bool(self.starts)

    @property
    def highest(self) -> int:
        return self.ends[-1]

    def add(self, s: int, e: int) -> bool:
        """Record [s, e); True if it covered anything new."""
        starts, ends = self.starts, self.ends
        i = bisect_left(ends, s)
        j = bisect_right(starts, e) - 1
        if i > j:
            starts.insert(i, s)
            ends.insert(i, e)
            self.size += e - s
            if len(starts) > self.max_blocks:
                # Forget the highest block: at worst we retransmit a little more.
                self.size -= ends.pop() - starts.pop()
            return True
        covered = sum(ends[k] - starts[k] for k in range(i, j + 1))
        ms = min(s, starts[i])
        me = max(e, ends[j])
        new = (me - ms) - covered
        if new <= 0:
            return False
        starts[i:j + 1] = [ms]
        ends[i:j + 1] = [me]
        self.size += new
        return True

    def trim(self, una: int) -> None:
        """Forget everything below ``una`` (cumulatively acknowledged)."""
        starts, ends = self.starts, self.ends
        while starts and ends[0] <= una:
            self.size -= ends[0] - starts[0]
            del starts[0]
            del ends[0]
        if starts and starts[0] < una:
            self.size -= una - starts[0]
            starts[0] = una

    def sacked_below(self, x: int) -> int:
        total = 0
        for s, e in zip(self.starts, self.ends):
            if s >= x:
                break
            total += (e if e < x else x) - s
        return total

    def next_hole(self, frm: int, limit: int) -> tuple[int, int] | None:
        """The first un-SACKed range at or after ``frm`` and below ``limit``."""
        starts, ends = self.starts, self.ends
        i = bisect_right(ends, frm)
        if i < len(starts) and starts[i] <= frm:
            frm = ends[i]
            i += 1
        if frm >= limit:
            return None
        end = starts[i] if i < len(starts) else limit
        return (frm, end if end < limit else limit)

    def clear(self) -> None:
        self.starts.clear()
        self.ends.clear()
        self.size = 0
