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
from numba import carray, cfunc, types
from numba.extending import intrinsic

# Indices into the state array.
IN_ADDR, IN_LEN, IN_POS = 0, 1, 2  # the compressed bytes: address, length, read position
OUT_ADDR, OUT_LEN, OUT_POS = 3, 4, 5  # the output row: address, samples wanted, samples written
ERROR = 6  # 0, libFLAC's error status + 1, or FORMAT_ERROR
OUT_INT16 = 7  # 1: the output is int16 PCM; 0: float32 scaled by 1/32768 as libsndfile does
FRAME_RATE, FRAME_CHANNELS, FRAME_BITS = 8, 9, 10  # the offending frame's format, for the message
STATE_SIZE = 11
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
    n = min(np.int64(frame[0]), s[OUT_LEN] - s[OUT_POS])
    src = channels[0]
    if s[OUT_INT16]:
        out16 = _pointer(s[OUT_ADDR], types.int16)
        for i in range(n):
            out16[s[OUT_POS] + i] = src[i]
    else:
        out = _pointer(s[OUT_ADDR], types.float32)
        for i in range(n):
            out[s[OUT_POS] + i] = np.float32(src[i]) * _INV_32768
    s[OUT_POS] += n
    # Stopping once the row is full leaves the rest of the utterance undecoded (a crop).
    return _ABORT if s[OUT_POS] >= s[OUT_LEN] else _CONTINUE


@cfunc(types.void(types.voidptr, types.int32, types.voidptr), cache=True)
def error(decoder, status, client_data):
    s = carray(client_data, STATE_SIZE, types.int64)
    if s[ERROR] == 0:
        s[ERROR] = status + 1
