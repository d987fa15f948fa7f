"""libFLAC's stream-decoder callbacks as numba ``cfunc``s: C function pointers with no Python in them.

libFLAC calls these once per read of the compressed bytes and once per decoded frame (4,096
samples). As ctypes callbacks they would enter the interpreter each time; compiled, a whole
utterance decodes in a few calls into libFLAC. Imported on the first FLAC decode only: the first
decode of a fresh install took 1.6 s here (compiling), later processes 0.7 s (numba's cache),
numba's import included.

Every callback gets ``client_data``: the address of the decoding state, an ``int64[STATE_SIZE]``
array the Python side fills before each utterance (see ``pretrain.data.flac``).
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

# Indices into the state array.
IN_ADDR, IN_LEN, IN_POS = 0, 1, 2  # the compressed bytes: address, length, read position
OUT_ADDR, OUT_LEN, OUT_POS = 3, 4, 5  # the output row: address, samples wanted, samples written
ERROR = 6  # 0, libFLAC's error status + 1, or FORMAT_ERROR
OUT_INT16 = 7  # 1: the output is int16 PCM; 0: float32 scaled by 1/32768 as libsndfile does
FRAME_RATE, FRAME_CHANNELS, FRAME_BITS = 8, 9, 10  # the offending frame's format, for the message
SKIP = 11  # samples still to drop before the first one written (a crop starting mid-frame)
STATE_SIZE = 12
FORMAT_ERROR = 1000

# libFLAC's return codes (FLAC/stream_decoder.h).
_CONTINUE, _ABORT = 0, 1
_READ_END_OF_STREAM = 1
_SEEK_ERROR = 1

_INV_32768 = np.float32(1.0 / 32768.0)


@intrinsic
def _pointer(typingctx, address, element):
    """An int64 address as a pointer to ``element`` values (numba has no cast for this)."""
    pointer_type = types.CPointer(element.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(address, element), codegen


@cfunc(types.int32(types.voidptr, types.CPointer(types.uint8), types.CPointer(types.intp), types.voidptr),
       cache=True)
def read(decoder, buffer, nbytes, client_data):
    s = carray(client_data, STATE_SIZE, types.int64)
    n = min(nbytes[0], s[IN_LEN] - s[IN_POS])
    if n <= 0:
        nbytes[0] = 0
        return _READ_END_OF_STREAM
    src = _pointer(s[IN_ADDR] + s[IN_POS], types.uint8)
    for i in range(n):
        buffer[i] = src[i]
    s[IN_POS] += n
    nbytes[0] = n
    return _CONTINUE


@cfunc(types.int32(types.voidptr, types.uint64, types.voidptr), cache=True)
def seek(decoder, offset, client_data):
    s = carray(client_data, STATE_SIZE, types.int64)
    if offset > s[IN_LEN]:
        return _SEEK_ERROR
    s[IN_POS] = offset
    return _CONTINUE


@cfunc(types.int32(types.voidptr, types.CPointer(types.uint64), types.voidptr), cache=True)
def tell(decoder, offset, client_data):
    offset[0] = carray(client_data, STATE_SIZE, types.int64)[IN_POS]
    return _CONTINUE


@cfunc(types.int32(types.voidptr, types.CPointer(types.uint64), types.voidptr), cache=True)
def length(decoder, size, client_data):
    size[0] = carray(client_data, STATE_SIZE, types.int64)[IN_LEN]
    return _CONTINUE


@cfunc(types.int32(types.voidptr, types.voidptr), cache=True)
def eof(decoder, client_data):
    s = carray(client_data, STATE_SIZE, types.int64)
    return 1 if s[IN_POS] >= s[IN_LEN] else 0


# ``frame`` is read as uint32s: FLAC__FrameHeader begins blocksize, sample_rate, channels,
# channel_assignment, bits_per_sample (stable since libFLAC 1.1).
@cfunc(types.int32(types.voidptr, types.CPointer(types.uint32), types.CPointer(types.CPointer(types.int32)),
                   types.voidptr), cache=True)
def write(decoder, frame, channels, client_data):
    s = carray(client_data, STATE_SIZE, types.int64)
    if frame[1] != 16000 or frame[2] != 1 or frame[4] != 16:
        s[ERROR] = FORMAT_ERROR
        s[FRAME_RATE], s[FRAME_CHANNELS], s[FRAME_BITS] = frame[1], frame[2], frame[4]
        return _ABORT
    blocksize = np.int64(frame[0])
    if s[SKIP] >= blocksize:  # a frame before the crop's first sample
        s[SKIP] -= blocksize
        return _CONTINUE
    first = s[SKIP]
    s[SKIP] = 0
    n = min(blocksize - first, s[OUT_LEN] - s[OUT_POS])
    src = channels[0]
    if s[OUT_INT16]:
        out16 = _pointer(s[OUT_ADDR], types.int16)
        for i in range(n):
            out16[s[OUT_POS] + i] = src[first + i]
    else:
        out = _pointer(s[OUT_ADDR], types.float32)
        for i in range(n):
            out[s[OUT_POS] + i] = np.float32(src[first + i]) * _INV_32768
    s[OUT_POS] += n
    # Stopping once the row is full leaves the rest of the utterance undecoded (a crop).
    return _ABORT if s[OUT_POS] >= s[OUT_LEN] else _CONTINUE


@cfunc(types.void(types.voidptr, types.int32, types.voidptr), cache=True)
def error(decoder, status, client_data):
    s = carray(client_data, STATE_SIZE, types.int64)
    if s[ERROR] == 0:
        s[ERROR] = status + 1


# --------------------------------------------------------------------------- finding a frame

def _crc8_table(poly: int) -> np.ndarray:
    table = np.zeros(256, dtype=np.uint8)
    for byte in range(256):
        c = byte
        for _ in range(8):
            c = ((c << 1) ^ poly) & 0xFF if c & 0x80 else (c << 1) & 0xFF
        table[byte] = c
    return table


_CRC8 = _crc8_table(0x07)  # FLAC's frame header CRC


@njit(cache=True)
def _header_number(data, p, blocking):
    """The frame (or sample) number in a frame header at ``p`` whose sync code says ``blocking``
    (0 fixed, 1 variable) and whose CRC-8 holds; -1 where no such header starts at ``p``."""
    n = len(data)
    if p + 6 > n or data[p] != 0xFF or data[p + 1] != 0xF8 + blocking:
        return -1
    size_code, rate_code = data[p + 2] >> 4, data[p + 2] & 15
    channels, bits = data[p + 3] >> 4, (data[p + 3] >> 1) & 7
    if size_code == 0 or rate_code == 15 or channels > 10 or bits == 3 or data[p + 3] & 1:
        return -1
    # The number, UTF-8 coded (up to 7 bytes).
    q = p + 4
    x = np.int64(data[q])
    extra = 0
    if x < 0x80:
        number = x
    elif x & 0xE0 == 0xC0:
        number, extra = x & 0x1F, 1
    elif x & 0xF0 == 0xE0:
        number, extra = x & 0x0F, 2
    elif x & 0xF8 == 0xF0:
        number, extra = x & 0x07, 3
    elif x & 0xFC == 0xF8:
        number, extra = x & 0x03, 4
    elif x & 0xFE == 0xFC:
        number, extra = x & 0x01, 5
    elif x == 0xFE:
        number, extra = np.int64(0), 6
    else:
        return -1
    q += 1
    if q + extra + 3 > n:
        return -1
    for _ in range(extra):
        if data[q] & 0xC0 != 0x80:
            return -1
        number = (number << 6) | (data[q] & 0x3F)
        q += 1
    q += 1 if size_code == 6 else 2 if size_code == 7 else 0
    q += 1 if rate_code == 12 else 2 if rate_code == 13 or rate_code == 14 else 0
    if q >= n:
        return -1
    crc = 0
    for i in range(p, q):
        crc = _CRC8[crc ^ data[i]]
    return number if crc == data[q] else -1


@njit(cache=True)
def frame_offset(data, first, target, min_frame):
    """The byte offset of frame ``target`` of a fixed-blocksize stream whose frame 0 starts at
    byte ``first`` and whose frames are at least ``min_frame`` bytes long (STREAMINFO's
    minimum, or 0 when unknown); -1 where the frames cannot be followed that far.

    The frames are walked from the first: the next frame is the first header after the
    current frame's minimum size whose sync code (fixed block size), CRC-8 and frame number
    (the current one + 1) are all as expected. Compressed audio that happens to look like a
    header (libFLAC 1.4.2's own seek, which jumps into the middle of frames, took one for a
    frame and failed) would also need the exact number expected there; and were one ever taken,
    libFLAC's CRC-16 of the frame decoded from it fails and the caller starts over from the
    first frame.
    """
    if _header_number(data, first, 0) != 0:
        return -1
    p, frame, n = first, 0, len(data)
    i = p + max(min_frame, 8)  # the smallest frame: a 6-byte header, a subframe, a 2-byte footer
    while frame < target:
        if i + 1 >= n:
            return -1
        if data[i] == 0xFF and data[i + 1] == 0xF8 and _header_number(data, i, 0) == frame + 1:
            p, frame = i, frame + 1
            i = p + max(min_frame, 8)
        else:
            i += 1
    return p
