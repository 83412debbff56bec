"""The embedding cache's shared-memory layout: one anonymous MAP_SHARED mapping of int64 header fields,
two model-version fields, two label-bias fields (one per version field), and per kind a slot table of vectors and two index buffers (A / B).

A leaf of embeddings.py (which holds the protocol that reads and writes it; docs/embeddings.md).
"""

from __future__ import annotations

import mmap

import numpy as np

KINDS = ("user", "peer")
MAX_VERSION_BYTES = 256  # the model version's UTF-8 bytes, in a fixed-size field of the mapping

# Header fields (int64). STATE is the commit word: (generation << 3) | bits, where bit k (k = 0 user,
# 1 peer) selects kind k's active index buffer (A or B) and bit 2 the active model-version field (and the
# label-bias field beside it: a version's bias flips with it). A writer
# prepares a whole new snapshot in memory no reader of the current one looks at, then publishes it with
# one aligned 8-byte store of STATE; the generation makes every commit change STATE.
STATE, NEXT_SEQ, WRITER_PID = 0, 1, 2
VERSION_LEN = 3  # + buffer (0 / 1): byte length of the model version in that field
COUNT = 5  # + 2 * kind + buffer: rows in that index buffer
HEADER_FIELDS = 9
VERSION_BIT = 1 << len(KINDS)
GENERATION = 1 << (len(KINDS) + 1)


def _layout(num_labels: int, label_dim: int, max_rows: int):
    """(parts as (dtype, shape), their offsets, the mapping's size in bytes)."""
    slots = 2 * max_rows
    layout: list[tuple[np.dtype, tuple[int, ...]]] = [
        (np.dtype(np.int64), (HEADER_FIELDS,)),
        (np.dtype(np.uint8), (2, MAX_VERSION_BYTES)),
        (np.dtype(np.float32), (2, num_labels)),
    ]
    for _ in KINDS:
        layout += [(np.dtype(np.float32), (slots, num_labels, label_dim)), (np.dtype(np.int64), (2, 3, max_rows))]
    offsets, size = [], 0
    for dtype, shape in layout:
        offsets.append(size)
        size += -(-int(np.prod(shape)) * dtype.itemsize // 64) * 64  # 64-byte aligned parts
    return layout, offsets, size


def table_bytes(num_labels: int, label_dim: int, max_rows: int) -> int:
    """The size of one cache's mapping: what it holds resident at most, once every slot was written."""
    return _layout(num_labels, label_dim, max_rows)[2]


class SharedTable:
    """Numpy views of one cache's shared mapping. Per kind: a slot table of 2 * max_rows vectors and two
    index buffers (A / B), each three int64 rows: sorted ids, the slot of each id's vector, its upsert
    sequence."""

    def __init__(self, num_labels: int, label_dim: int, max_rows: int) -> None:
        layout, offsets, size = _layout(num_labels, label_dim, max_rows)
        # Anonymous and shared: inherited by fork, zero-filled, and a page takes memory only once written.
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.size = size
        views = [
            np.frombuffer(self.map, dtype, int(np.prod(shape)), offset).reshape(shape)
            for (dtype, shape), offset in zip(layout, offsets, strict=False)
        ]
        self.header, self.versions, self.biases = views[0], views[1], views[2]  # biases: float32 [2, K]
        self.vectors: list[np.ndarray] = views[3::2]  # per kind: float32 [slots, K, D]
        self.indexes: list[np.ndarray] = views[
            4::2
        ]  # per kind: int64 [buffer, (id, slot, seq), max_rows], first COUNT rows valid
        self.vector_addresses = [table.ctypes.data for table in self.vectors]  # the mapping never moves
        self._index_addresses = [index.ctypes.data for index in self.indexes]

    def index(self, state: int, k: int) -> np.ndarray:
        """Kind k's index [(ids, slots, seqs), rows] in the snapshot `state`, sorted by id."""
        buf = (state >> k) & 1
        return self.indexes[k][buf, :, : self._rows(state, k)]

    def index_addresses(self, state: int, k: int) -> tuple[int, int, int]:
        """index(state, k) for a compiled kernel: the addresses of its ids and slots rows, and its rows."""
        buffer_bytes, row_bytes = self.indexes[k].strides[:2]
        ids = self._index_addresses[k] + buffer_bytes * ((state >> k) & 1)
        return ids, ids + row_bytes, self._rows(state, k)

    def _rows(self, state: int, k: int) -> int:
        buf = (state >> k) & 1
        return min(max(int(self.header[COUNT + 2 * k + buf]), 0), self.indexes[k].shape[2])  # clipped: may be torn

    def version(self, state: int) -> str:
        buf = int(bool(state & VERSION_BIT))
        length = min(max(int(self.header[VERSION_LEN + buf]), 0), MAX_VERSION_BYTES)
        return self.versions[buf, :length].tobytes().decode("utf-8", errors="replace")

    def bias(self, state: int) -> np.ndarray:
        """The label bias b_k, float32 [K], of the model version active in the snapshot `state` (a view)."""
        return self.biases[int(bool(state & VERSION_BIT))]
