"""Service side of the chunked blob transfer (README §5): answer ``blob/get`` requests.

``serve_chunks`` is pure: it turns one chunk request into the list of binary frames to publish
on the device's ``blob/data`` topic, one MQTT message per frame. No MQTT here.

>>> from edge_agent.wire.chunk_frame import decode_chunk
>>> cache = BlobCache()
>>> sha = cache.add(b"0123456789")
>>> req = ChunkQuery(c=1, deploy_seq=13, sha256=sha, index=1, count=5, chunk=4)
>>> [decode_chunk(f).data for f in serve_chunks(req, cache)]
[b'4567', b'89']
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from edge_agent.wire.chunk_frame import MAX_CHUNK_DATA, ChunkStatus, encode_chunk

__all__ = [
    "DEFAULT_MAX_COUNT",
    "BlobCache",
    "ChunkQuery",
    "ChunkRequestLike",
    "refusal",
    "serve_chunks",
]

DEFAULT_MAX_COUNT = 16
"""Most frames answered for one request; larger counts are served only up to this."""

_U32_MAX = 0xFFFF_FFFF


class ChunkRequestLike(Protocol):
    """The fields of a ``blob/get`` request (``edge_agent.wire.messages.ChunkRequest`` fits)."""

    @property
    def c(self) -> int:
        """Client token, echoed in every frame."""
        ...

    @property
    def deploy_seq(self) -> int:
        """Deployment sequence number, echoed in every frame."""
        ...

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the whole blob."""
        ...

    @property
    def index(self) -> int:
        """First chunk requested."""
        ...

    @property
    def count(self) -> int:
        """Number of chunks requested."""
        ...

    @property
    def chunk(self) -> int:
        """Chunk size in bytes."""
        ...


@dataclass(frozen=True, slots=True)
class ChunkQuery:
    """A plain ``ChunkRequestLike`` (for callers that have no ``ChunkRequest`` model at hand)."""

    c: int
    deploy_seq: int
    sha256: str
    index: int
    count: int
    chunk: int


class BlobCache:
    """In-memory store of the blobs being rolled out, keyed by lowercase hex SHA-256.

    >>> cache = BlobCache()
    >>> sha = cache.add(b"abc")
    >>> sha[:12], cache.get(sha.upper()) == b"abc", cache.get("00" * 32), len(cache)
    ('ba7816bf8f01', True, None, 1)
    """

    def __init__(self) -> None:
        """An empty cache."""
        self._blobs: dict[str, bytes] = {}

    def add(self, blob: bytes, sha256: str | None = None) -> str:
        """Store ``blob`` and return its hex SHA-256; a given ``sha256`` must match it."""
        digest = hashlib.sha256(blob).hexdigest()
        if sha256 is not None and sha256.lower() != digest:
            raise ValueError(f"blob hashes to {digest}, not {sha256}")
        self._blobs[digest] = bytes(blob)
        return digest

    def get(self, sha256: str) -> bytes | None:
        """The blob with that SHA-256 (any hex case), or ``None``."""
        return self._blobs.get(sha256.lower())

    def discard(self, sha256: str) -> None:
        """Forget a blob (no error if absent)."""
        self._blobs.pop(sha256.lower(), None)

    def __contains__(self, sha256: object) -> bool:
        """``sha in cache``."""
        return isinstance(sha256, str) and sha256.lower() in self._blobs

    def __len__(self) -> int:
        """Number of blobs held."""
        return len(self._blobs)


def _u32_or_zero(value: int) -> int:
    return value if 0 <= value <= _U32_MAX else 0


def refusal(request: ChunkRequestLike) -> bytes:
    """The frame answering a request for a blob not served to this requester: status 1
    (``UNKNOWN_BLOB``), ``total`` 0, no data; ``c``, ``deploy_seq`` and ``index`` echoed."""
    return encode_chunk(
        status=ChunkStatus.UNKNOWN_BLOB,
        c=_u32_or_zero(request.c),
        deploy_seq=_u32_or_zero(request.deploy_seq),
        index=_u32_or_zero(request.index),
        total=0,
    )


def serve_chunks(
    request: ChunkRequestLike,
    cache: BlobCache,
    *,
    max_count: int = DEFAULT_MAX_COUNT,
    max_chunk: int = MAX_CHUNK_DATA,
) -> list[bytes]:
    """Encode the response frames for one chunk request.

    * Unknown blob: one frame, status 1 (``UNKNOWN_BLOB``), ``total`` 0, no data.
    * Bad request: one frame, status 2 (``BAD_REQUEST``), no data, when ``chunk`` is outside
      ``1..max_chunk``, ``count < 1``, or ``index`` is not a chunk of the blob (``total`` then
      carries the blob's real chunk count, or 0 if the chunk size itself was bad).
    * Otherwise one status-0 frame per chunk ``index .. index+count-1``, cut short at the
      blob's last chunk and at ``max_count`` frames (the device re-requests what it misses).

    ``c`` and ``deploy_seq`` are echoed; an error frame echoes ``index`` too. A value that
    does not fit a u32 (only possible with an unvalidated request) is echoed as 0.

    >>> from edge_agent.wire.chunk_frame import decode_chunk
    >>> cache = BlobCache()
    >>> sha = cache.add(b"xyz")
    >>> bad = ChunkQuery(c=2, deploy_seq=3, sha256=sha, index=9, count=1, chunk=2)
    >>> f = decode_chunk(serve_chunks(bad, cache)[0])
    >>> f.status.name, f.index, f.total, f.data
    ('BAD_REQUEST', 9, 2, b'')
    """
    if max_count < 1 or not 1 <= max_chunk <= MAX_CHUNK_DATA:
        raise ValueError(f"max_count must be >= 1 and max_chunk in 1..{MAX_CHUNK_DATA}")
    c = _u32_or_zero(request.c)
    deploy_seq = _u32_or_zero(request.deploy_seq)
    echo_index = _u32_or_zero(request.index)

    def error(status: ChunkStatus, total: int) -> list[bytes]:
        return [
            encode_chunk(status=status, c=c, deploy_seq=deploy_seq, index=echo_index, total=total)
        ]

    blob = cache.get(request.sha256)
    if blob is None:
        return [refusal(request)]
    chunk = request.chunk
    if not 1 <= chunk <= max_chunk:
        return error(ChunkStatus.BAD_REQUEST, 0)
    total = -(-len(blob) // chunk)
    if total > _U32_MAX:  # pragma: no cover - needs a > 4 GiB blob
        return error(ChunkStatus.BAD_REQUEST, 0)
    if request.count < 1 or not 0 <= request.index < total:
        return error(ChunkStatus.BAD_REQUEST, total)
    stop = min(total, request.index + min(request.count, max_count))
    return [
        encode_chunk(
            c=c,
            deploy_seq=deploy_seq,
            index=i,
            total=total,
            data=blob[i * chunk : (i + 1) * chunk],
        )
        for i in range(request.index, stop)
    ]
