from __future__ import annotations

import pytest

from pretrain.corpus import engines
from pretrain.corpus.engines import VOICES, EngineMissingError, Request
from pretrain.corpus.phones import UnknownPhoneError, map_arpabet, map_espeak
from pretrain.phones import PHONE_ID, SILENCE
from pretrain.corpus.text import vocabulary

ENGINES = sorted({v.engine for v in VOICES.values()})


def test_at_least_nine_voices_over_three_engines():
    assert len(VOICES) >= 9
    assert ENGINES == ["espeak-ng", "festival", "flite"]


@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_and_its_voices_are_installed(engine):
    engines.check_voices([v for v in VOICES.values() if v.engine == engine])


def test_missing_engine_names_the_debian_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no festival, no flite
    with pytest.raises(EngineMissingError) as e:
        engines.check_voices([VOICES["festival-slt"], VOICES["flite-awb"]])
    message = str(e.value)
    assert "apt-get install" in message
    assert "festvox-us-slt-hts" in message and "flite" in message


def synth(voice_name: str, text: str = "The quick brown fox jumps over the lazy dog.", stretch=1.0):
    request = Request(0, VOICES[voice_name], text, stretch)
    if request.voice.engine == "festival":
        result = engines.synth_festival([request])[0]
        if isinstance(result, Exception):
            raise result
        return result
    if request.voice.engine == "flite":
        return engines.synth_flite(request)
    return engines.synth_espeak(request)


@pytest.mark.parametrize("voice", sorted(VOICES))
def test_every_voice_speaks_with_contiguous_mapped_segments(voice):
    raw = synth(voice)
    duration = len(raw.audio) / raw.sample_rate
    assert 1.0 < duration < 6.0
    assert raw.audio.std() > 0.01
    phones = [p for p, _, _ in raw.segments]
    assert all(p in PHONE_ID for p in phones)
    assert {"dh", "k", "b", "f", "z", "l", "g"} <= set(phones)
    for (_, _, end), (_, start, _) in zip(raw.segments, raw.segments[1:]):
        assert start == pytest.approx(end)
    # Engines label close to their audio's end (kal/ked run 20-30 ms past, see engines.py).
    assert abs(raw.segments[-1][2] - duration) < 0.2


@pytest.mark.parametrize("voice", ["festival-kal", "festival-slt", "flite-rms", "espeak-f2"])
def test_stretch_slows_speech_down(voice):
    fast = synth(voice, stretch=0.9)
    slow = synth(voice, stretch=1.1)
    assert len(slow.audio) / slow.sample_rate > 1.1 * len(fast.audio) / fast.sample_rate


def test_festival_batch_isolates_a_failing_utterance():
    bad = engines.Voice("festival-bad", "festival", "no_such_voice_diphone", ("festival",))
    requests = [Request(0, VOICES["festival-kal"], "Hello there.", 1.0),
                Request(1, bad, "Hello there.", 1.0),
                Request(2, VOICES["festival-ked"], "Good morning.", 1.0)]
    results = engines.synth_festival(requests)
    assert isinstance(results[1], engines.SynthesisError)
    assert "festival failed" in str(results[1]) and "no_such_voice_diphone" in str(results[1])
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)


def test_phone_maps_reject_unknown_symbols():
    assert map_arpabet("pau") == [SILENCE] and map_arpabet("ax") == ["ah"]
    assert map_espeak("A@") == ["aa", "r"] and map_espeak(";") == []
    with pytest.raises(UnknownPhoneError, match="'qq'"):
        map_arpabet("qq")
    with pytest.raises(UnknownPhoneError, match="'Q!'"):
        map_espeak("Q!")


@pytest.mark.parametrize("voice", ["espeak-m3", "flite-slt", "festival-kal"])
def test_whole_vocabulary_maps_and_covers_the_inventory(voice):
    # One long utterance of every word the grammar can say: no symbol may be unmapped, and
    # nearly all of the 39 phones must occur (the rarest, 'zh' and 'oy', are in the word list).
    words = vocabulary()
    covered: set[str] = set()
    for start in range(0, len(words), 60):
        raw = synth(voice, text=", ".join(words[start:start + 60]) + ".")
        covered.update(p for p, _, _ in raw.segments)
    assert len(covered - {SILENCE}) >= 37, sorted(set(PHONE_ID) - covered)
    assert {"zh", "oy", "th", "dh", "ng", "ch", "jh", "y", "uh"} <= covered
