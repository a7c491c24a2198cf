"""A thumbnail of an image sent as bytes, in pure Python.

Takes a binary PPM (P6) or PGM (P5) image, the formats every image tool
writes (``convert photo.jpg photo.ppm``), and returns a smaller image of the
same format whose longer side is at most ``size`` pixels, each pixel the
average of the block it stands for. Bytes are not JSON, so they travel
pickled both ways.
"""

from conveyor import task


@task(timeout_s=30, memory_mb=512)
def thumbnail(image: bytes, size: int = 64) -> bytes:
    kind, width, height, maxval, pixels = _read_netpbm(image)
    channels = 3 if kind == b"P6" else 1
    scale = max(width, height) / size
    if scale <= 1:
        return bytes(image)
    new_width, new_height = max(1, round(width / scale)), max(1, round(height / scale))

    out = bytearray()
    for row in range(new_height):
        top, bottom = _span(row, new_height, height)
        for column in range(new_width):
            left, right = _span(column, new_width, width)
            sums = [0] * channels
            for y in range(top, bottom):
                start = (y * width + left) * channels
                block = pixels[start : start + (right - left) * channels]
                for channel in range(channels):
                    sums[channel] += sum(block[channel::channels])
            count = (bottom - top) * (right - left)
            out += bytes(round(total / count) for total in sums)
    header = b"%s\n%d %d\n%d\n" % (kind, new_width, new_height, maxval)
    return header + bytes(out)


def _span(index: int, parts: int, total: int) -> tuple[int, int]:
    start = index * total // parts
    return start, max(start + 1, (index + 1) * total // parts)


def _read_netpbm(data: bytes) -> tuple[bytes, int, int, int, bytes]:
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"the image must be bytes, got {type(data).__name__}")
    fields: list[bytes] = []
    position = 0
    while len(fields) < 4:
        while position < len(data) and data[position : position + 1].isspace():
            position += 1
        if data[position : position + 1] == b"#":
            position = data.index(b"\n", position) + 1
            continue
        end = position
        while end < len(data) and not data[end : end + 1].isspace():
            end += 1
        if end == position:
            raise ValueError("the image ends inside its header")
        fields.append(data[position:end])
        position = end
    kind = fields[0]
    if kind not in (b"P5", b"P6"):
        raise ValueError(f"only binary PPM (P6) and PGM (P5) are read, not {kind!r}")
    width, height, maxval = (int(field) for field in fields[1:])
    if maxval > 255:
        raise ValueError("only 8-bit images are read")
    channels = 3 if kind == b"P6" else 1
    pixels = data[position + 1 :]
    if len(pixels) < width * height * channels:
        raise ValueError("the image has fewer pixels than its header says")
    return kind, width, height, maxval, pixels
