"""Request-body decoding: gzip on the fly, and the body-size cap.

The decoder sits between the HTTP connection and git's stdin.  It never
expands more than :data:`PIECE_SIZE` bytes at a time, so a small gzip bomb
cannot balloon into memory: each piece is written to git (and awaited) before
the next is decompressed, the handler yields to the event loop between
pieces, and stops decoding once git no longer reads.
"""

from __future__ import annotations

import zlib
from typing import Iterator, Optional

from tornado.web import HTTPError

from .sizes import CHUNK_SIZE

#: Most bytes produced from one decompression step.
PIECE_SIZE = CHUNK_SIZE


class BodyDecoder:
    """Decodes one request body chunk by chunk.

    ``encoding`` is the request's ``Content-Encoding`` (``None``/``identity``,
    ``gzip`` or ``x-gzip``); ``limit`` caps the decoded size in bytes.  Errors
    raise :class:`tornado.web.HTTPError` (400 or 413) with a short reason.
    """

    def __init__(self, encoding: Optional[str], limit: Optional[int]) -> None:
        encoding = (encoding or "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._inflater: Optional[zlib._Decompress] = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "identity":
            self._inflater = None
        else:
            raise HTTPError(415, reason=f"Unsupported Content-Encoding: {encoding[:40]}")
        self._limit = limit
        self.decoded_bytes = 0

    def decode(self, chunk: bytes) -> Iterator[bytes]:
        """Yield the decoded pieces of ``chunk``."""
        if self._inflater is None:
            yield self._count(chunk)
            return
        data = chunk
        while data:
            try:
                piece = self._inflater.decompress(data, PIECE_SIZE)
            except zlib.error:
                raise HTTPError(400, reason="Request body is not valid gzip") from None
            data = self._inflater.unconsumed_tail
            if self._inflater.eof and self._inflater.unused_data:
                raise HTTPError(400, reason="Trailing data after gzip body")
            if piece:
                yield self._count(piece)

    def finish(self) -> None:
        """Check that the body ended where its encoding says it should."""
        if self._inflater is not None and not self._inflater.eof:
            raise HTTPError(400, reason="Request body ends inside the gzip stream")

    def _count(self, piece: bytes) -> bytes:
        self.decoded_bytes += len(piece)
        if self._limit is not None and self.decoded_bytes > self._limit:
            raise HTTPError(413, reason="Request body too large")
        return piece
