"""WavLM's utterance mixing ("masked speech denoising"), done in the data workers.

Each utterance of a batch is, with probability ``prob``, overlaid with one segment: of a noise
clip (probability ``noise_prob``, energy ratio drawn from ``noise_snr``) or of another utterance
of the same stream (``speech_snr``). The segment is 1 .. ``max_length_ratio`` of the primary's
length long, at a uniformly drawn position, and scaled so that

    10 log10(P_primary / P_scaled_segment) = ratio,   scale = sqrt(P_p / (P_s 10^(ratio / 10)))

where P is the mean square: of the primary over its whole (cropped) length, of the secondary
over the segment that is added. The labels are not touched: the model learns to predict the
primary speaker's units from the mixture. This follows WavLM's released data code
(``mixing_collated_audios``; see ../shared/notes/hubert-recipe.md §2.4), with two choices
spelled out here: the partner utterance comes from the stream's current pool (the
``bucket_size`` utterances the batch was cut from, already read, so no second pass over the
data), and a noise clip shorter than the segment is repeated.

Every draw for an utterance comes from a generator seeded by (data seed, epoch, key), and the
partner is picked from the pool, which a resumed stream rebuilds identically: a resumed run
mixes exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from pretrain.config.data import MixingConfig
from pretrain.data.audio import EXTENSIONS, decode_into, num_samples
from pretrain.data.shards import read_manifest
from pretrain.utils import PretrainError

NONE, SPEECH, NOISE = 0, 1, 2
_MIX_STREAM = 0x4D4958  # separates the mixing draws from the crop draws of the same key
# A segment quieter than this (mean square; -120 dBFS) cannot be scaled to a finite ratio.
_SILENT_POWER = 1e-12


class NoiseBank:
    """Random access to every clip of a noise shard directory, by index.

    Only the manifest is read on construction (so a bad path fails at start-up); each process
    indexes the tar members (offset and size of every audio member) on first use and then reads
    one clip with one seek, however large the noise corpus is.
    """

    def __init__(self, shard_dir: str | Path):
        self.dir = Path(shard_dir)
        try:
            manifest = read_manifest(self.dir)
        except PretrainError as e:
            raise PretrainError(f"data.mixing.noise_shards: {e}") from None
        self.shards = manifest["shards"]
        self.fingerprint = [[s["name"], s["utterances"], s["sha256"]] for s in self.shards]
        if not sum(s["utterances"] for s in self.shards):
            raise PretrainError(f"data.mixing.noise_shards: {self.dir} holds no clips")
        self._index: list[tuple[str, int, int, str]] | None = None
        self._files: dict[str, object] = {}

    def _build_index(self) -> list[tuple[str, int, int, str]]:
        index = []
        for shard in self.shards:
            path = str(self.dir / shard["name"])
            found = 0
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    ext = info.name.rsplit(".", 1)[-1]
                    if info.isreg() and ext in EXTENSIONS:
                        index.append((path, info.offset_data, info.size, info.name))
                        found += 1
                    tar.members = []
            if found != shard["utterances"]:
                raise PretrainError(f"noise shard {path}: {found} audio members, the manifest says "
                                    f"{shard['utterances']}")
        return index

    def __len__(self) -> int:
        return sum(s["utterances"] for s in self.shards)

    def read(self, index: int) -> tuple[bytes, str]:
        """The encoded audio of clip ``index`` and its name (shard member), for error messages."""
        if self._index is None:
            self._index = self._build_index()
        path, offset, size, name = self._index[index]
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")
        f.seek(offset)
        return f.read(size), f"{Path(path).name}:{name}"

    def __getstate__(self) -> dict:  # open files stay in the process that opened them
        return {**self.__dict__, "_files": {}}


def _decode_segment(data: bytes, length: int, rng: np.random.Generator, tile: bool) -> np.ndarray:
    """float32 ``length`` samples at a random offset of the clip (tiled if ``tile`` and the clip
    is shorter; else the whole clip when it is shorter)."""
    total = num_samples(data)  # from the header, without opening the clip in soundfile
    if total is None:
        with sf.SoundFile(io.BytesIO(data)) as f:
            total = f.frames
    if total >= length:
        start = int(rng.integers(0, total - length + 1))
        out = np.empty(length, dtype=np.float32)
        decode_into(data, start, out)
    else:
        out = np.empty(total, dtype=np.float32)
        decode_into(data, 0, out)
        if tile:
            out = np.resize(out, length)
    return out


def _mean_square(x: np.ndarray) -> float:
    # einsum, not np.dot: a BLAS dot product wakes OpenBLAS's thread pool, whose spinning
    # threads doubled the workers' CPU time per audio-second (measured).
    return float(np.einsum("i,i->", x, x, dtype=np.float64)) / max(len(x), 1)


class Mixer:
    """Mixes the rows of one decoded batch in place (see the module docstring)."""

    def __init__(self, cfg: MixingConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.noise = NoiseBank(cfg.noise_shards) if cfg.noise_shards and cfg.noise_prob > 0 else None

    @property
    def enabled(self) -> bool:
        return self.cfg.prob > 0

    def state_fingerprint(self) -> dict | None:
        """What a resumed run must share with the saved one to mix identically."""
        if not self.enabled:
            return None
        return {"prob": self.cfg.prob, "noise_prob": self.cfg.noise_prob,
                "max_length_ratio": self.cfg.max_length_ratio, "speech_snr": list(self.cfg.speech_snr),
                "noise_snr": list(self.cfg.noise_snr),
                "noise_shards": self.noise.fingerprint if self.noise else None}

    def mix(self, audio: np.ndarray, lengths: Sequence[int], items: Sequence, pool: Sequence,
            key_hash, counts: dict) -> np.ndarray:
        """Mix rows of ``audio`` (float32, B x S, the clean batch) in place; ``items[i]`` is row
        i's utterance (with ``key``, ``epoch``, ``audio`` bytes, ``num_samples``), ``pool`` the
        utterances a speech partner is drawn from. Returns each row's kind (NONE/SPEECH/NOISE)."""
        cfg = self.cfg
        kinds = np.zeros(len(items), dtype=np.int8)
        for i, item in enumerate(items):
            rng = np.random.default_rng([self.seed, item.epoch, key_hash(item.key), _MIX_STREAM])
            if rng.random() >= cfg.prob:
                continue
            length = int(lengths[i])
            seg_len = int(rng.integers(1, max(1, int(length * cfg.max_length_ratio)) + 1))
            start = int(rng.integers(0, length - seg_len + 1))
            use_noise = rng.random() < cfg.noise_prob
            if use_noise and self.noise is None:
                use_noise = False  # noise_prob > 0 without noise shards is refused by the config
            if use_noise:
                data, source = self.noise.read(int(rng.integers(len(self.noise))))
                low, high = cfg.noise_snr
                kind = NOISE
            else:
                others = [p for p in pool if p is not item]
                if not others:
                    counts["mix_no_partner"] = counts.get("mix_no_partner", 0) + 1
                    continue
                partner = others[int(rng.integers(len(others)))]
                data, source = partner.audio, f"{partner.shard}:{partner.key}"
                low, high = cfg.speech_snr
                kind = SPEECH
            ratio = float(rng.uniform(low, high))
            try:
                segment = _decode_segment(data, seg_len, rng, tile=use_noise)
            except Exception as e:  # noqa: BLE001 - the decoders raise several types
                raise PretrainError(f"mixing {item.shard}:{item.key} with {source}: the "
                                    f"{'noise clip' if use_noise else 'partner'} does not decode ({e})") from e
            seg_len = len(segment)
            start = min(start, length - seg_len)
            row = audio[i, :length]
            p_primary = _mean_square(row)
            p_segment = _mean_square(segment)
            if p_segment < _SILENT_POWER or p_primary < _SILENT_POWER:
                counts["mix_silent"] = counts.get("mix_silent", 0) + 1
                continue
            scale = np.float32(np.sqrt(p_primary / (p_segment * 10.0 ** (ratio / 10.0))))
            row[start:start + seg_len] += scale * segment
            kinds[i] = kind
            name = "mixed_noise" if kind == NOISE else "mixed_speech"
            counts[name] = counts.get(name, 0) + 1
        return kinds
