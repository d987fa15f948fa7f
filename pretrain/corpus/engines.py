"""The three Debian TTS engines behind the synthetic corpus, each returning audio at its native
rate and phone segments already mapped to the shared inventory.

Facts the code relies on (measured on these machines):
- festival prints the ``end`` of every item of the ``Segment`` relation after synthesis; one
  process synthesizes a whole batch, since its start-up costs more than a short utterance.
  ``(Utterance Text x)`` does not evaluate ``x``, hence the ``eval``/``list`` construction.
  Its HTS voice runs at 32 kHz, its labels land about 10 ms late, and it ignores
  ``Duration_Stretch`` (the engine's own ``-r`` speed parameter stretches it instead).
- ``flite -psdur`` prints ``phone:end`` pairs.
- libespeak-ng (through ctypes) reports phoneme events with their sample position, but keeps
  internal state between calls, so the caller runs it in a fresh process per batch of
  utterances (``synth.py`` does) to get bit-identical output from run to run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from pretrain.config.corpus import ALL_VOICES
from pretrain.corpus.phones import SILENCE, map_arpabet, map_espeak
from pretrain.utils import PretrainError


@dataclass(frozen=True)
class Voice:
    name: str
    """Speaker id in the corpus."""
    engine: str
    """``festival``, ``flite`` or ``espeak-ng``."""
    engine_voice: str
    """The engine's own name for the voice."""
    packages: tuple[str, ...]
    """Debian packages that provide it."""
    label_offset: float = 0.0
    """Seconds added to the engine's label times to put them on the audio."""


_FESTIVAL = ("festival",)
VOICES: dict[str, Voice] = {
    v.name: v
    for v in (
        Voice("festival-kal", "festival", "kal_diphone", _FESTIVAL + ("festvox-kallpc16k",)),
        Voice("festival-ked", "festival", "ked_diphone", _FESTIVAL + ("festvox-kdlpc16k",)),
        Voice("festival-slt", "festival", "cmu_us_slt_arctic_hts",
              _FESTIVAL + ("festvox-us-slt-hts",), label_offset=-0.010),
        Voice("flite-awb", "flite", "awb", ("flite",)),
        Voice("flite-rms", "flite", "rms", ("flite",)),
        Voice("flite-slt", "flite", "slt", ("flite",)),
        Voice("flite-kal16", "flite", "kal16", ("flite",)),
        Voice("espeak-m3", "espeak-ng", "en-us+m3", ("espeak-ng", "libespeak-ng1")),
        Voice("espeak-f2", "espeak-ng", "en-us+f2", ("espeak-ng", "libespeak-ng1")),
        Voice("espeak-f4", "espeak-ng", "en-us+f4", ("espeak-ng", "libespeak-ng1")),
        Voice("espeak-klatt", "espeak-ng", "en-us+klatt", ("espeak-ng", "libespeak-ng1")),
    )
}


if tuple(VOICES) != ALL_VOICES:  # the config schema names the voices without importing this module
    raise ImportError(f"pretrain.config.corpus.ALL_VOICES {ALL_VOICES} differs from the engines' voices {tuple(VOICES)}")


class EngineMissingError(PretrainError):
    """A TTS engine or voice is not installed; the message names the Debian packages."""


class SynthesisError(RuntimeError):
    """One utterance could not be synthesized; the corpus records it as a failure."""


@dataclass(frozen=True)
class Request:
    index: int
    voice: Voice
    text: str
    stretch: float
    """Duration multiplier: > 1 speaks more slowly."""


@dataclass
class RawUtterance:
    audio: np.ndarray
    """float32 mono samples in [-1, 1] at ``sample_rate``."""
    sample_rate: int
    segments: list[tuple[str, float, float]]
    """(inventory phone, start s, end s), contiguous, in the engine's time."""


# --------------------------------------------------------------------------- availability


def check_voices(voices: list[Voice]) -> None:
    """Raise ``EngineMissingError`` naming the packages to install if any voice is unusable."""
    problems: list[str] = []
    engines = {v.engine for v in voices}
    if "festival" in engines:
        wanted = [v for v in voices if v.engine == "festival"]
        if shutil.which("festival") is None:
            problems.append(_missing("festival", wanted))
        else:
            script = "".join(f'(format t "{v.name}=%s\\n" (boundp \'voice_{v.engine_voice}))\n'
                             for v in wanted)
            out = _run(["festival", "--pipe"], stdin=script, timeout=60).stdout
            for v in wanted:
                if f"{v.name}=t" not in out:
                    problems.append(_missing(f"festival voice {v.engine_voice}", [v]))
    if "flite" in engines:
        wanted = [v for v in voices if v.engine == "flite"]
        if shutil.which("flite") is None:
            problems.append(_missing("flite", wanted))
        else:
            listed = _run(["flite", "-lv"], timeout=30).stdout.split()
            for v in wanted:
                if v.engine_voice not in listed:
                    problems.append(_missing(f"flite voice {v.engine_voice}", [v]))
    if "espeak-ng" in engines:
        wanted = [v for v in voices if v.engine == "espeak-ng"]
        if _espeak_library_path() is None:
            problems.append(_missing("libespeak-ng", wanted))
    if problems:
        raise EngineMissingError("; ".join(problems))


