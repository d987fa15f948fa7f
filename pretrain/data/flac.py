"""FLAC decoding straight through libFLAC, the reference decoder.

soundfile reads FLAC through libsndfile, which wraps libFLAC in its own per-sample copy and
conversion and, for bytes in memory, calls back into Python for every read and seek. Decoding
the same files, libFLAC alone is about 1.6x faster on this project's shards
(``benchmarks/data_pipeline.py`` prints both). Here libFLAC's stream decoder reads the
compressed bytes where they lie and writes each decoded frame straight into the batch row,
through callbacks compiled with numba (``flac_callbacks``): an utterance, or a crop of it,
decodes in a handful of calls and no Python runs per frame.

Crops do not use libFLAC's seek. Without a seek table it bisects the stream by byte position,
syncs on the first thing that looks like a frame header, and libFLAC 1.4.2 (Debian 12's) fails
the whole seek when that is compressed audio that happens to carry a sync code and a valid
CRC-8: in the demo's shards a variable-blocksize "header" inside a fixed-blocksize stream, so
that 2 of 31,061 crops of valid files were refused. Here the crop's frame is found by walking the
frame headers from the first (``flac_callbacks.frame_offset``: sync code of the stream's own
blocking, CRC-8, and the frame number expected next), the input is moved there and libFLAC
decodes on, the first samples of that frame dropped in the write callback. A frame that still
does not decode from there (never seen) is decoded from the stream's start, and counted.

The samples equal soundfile's exactly (tested). Where no libFLAC shared library is installed,
``available()`` is false and ``pretrain.data.audio`` decodes FLAC with soundfile instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading

import numpy as np

# Sonames tried before asking ldconfig: libFLAC 1.5, 1.4, 1.3.
_SONAMES = ("libFLAC.so.14", "libFLAC.so.12", "libFLAC.so.8", "libFLAC.dylib")

# FLAC/stream_decoder.h enums, for messages.
_ERRORS = ("lost sync", "bad frame header", "frame CRC mismatch", "unparseable stream", "bad metadata",
           "out of bounds", "missed frame sync")


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = None
    for name in (*_SONAMES, ctypes.util.find_library("FLAC")):
        if name is None:
            continue
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return None
    p = ctypes.c_void_p
    lib.FLAC__stream_decoder_new.restype = p
    lib.FLAC__stream_decoder_new.argtypes = []
    lib.FLAC__stream_decoder_delete.argtypes = [p]
    lib.FLAC__stream_decoder_init_stream.argtypes = [p] * 10
    lib.FLAC__stream_decoder_init_stream.restype = ctypes.c_int
    for name in ("process_until_end_of_metadata", "process_until_end_of_stream", "flush", "finish"):
        getattr(lib, f"FLAC__stream_decoder_{name}").argtypes = [p]
        getattr(lib, f"FLAC__stream_decoder_{name}").restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether FLAC decodes here (libFLAC found, numba importable), not in soundfile."""
    return _library() is not None and _callbacks() is not None


def version() -> str | None:
    """libFLAC's version string, or None without libFLAC."""
    lib = _library()
    return None if lib is None else ctypes.c_char_p.in_dll(lib, "FLAC__VERSION_STRING").value.decode()


def describe() -> str:
    """Which decoder FLAC goes to here, for the training log."""
    lib = _library()
    if lib is None:
        return "soundfile (no libFLAC shared library found; install libFLAC for about 1.6x faster FLAC)"
    if _callbacks() is None:
        return "soundfile (numba is not importable, and libFLAC's callbacks are compiled with it)"
    return f"libFLAC {version()} ({lib._name})"


@functools.cache
def _callbacks() -> tuple | None:
    try:
        from pretrain.data import flac_callbacks as cb
    except ImportError:  # a bare image without numba (a dependency, but not always installed)
        return None
    return cb, tuple(ctypes.c_void_p(f.address) for f in (cb.read, cb.seek, cb.tell, cb.length, cb.eof, cb.write))


class _Decoder:
    """One libFLAC decoder and its state array, reused for every utterance of a thread."""

    def __init__(self) -> None:
        cb, _ = _callbacks()
        self.lib = _library()
        self.handle = self.lib.FLAC__stream_decoder_new()
        if not self.handle:
            raise MemoryError("libFLAC could not allocate a decoder")
        self.state = np.zeros(cb.STATE_SIZE, dtype=np.int64)

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            self.lib.FLAC__stream_decoder_delete(self.handle)


_local = threading.local()


