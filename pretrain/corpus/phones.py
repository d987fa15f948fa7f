"""Each TTS engine's own phone symbols mapped onto the shared inventory (``pretrain.phones``).
Label quality (PNMI) is measured against those ids, so the map is explicit and an unknown
symbol is an error, never a silent guess.
"""

from __future__ import annotations

from pretrain.phones import PHONE_ID, SILENCE

# festival (radio phone set) and flite (cmu lexicon) already speak ARPAbet; only the
# reduced vowels and the pause symbols need folding.
_ARPABET_FOLD = {"ax": "ah", "axr": "er", "pau": SILENCE, "h#": SILENCE, "ssil": SILENCE}

# espeak-ng's en-us mnemonics. A value with two phones is a diphthong-plus-r or syllabic
# consonant whose span is split evenly; an empty value is a modifier whose time joins the
# previous phone.
_ESPEAK = {
    # pauses
    "_": [SILENCE], "_:": [SILENCE], "_!": [SILENCE], "_|": [SILENCE], "_^_": [SILENCE],
    # consonants
    "b": ["b"], "d": ["d"], "D": ["dh"], "dZ": ["jh"], "f": ["f"], "g": ["g"], "h": ["hh"],
    "j": ["y"], "k": ["k"], "l": ["l"], "m": ["m"], "n": ["n"], "N": ["ng"], "p": ["p"],
    "r": ["r"], "r-": ["r"], "s": ["s"], "S": ["sh"], "t": ["t"], "T": ["th"], "tS": ["ch"],
    "v": ["v"], "w": ["w"], "z": ["z"], "Z": ["zh"], "t#": ["t"], "t2": ["t"], "d#": ["d"],
    "d2": ["d"], "?": ["t"], "n-": ["n"], "l-": ["l"], "m-": ["m"], "x": ["k"], "C": ["hh"],
    "w#": ["w"], "z#": ["z"], "z/2": ["z"], "s2": ["s"],
    # vowels
    "@": ["ah"], "@2": ["ah"], "@5": ["ah"], "@L": ["ah", "l"], "3": ["er"], "3:": ["er"],
    "a": ["ae"], "a#": ["ah"], "aa": ["ae"], "A:": ["aa"], "A@": ["aa", "r"], "A#": ["aa"],
    "aI": ["ay"], "aI@": ["ay", "er"], "aI3": ["ay", "er"], "aU": ["aw"], "aU@": ["aw", "er"],
    "e": ["eh"], "E": ["eh"], "e@": ["eh", "r"], "eI": ["ey"], "i": ["iy"], "i:": ["iy"],
    "i@": ["ih", "r"], "i@3": ["ih", "r"], "I": ["ih"], "I#": ["ih"], "I2": ["ih"],
    "0": ["aa"], "0#": ["aa"], "O": ["ao"], "O:": ["ao"], "O2": ["ao"], "O@": ["ao", "r"],
    "o@": ["ao", "r"], "OI": ["oy"], "oU": ["ow"], "oU#": ["ow"], "u:": ["uw"], "U": ["uh"],
    "U@": ["uh", "r"], "u@": ["uh", "r"], "V": ["ah"], "VR": ["ah", "r"],
    # modifiers
    ";": [],
}


class UnknownPhoneError(ValueError):
    """An engine produced a symbol that has no entry in our phone maps."""


def map_arpabet(symbol: str) -> list[str]:
    """festival / flite symbol -> inventory phones."""
    phone = _ARPABET_FOLD.get(symbol, symbol)
    if phone not in PHONE_ID:
        raise UnknownPhoneError(f"festival/flite phone '{symbol}' is not in the inventory")
    return [phone]


def map_espeak(symbol: str) -> list[str]:
    """espeak-ng en-us mnemonic -> inventory phones (possibly none, possibly two)."""
    try:
        return list(_ESPEAK[symbol])
    except KeyError:
        raise UnknownPhoneError(f"espeak-ng phoneme '{symbol}' has no entry in the phone map") from None