def _missing(what: str, voices: list[Voice]) -> str:
    packages = sorted({p for v in voices for p in v.packages})
    names = ", ".join(v.name for v in voices)
    return (f"{what} is not available (needed by voices {names}); install it with "
            f"`apt-get install --no-install-recommends {' '.join(packages)}`")


def _run(cmd: list[str], stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- festival

_FESTIVAL_UTT = """\
(voice_{voice})
{speed}
(set! utt (eval (list 'Utterance 'Text "{text}")))
(utt.synth utt)
(utt.save.wave utt "{wav}" 'riff)
(format t "@@UTT {index}\\n")
(mapcar (lambda (s) (format t "@@SEG %s %f\\n" (item.name s) (item.feat s "end")))
        (utt.relation.items utt 'Segment))
"""


def _festival_speed(voice: Voice, stretch: float) -> str:
    if voice.engine_voice.endswith("_hts"):
        # The HTS voice ignores Duration_Stretch; hts_engine's -r is a speed (1/stretch).
        base = f"{voice.engine_voice}::hts_engine_params"
        return f'(set! hts_engine_params (append {base} (list (list "-r" {1.0 / stretch:.6f}))))'
    return f"(Parameter.set 'Duration_Stretch {stretch:.6f})"


def synth_festival(requests: list[Request]) -> dict[int, RawUtterance | SynthesisError]:
    """Synthesize a batch in one festival process; on a batch failure, isolate the bad ones."""
    if not requests:
        return {}
    with tempfile.TemporaryDirectory(prefix="pretrain-festival-") as tmp:
        results = _festival_batch(requests, Path(tmp))
    if len(requests) > 1:
        # festival stops at the first error, so everything after a bad utterance is lost too:
        # retry those alone, which leaves only the truly bad ones failed.
        for request in requests:
            if isinstance(results[request.index], SynthesisError):
                with tempfile.TemporaryDirectory(prefix="pretrain-festival-") as tmp:
                    results.update(_festival_batch([request], Path(tmp)))
    return results


def _festival_batch(requests: list[Request], tmp: Path) -> dict[int, RawUtterance | SynthesisError]:
    script = "".join(
        _FESTIVAL_UTT.format(voice=r.voice.engine_voice, speed=_festival_speed(r.voice, r.stretch),
                             text=_scheme_string(r.text), wav=tmp / f"{r.index}.wav", index=r.index)
        for r in requests
    )
    (tmp / "batch.scm").write_text(script)
    try:
        proc = _run(["festival", "-b", str(tmp / "batch.scm")], timeout=60 + 20 * len(requests))
    except subprocess.TimeoutExpired:
        return {r.index: SynthesisError("festival timed out") for r in requests}
    segments: dict[int, list[tuple[str, float]]] = {}
    current = None
    for line in proc.stdout.splitlines():
        if line.startswith("@@UTT "):
            current = int(line.split()[1])
            segments[current] = []
        elif line.startswith("@@SEG ") and current is not None:
            _, name, end = line.split()
            segments[current].append((name, float(end)))
    results: dict[int, RawUtterance | SynthesisError] = {}
    for r in requests:
        wav = tmp / f"{r.index}.wav"
        if r.index not in segments or not wav.exists():
            lines = proc.stderr.strip().splitlines()
            errors = [line for line in lines if "ERROR" in line] or lines[-1:] or ["no output"]
            tail = errors[0]
            results[r.index] = SynthesisError(f"festival failed (exit {proc.returncode}): {tail}")
            continue
        try:
            audio, sr = _read_pcm(wav.read_bytes())
            results[r.index] = RawUtterance(audio, sr, _from_ends(segments[r.index], map_arpabet))
        except Exception as e:  # noqa: BLE001 - any problem is this utterance's failure
            results[r.index] = SynthesisError(f"festival output unusable: {e}")
    return results


def _scheme_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


# --------------------------------------------------------------------------- flite


def synth_flite(request: Request) -> RawUtterance:
    with tempfile.TemporaryDirectory(prefix="pretrain-flite-") as tmp:
        wav = Path(tmp) / "out.wav"
        cmd = ["flite", "-voice", request.voice.engine_voice, "-psdur",
               "--setf", f"duration_stretch={request.stretch:.6f}", "-t", request.text, "-o", str(wav)]
        try:
            proc = _run(cmd, timeout=120)
        except subprocess.TimeoutExpired:
            raise SynthesisError("flite timed out") from None
        if proc.returncode != 0 or not wav.exists():
            raise SynthesisError(f"flite failed (exit {proc.returncode}): {proc.stderr.strip()[-200:]}")
        pairs = re.findall(r"(\S+):([0-9.]+)", proc.stdout)
        if not pairs:
            raise SynthesisError("flite printed no phone timings")
        audio, sr = _read_pcm(wav.read_bytes())
    return RawUtterance(audio, sr, _from_ends([(p, float(t)) for p, t in pairs], map_arpabet))


# --------------------------------------------------------------------------- espeak-ng


class _EspeakEventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EspeakEventId),
    ]