def decode_into(data: bytes, start: int, out: np.ndarray) -> int:
    """Decode samples ``[start, start + len(out))`` of 16 kHz mono 16-bit FLAC ``data`` into
    ``out`` (1-D, contiguous, float32 scaled by 1/32768 as libsndfile does, or int16).

    A crop starts at the frame that holds ``start``, found by ``flac_callbacks.frame_offset``
    (libFLAC's own seek is not used: see the module docstring). Where that frame cannot be
    found, or decoding from it fails, the stream is decoded from its first frame instead.
    Returns how many such restarts it took (0 or 1), for the data metrics.

    Raises ValueError naming what went wrong (libFLAC's error, a format other than 16 kHz mono
    16-bit, or fewer samples than asked for).
    """
    if out.ndim != 1 or not out.flags.c_contiguous or out.dtype not in (np.float32, np.int16):
        raise TypeError(f"out must be a contiguous 1-D float32 or int16 array, got {out.dtype} {out.shape}")
    if len(out) == 0:
        return 0
    first, blocksize, min_frame, total = _layout(data)
    if total is not None and start + len(out) > total:
        raise ValueError(f"samples {start}..{start + len(out)} asked for, but the stream holds {total}")
    cb, _ = _callbacks()
    compressed = np.frombuffer(data, dtype=np.uint8)  # a view: its address is the bytes' own
    frame = start // blocksize if blocksize else 0
    offset = cb.frame_offset(compressed, first, frame, min_frame) if frame else first
    if offset >= 0:
        try:
            _decode(compressed, offset, start - frame * blocksize, start, out)
            return 0
        except ValueError:
            if offset == first:
                raise
    # The frame was not found (a variable-blocksize stream), or it did not decode from there.
    _decode(compressed, first, start, start, out)
    return 1


def _layout(data: bytes) -> tuple[int, int, int, int | None]:
    """(byte offset of the first frame, the fixed block size or 0 for a variable one, the
    smallest frame's size in bytes or 0, the sample count or None) from the metadata blocks."""
    total = num_samples(data)  # also checks that the STREAMINFO is there
    min_block, max_block = int.from_bytes(data[8:10], "big"), int.from_bytes(data[10:12], "big")
    pos = 4
    while True:
        if pos + 4 > len(data):
            raise ValueError("FLAC metadata runs past the end of the stream")
        last, size = data[pos] & 0x80, int.from_bytes(data[pos + 1:pos + 4], "big")
        pos += 4 + size
        if last:
            break
    return pos, min_block if min_block == max_block else 0, int.from_bytes(data[12:15], "big"), total


def _decode(compressed: np.ndarray, offset: int, skip: int, start: int, out: np.ndarray) -> None:
    """Decode from the frame at byte ``offset``, dropping its first ``skip`` samples, into ``out``."""
    cb, pointers = _callbacks()
    decoder = getattr(_local, "decoder", None)
    if decoder is None:
        decoder = _local.decoder = _Decoder()
    lib, handle, s = decoder.lib, decoder.handle, decoder.state
    s[:] = 0
    s[cb.IN_ADDR], s[cb.IN_LEN] = compressed.ctypes.data, len(compressed)
    s[cb.OUT_ADDR], s[cb.OUT_LEN] = out.ctypes.data, len(out)
    s[cb.OUT_INT16] = out.dtype == np.int16
    status = lib.FLAC__stream_decoder_init_stream(handle, *pointers, None, cb.error.address, s.ctypes.data)
    if status != 0:
        raise ValueError(f"libFLAC could not start decoding (init status {status})")
    try:
        if lib.FLAC__stream_decoder_process_until_end_of_metadata(handle) and s[cb.ERROR] == 0:
            # Move the input to the frame and drop what libFLAC had read ahead: it then syncs
            # on that frame, exactly as after a seek of its own.
            s[cb.IN_POS], s[cb.SKIP] = offset, skip
            lib.FLAC__stream_decoder_flush(handle)
            lib.FLAC__stream_decoder_process_until_end_of_stream(handle)
    finally:
        lib.FLAC__stream_decoder_finish(handle)
    got = int(s[cb.OUT_POS])
    if s[cb.ERROR] == cb.FORMAT_ERROR:
        raise ValueError(f"expected 16 kHz mono 16-bit FLAC, got {s[cb.FRAME_RATE]} Hz, "
                         f"{s[cb.FRAME_CHANNELS]} channels, {s[cb.FRAME_BITS]}-bit")
    if s[cb.ERROR]:
        code = int(s[cb.ERROR]) - 1
        raise ValueError(f"libFLAC: {_ERRORS[code] if code < len(_ERRORS) else f'error {code}'} "
                         f"after {got} of {len(out)} samples from sample {start}")
    if got != len(out):
        raise ValueError(f"decoded {got} samples from {start}, expected {len(out)}")


def num_samples(data: bytes) -> int | None:
    """The sample count in a FLAC stream's STREAMINFO, or None when it says 0 (unknown)."""
    # "fLaC", a 4-byte block header, then STREAMINFO: the count is its bits 108..143.
    if len(data) < 42 or data[:4] != b"fLaC" or data[4] & 0x7F != 0:
        raise ValueError("not a FLAC stream starting with STREAMINFO")
    total = int.from_bytes(data[21:26], "big") & ((1 << 36) - 1)
    return total or None
