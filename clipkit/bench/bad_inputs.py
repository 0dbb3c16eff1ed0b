"""Hostile inputs for the retrieval service, built from their specifications (no Pillow involved), small enough
to send: the service must refuse each before it costs memory.

- png_bomb: a valid 1-bit PNG of zeros; 9000x9900 is 10.9 KB on disk and 89 megapixels decoded (267 MB as RGB).
- eps: an Encapsulated PostScript file, which Pillow would hand to Ghostscript to decode.
"""
from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, truncate: bool = False) -> bytes:
    """A black 1-bit greyscale PNG of width x height, compressed row by row (never held whole). `truncate`:
    only the first rows' data, so that decoding fails after the header declared the full size."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale, no interlace
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    squeeze = zlib.compressobj(9)
    parts = [squeeze.compress(row) for _ in range(min(height, 8) if truncate else height)]
    parts.append(squeeze.flush(zlib.Z_SYNC_FLUSH if truncate else zlib.Z_FINISH))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))


def eps() -> bytes:
    """A small EPS file (DSC header and a filled box): Pillow identifies it from the header and decodes it by
    running Ghostscript."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n%%EndComments\n"
            b"newpath 0 0 moveto 32 0 lineto 32 32 lineto 0 32 lineto closepath fill\nshowpage\n%%EOF\n")
