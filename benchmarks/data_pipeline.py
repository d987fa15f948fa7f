"""Data pipeline throughput vs a per-file loader, side by side in one run.

(a) ``pretrain.data.pipeline.ShardLoader`` in the main process (``num_workers=0``, so one
    core does everything): tar read, decode (FLAC by libFLAC, WAV by numpy; see
    ``pretrain.data.audio``), random crop, length-bucketed batches padded to their longest
    utterance (``pad_audio=true``).
(b) A plain per-file loader as fairseq's ``FileAudioDataset`` works: ``soundfile.read`` of each
    FLAC file of the same corpus, the same crop rule, batches of the same token budget over a
    length-sorted order, padded the same way. (a) and (b) deliver the same audio.
(c) The pipeline of (a) with WavLM's utterance mixing at its defaults (``prob`` 0.2, half
    noise from shards of ``pretrain corpus noise`` in the same format, half another utterance
    of the pool).
(d) Raw decoding: ``soundfile.read`` of every file of the same corpus into float32, nothing
    else (no cropping, batching or padding): the floor the decoding library sets.
(e) The same with the pipeline's own decoders on each file's bytes: the floor for (a).
(f) Tar reading alone, every member's bytes of every shard, no decoding: our reader
    (``pretrain.data.shards.iter_shard``: plain ustar headers read directly), ``tarfile`` in
    seekable ``r:`` mode (what our reader falls back to), and ``tarfile``'s streaming ``r|``
    mode (what ``webdataset`` itself uses).

All are run on FLAC (shards built with ``audio_format=flac``, the per-file loader reading the
corpus's FLAC files) and on 16-bit WAV (``audio_format=wav`` shards, WAV copies of the files).
Each is timed by process CPU time, in interleaved repeats, and the median is reported. Prints
audio-seconds delivered per CPU-core-second and the ratios, and ends with one JSON line holding
``realtime_per_core``, ``ratio_vs_per_file``, ``ratio_vs_raw_decode`` (against (d)) and
``ratio_vs_own_decode`` (against (e)) for FLAC, the default format, the same for WAV (``wav_``),
``realtime_per_core_mixing`` with ``mixing_cost`` (the slow-down of (c) against (a)),
``tar_ours_vs_tarfile`` and ``tar_ours_vs_stream`` (the ratios of (f)), the FLAC
decoder in use, and ``targets``: issue 19's goals (1.0x the per-file loader and 0.9x raw
decoding on FLAC, 5,000x real time per core on WAV) and whether each was met.

Usage: python benchmarks/data_pipeline.py [--seconds 300] [--epochs 2] [--repeats 5] [--corpus DIR]
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from pretrain.config import load_config
from pretrain.config.corpus import CorpusSynthConfig, NoiseSynthConfig
from pretrain.config.data import DataConfig
from pretrain.config.shards import ShardsBuildConfig
from pretrain.corpus.noise import synthesize_noise
from pretrain.corpus.synth import synthesize_corpus
from pretrain.data import flac
from pretrain.data.audio import decode
from pretrain.data.pipeline import ShardLoader
from pretrain.data.shards import build_shards, iter_shard, read_manifest

MAX_TOKENS = 1_400_000
MAX_SAMPLE_SIZE = 250_000


def pipeline_epochs(shards: Path, epochs: int, noise: Path | None = None) -> tuple[float, float]:
    mixing = [f"mixing.noise_shards={noise}", "mixing.prob=0.2", "mixing.noise_prob=0.5"] if noise else []
    # pad_audio: the per-file loader pads too, so both deliver the same audio (HuBERT's default
    # crops a batch to its shortest utterance, which decodes less and would flatter the pipeline).
    cfg = load_config(DataConfig, [], [f"shards={shards}", "num_workers=0", "min_sample_size=0", "pad_audio=true",
                                       f"max_tokens={MAX_TOKENS}", f"max_sample_size={MAX_SAMPLE_SIZE}", *mixing])
    loader = ShardLoader(cfg)
    delivered = 0
    cpu0 = time.process_time()
    for _ in range(epochs):
        for batch in loader:
            delivered += int(batch["lengths"].sum())
    return delivered / 16000, time.process_time() - cpu0


def per_file_epochs(corpus: Path, epochs: int, suffix: str = ".flac") -> tuple[float, float]:
    records = [json.loads(line) for line in (corpus / "utterances.jsonl").read_text().splitlines()]
    delivered = 0
    cpu0 = time.process_time()
    for epoch in range(epochs):
        rng = np.random.default_rng(epoch)
        # fairseq orders by size (with a random tie-break) and batches by token budget.
        order = sorted(rng.permutation(len(records)), key=lambda i: min(records[i]["num_samples"], MAX_SAMPLE_SIZE))
        batches, current = [], []
        for i in order:
            length = min(records[i]["num_samples"], MAX_SAMPLE_SIZE)
            if current and (len(current) + 1) * length > MAX_TOKENS:
                batches.append(current)
                current = []
            current.append(i)
        batches.append(current)
        for b in rng.permutation(len(batches)):
            audios = []
            for i in batches[b]:
                path = (corpus / records[i]["audio"]).with_suffix(suffix)
                audio, _ = sf.read(path, dtype="float32")
                if len(audio) > MAX_SAMPLE_SIZE:
                    start = int(rng.integers((len(audio) - MAX_SAMPLE_SIZE) // 320 + 1)) * 320
                    audio = audio[start:start + MAX_SAMPLE_SIZE]
                audios.append(audio)
            lengths = torch.tensor([len(a) for a in audios])
            padded = torch.zeros(len(audios), int(lengths.max()))
            for j, a in enumerate(audios):
                padded[j, : len(a)] = torch.from_numpy(a)
            mask = torch.arange(padded.shape[1])[None, :] >= lengths[:, None]
            delivered += int(lengths.sum())
            del mask
    return delivered / 16000, time.process_time() - cpu0


def raw_decode_epochs(corpus: Path, epochs: int, suffix: str = ".flac", ours: bool = False) -> tuple[float, float]:
    """Every file read whole into float32: by ``soundfile.read`` (the decoding library's floor),
    or with ``ours`` by the pipeline's own decoders (libFLAC; numpy for WAV) on the file's bytes."""
    paths = [(corpus / json.loads(line)["audio"]).with_suffix(suffix)
             for line in (corpus / "utterances.jsonl").read_text().splitlines()]
    delivered = 0
    cpu0 = time.process_time()
    for _ in range(epochs):
        for path in paths:
            delivered += len(decode(path.read_bytes()) if ours else sf.read(path, dtype="float32")[0])
    return delivered / 16000, time.process_time() - cpu0


def tar_read_epochs(shards: Path, epochs: int, reader: str) -> tuple[float, float]:
    """(audio seconds in the shards, CPU seconds) of reading every member's bytes ``epochs`` times."""
    entries = read_manifest(shards)["shards"]
    paths = [shards / e["name"] for e in entries]
    audio = sum(e["seconds"] for e in entries)
    cpu0 = time.process_time()
    for _ in range(epochs):
        for path in paths:
            if reader == "ours":
                for _ in iter_shard(path):
                    pass
            else:
                with tarfile.open(path, "r:" if reader == "tarfile" else "r|") as tar:
                    for info in tar:
                        if info.isreg():
                            tar.extractfile(info).read()
    return audio * epochs, time.process_time() - cpu0


def copy_as_wav(corpus: Path, dst: Path) -> Path:
    """The corpus with a .wav beside each .flac (16-bit PCM), for the per-file WAV baseline."""
    import shutil

    shutil.copytree(corpus, dst)
    for path in dst.glob("audio/*/*.flac"):
        audio, sr = sf.read(path, dtype="int16")
        sf.write(path.with_suffix(".wav"), audio, sr, subtype="PCM_16")
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="audio in the synthetic corpus")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each loader, interleaved")
    parser.add_argument("--corpus", type=Path, help="an existing synthetic corpus to use")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus
        if corpus is None:
            corpus = Path(tmp) / "corpus"
            synthesize_corpus(load_config(CorpusSynthConfig, [], [f"out={corpus}", f"hours={args.seconds / 3600}"]),
                              progress=False, argv=["benchmark"])
        corpus = copy_as_wav(corpus, Path(tmp) / "corpus_wav")
        shards = {}
        for fmt in ("flac", "wav"):
            shards[fmt] = Path(tmp) / f"shards_{fmt}"
            build_shards(load_config(ShardsBuildConfig, [], [f"input={corpus}", f"out={shards[fmt]}",
                                                              "per_shard=16", f"audio_format={fmt}"]),
                         progress=False, argv=["benchmark"])
        noise = Path(tmp) / "noise"
        synthesize_noise(load_config(NoiseSynthConfig, [], [f"out={noise}", "hours=0.05", f"speech={corpus}"]),
                         progress=False, argv=["benchmark"])
        for fmt in ("flac", "wav"):
            build_shards(load_config(ShardsBuildConfig, [], [f"input={noise}", f"out={noise}_{fmt}", "per_shard=16",
                                                              f"audio_format={fmt}"]),
                         progress=False, argv=["benchmark"])
        runs = {
            "pipeline_flac": lambda: pipeline_epochs(shards["flac"], args.epochs),
            "pipeline_flac_mixing": lambda: pipeline_epochs(shards["flac"], args.epochs, Path(f"{noise}_flac")),
            "per_file_flac": lambda: per_file_epochs(corpus, args.epochs, ".flac"),
            "raw_decode_flac": lambda: raw_decode_epochs(corpus, args.epochs, ".flac"),
            "raw_decode_flac_ours": lambda: raw_decode_epochs(corpus, args.epochs, ".flac", ours=True),
            "pipeline_wav": lambda: pipeline_epochs(shards["wav"], args.epochs),
            "pipeline_wav_mixing": lambda: pipeline_epochs(shards["wav"], args.epochs, Path(f"{noise}_wav")),
            "per_file_wav": lambda: per_file_epochs(corpus, args.epochs, ".wav"),
            "raw_decode_wav": lambda: raw_decode_epochs(corpus, args.epochs, ".wav"),
            "raw_decode_wav_ours": lambda: raw_decode_epochs(corpus, args.epochs, ".wav", ours=True),
            "tar_ours": lambda: tar_read_epochs(shards["flac"], args.epochs, "ours"),
            "tar_tarfile": lambda: tar_read_epochs(shards["flac"], args.epochs, "tarfile"),
            "tar_stream": lambda: tar_read_epochs(shards["flac"], args.epochs, "stream"),
        }
        for run in runs.values():  # warm the page cache and imports for every loader alike
            run()
        rates: dict[str, list[float]] = {name: [] for name in runs}
        audio_s = {}
        # Interleaved repeats: a slow spell of this shared machine hits every loader alike.
        for _ in range(args.repeats):
            for name, run in runs.items():
                audio_s[name], cpu_s = run()
                rates[name].append(audio_s[name] / cpu_s)
    medians = {name: float(np.median(r)) for name, r in rates.items()}
    for name in runs:
        print(json.dumps({"bench": "data", "loader": name, "audio_s_per_run": round(audio_s[name], 1),
                          "repeats": args.repeats, "realtime_per_core_median": round(medians[name], 1),
                          "min": round(min(rates[name]), 1), "max": round(max(rates[name]), 1)}), flush=True)
    flac_ratio = medians["pipeline_flac"] / medians["per_file_flac"]
    wav_ratio = medians["pipeline_wav"] / medians["per_file_wav"]
    flac_raw = medians["pipeline_flac"] / medians["raw_decode_flac"]
    wav_raw = medians["pipeline_wav"] / medians["raw_decode_wav"]
    print(f"\nreal time per CPU core (median of {args.repeats}):")
    print(f"  FLAC: pipeline {medians['pipeline_flac']:7.0f}x   per-file {medians['per_file_flac']:7.0f}x   "
          f"raw decode {medians['raw_decode_flac']:7.0f}x   ratios {flac_ratio:.2f} / {flac_raw:.2f}")
    print(f"  WAV:  pipeline {medians['pipeline_wav']:7.0f}x   per-file {medians['per_file_wav']:7.0f}x   "
          f"raw decode {medians['raw_decode_wav']:7.0f}x   ratios {wav_ratio:.2f} / {wav_raw:.2f}")
    mixing_cost = medians["pipeline_flac"] / medians["pipeline_flac_mixing"]
    wav_mixing_cost = medians["pipeline_wav"] / medians["pipeline_wav_mixing"]
    flac_own = medians["pipeline_flac"] / medians["raw_decode_flac_ours"]
    wav_own = medians["pipeline_wav"] / medians["raw_decode_wav_ours"]
    decoder = flac.describe()
    print(f"  the pipeline's own decoders on whole files (FLAC: {decoder}; WAV: numpy): "
          f"FLAC {medians['raw_decode_flac_ours']:7.0f}x (pipeline {flac_own:.2f})   "
          f"WAV {medians['raw_decode_wav_ours']:7.0f}x (pipeline {wav_own:.2f})")
    print(f"  WavLM mixing (prob 0.2), FLAC: {medians['pipeline_flac_mixing']:7.0f}x "
          f"(cost {mixing_cost:.2f}x)   WAV: {medians['pipeline_wav_mixing']:7.0f}x (cost {wav_mixing_cost:.2f}x)")
    tar_vs_tarfile = medians["tar_ours"] / medians["tar_tarfile"]
    tar_vs_stream = medians["tar_ours"] / medians["tar_stream"]
    print(f"  tar reading alone (FLAC shards): ours {medians['tar_ours']:7.0f}x, tarfile r: "
          f"{medians['tar_tarfile']:7.0f}x, tarfile r| (webdataset's) {medians['tar_stream']:7.0f}x; ours "
          f"{tar_vs_tarfile:.2f}x tarfile, {tar_vs_stream:.2f}x the stream")
    print(f"  WAV shards vs the per-file FLAC loader (fairseq's usual set-up): "
          f"{medians['pipeline_wav'] / medians['per_file_flac']:.2f}")
    print(json.dumps({"bench": "data_pipeline", "format": "flac",
                      "realtime_per_core": round(medians["pipeline_flac"], 1),
                      "ratio_vs_per_file": round(flac_ratio, 3),
                      "ratio_vs_raw_decode": round(flac_raw, 3),
                      "flac_decoder": decoder,
                      "ratio_vs_own_decode": round(flac_own, 3),
                      "wav_realtime_per_core": round(medians["pipeline_wav"], 1),
                      "wav_ratio_vs_per_file": round(wav_ratio, 3),
                      "wav_ratio_vs_raw_decode": round(wav_raw, 3),
                      "wav_ratio_vs_own_decode": round(wav_own, 3),
                      "realtime_per_core_mixing": round(medians["pipeline_flac_mixing"], 1),
                      "mixing_cost": round(mixing_cost, 3),
                      "wav_realtime_per_core_mixing": round(medians["pipeline_wav_mixing"], 1),
                      "wav_mixing_cost": round(wav_mixing_cost, 3),
                      "tar_ours_vs_tarfile": round(tar_vs_tarfile, 3),
                      "tar_ours_vs_stream": round(tar_vs_stream, 3),
                      "targets": {"flac_ratio_vs_per_file >= 1.0": flac_ratio >= 1.0,
                                  "flac_ratio_vs_raw_decode >= 0.9": flac_raw >= 0.9,
                                  "wav_realtime_per_core >= 5000": medians["pipeline_wav"] >= 5000}}))


if __name__ == "__main__":
    main()