_ESPEAK_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)
_EVENT_LIST_TERMINATED, _EVENT_PHONEME = 0, 7
_AUDIO_OUTPUT_SYNCHRONOUS, _INITIALIZE_PHONEME_EVENTS = 2, 0x0001
_POS_CHARACTER, _CHARS_UTF8, _PARAM_RATE, _DEFAULT_RATE = 1, 1, 1, 175


def _espeak_library_path() -> str | None:
    return ctypes.util.find_library("espeak-ng")


class _Espeak:
    """One libespeak-ng per process, used synchronously through its callback."""

    def __init__(self) -> None:
        path = _espeak_library_path()
        if path is None:
            raise EngineMissingError("libespeak-ng is not installed; "
                                     "`apt-get install --no-install-recommends espeak-ng libespeak-ng1`")
        self.lib = ctypes.CDLL(path)
        self.sample_rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS)
        if self.sample_rate <= 0:
            raise EngineMissingError("espeak_Initialize failed: is espeak-ng-data installed?")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, str]] = []
        self._callback = _ESPEAK_CALLBACK(self._on_audio)  # kept alive: C holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            if events[i].type == _EVENT_PHONEME:
                self._events.append((events[i].sample, events[i].id.string.decode("ascii")))
            i += 1
        return 0

    def synth(self, request: Request) -> RawUtterance:
        if self.lib.espeak_SetVoiceByName(request.voice.engine_voice.encode()) != 0:
            raise SynthesisError(f"espeak-ng has no voice '{request.voice.engine_voice}'")
        self.lib.espeak_SetParameter(_PARAM_RATE, int(round(_DEFAULT_RATE / request.stretch)), 0)
        self._chunks, self._events = [], []
        text = request.text.encode("utf-8") + b"\0"
        status = self.lib.espeak_Synth(text, len(text), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        if status != 0 or not self._chunks:
            raise SynthesisError(f"espeak_Synth returned {status} with no audio")
        pcm = np.concatenate(self._chunks)
        audio = pcm.astype(np.float32) / 32768.0
        return RawUtterance(audio, self.sample_rate,
                            _from_starts(self._events, len(pcm), self.sample_rate))


_espeak: _Espeak | None = None


def synth_espeak(request: Request) -> RawUtterance:
    global _espeak
    if _espeak is None:
        _espeak = _Espeak()
    return _espeak.synth(request)


# --------------------------------------------------------------------------- segments


def _from_ends(ends: list[tuple[str, float]], mapper) -> list[tuple[str, float, float]]:
    """(symbol, end) pairs as festival/flite print them -> contiguous mapped segments."""
    out: list[tuple[str, float, float]] = []
    start = 0.0
    for symbol, end in ends:
        _append_mapped(out, mapper(symbol), start, end)
        start = max(start, end)
    return out


def _from_starts(starts: list[tuple[int, str]], num_samples: int, sr: int) -> list[tuple[str, float, float]]:
    """espeak phoneme events (sample, symbol) mark starts; each phone ends where the next begins."""
    out: list[tuple[str, float, float]] = []
    if not starts:
        raise SynthesisError("espeak-ng reported no phoneme events")
    if starts[0][0] > 0:
        out.append((SILENCE, 0.0, starts[0][0] / sr))
    for (sample, symbol), nxt in zip(starts, starts[1:] + [(num_samples, "")]):
        _append_mapped(out, map_espeak(symbol), sample / sr, max(sample, nxt[0]) / sr)
    return out


def _append_mapped(out: list, phones: list[str], start: float, end: float) -> None:
    if not phones:  # a modifier: its time belongs to the phone before it
        if out:
            phone, s, _ = out[-1]
            out[-1] = (phone, s, end)
        return
    step = (end - start) / len(phones)
    for k, phone in enumerate(phones):
        out.append((phone, start + k * step, start + (k + 1) * step))


def _read_pcm(data: bytes) -> tuple[np.ndarray, int]:
    audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio.mean(axis=1), sr
