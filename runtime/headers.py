"""Image sizes from file headers, so a decompression bomb is refused before its pixels are allocated.

    python -c "from runtime.headers import header_size; print(header_size(open('img.jpg', 'rb').read()))"

header_size reads only the first bytes of a PNG, JPEG (its marker segments up to the frame
header), BMP, WebP or TIFF. A leaf: runtime.decode.check_header refuses a header claiming more
than runtime.decode.MAX_IMAGE_PIXELS pixels (a tiny file claiming 30000 x 30000) with it.
"""

from __future__ import annotations

import struct


def header_size(buf: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) claimed by a PNG, JPEG, BMP, WebP or TIFF header; None when unknown.

    Reads only the first bytes (JPEG: the marker segments up to the frame header).
    """
    b = bytes(buf[:64]) if len(buf) > 64 else bytes(buf)
    try:
        if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR":
            return struct.unpack(">II", b[16:24])
        if b[:2] == b"BM" and len(b) >= 26:
            if struct.unpack("<I", b[14:18])[0] == 12:              # OS/2 BITMAPCOREHEADER
                return struct.unpack("<HH", b[18:22])
            w, h = struct.unpack("<ii", b[18:26])
            return abs(w), abs(h)
        if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
            kind = b[12:16]
            if kind == b"VP8X":
                return 1 + int.from_bytes(b[24:27], "little"), 1 + int.from_bytes(b[27:30], "little")
            if kind == b"VP8L":
                bits = struct.unpack("<I", b[21:25])[0]
                return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
            if kind == b"VP8 ":
                w, h = struct.unpack("<HH", b[26:30])
                return w & 0x3FFF, h & 0x3FFF
            return None
        if b[:4] in (b"II*\0", b"MM\0*"):
            return _tiff_size(bytes(buf[:1 << 16]))
        if b[:2] == b"\xff\xd8":
            return _jpeg_size(buf)
    except (struct.error, IndexError):
        return None
    return None


def _tiff_size(b: bytes) -> tuple[int, int] | None:
    """Width/height tags (256/257) of a classic TIFF's first IFD."""
    e = "<" if b[:2] == b"II" else ">"
    (ifd,) = struct.unpack(e + "I", b[4:8])
    (n,) = struct.unpack(e + "H", b[ifd:ifd + 2])
    found: dict[int, int] = {}
    for i in range(min(n, 512)):
        tag, typ, _count = struct.unpack(e + "HHI", b[ifd + 2 + 12 * i: ifd + 10 + 12 * i])
        if tag in (256, 257):
            raw = b[ifd + 10 + 12 * i: ifd + 14 + 12 * i]
            found[tag] = struct.unpack(e + "H", raw[:2])[0] if typ == 3 else struct.unpack(e + "I", raw)[0]
    return (found[256], found[257]) if 256 in found and 257 in found else None


def _jpeg_size(buf: bytes | memoryview) -> tuple[int, int] | None:
    """Walk JPEG marker segments to the first SOFn frame header: (width, height)."""
    mv = memoryview(buf)
    pos, n = 2, len(mv)
    for _ in range(10000):
        if pos >= n or mv[pos] != 0xFF:           # not at a marker: malformed, OpenCV will say so
            return None
        while pos < n and mv[pos] == 0xFF:        # marker prefix and fill bytes
            pos += 1
        if pos + 1 >= n:
            return None
        m = mv[pos]
        pos += 1
        if m in (0xD8, 0x01) or 0xD0 <= m <= 0xD7:   # standalone markers
            continue
        if m == 0xD9 or pos + 2 > n:
            return None
        (length,) = struct.unpack(">H", mv[pos:pos + 2])
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", mv[pos + 3:pos + 7])
            return w, h
        pos += length
    return None

