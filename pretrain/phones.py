"""The phone inventory every part shares: the 39 ARPAbet phones of the CMU/TIMIT folding plus
``sil`` (class 0). The synthetic corpus labels its speech with these ids, shards carry them as
the gold ``phones50``/``phones100`` label sets, and the probes and PNMI name classes by them; a
ground-floor module, so none of those parts imports another for it.
"""

from __future__ import annotations

SILENCE = "sil"
PHONES: tuple[str, ...] = (
    SILENCE,
    "aa", "ae", "ah", "ao", "aw", "ay", "eh", "er", "ey", "ih", "iy", "ow", "oy", "uh", "uw",
    "b", "ch", "d", "dh", "f", "g", "hh", "jh", "k", "l", "m", "n", "ng", "p", "r", "s", "sh",
    "t", "th", "v", "w", "y", "z", "zh",
)
PHONE_ID: dict[str, int] = {p: i for i, p in enumerate(PHONES)}
