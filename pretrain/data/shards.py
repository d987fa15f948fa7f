"""``pretrain shards build`` and ``pretrain shards verify``: corpus -> WebDataset tar shards.

Each utterance is stored as tar members sharing its key: ``<key>.flac`` (or ``.wav``), 16 kHz
mono 16-bit audio; ``<key>.json``, its metadata (``num_samples``, ``duration``, ``source``,
``source_sample_rate``, ``source_channels``, and ``speaker``/``text`` where the corpus has
them); ``<key>.align.json``, the source's phone alignment where it has one, without its frame labels
(its sample positions are at ``source_sample_rate``).

Build steps: read the sources and their durations (``scan``), cut the ordered list into
shards (``plan``, a pure function of the sources and the config), encode each shard in a worker
into ``shard-NNNNNN.tar.tmp`` and rename it, record its statistics in
``.build/shard-NNNNNN.json``, and finally write ``skipped.jsonl`` and ``manifest.json``
(atomically, last). A re-run with the same plan keeps every shard whose statistics exist.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from pretrain import __version__
from pretrain.config import write_run_record
from pretrain.config.shards import ShardsBuildConfig, parse_size
from pretrain.phones import PHONE_ID, PHONES
from pretrain.data.audio import EXTENSIONS, BadAudio, decode, encode, load_mono_16k
from pretrain.data.labels import alignment_frame_labels, write_label_meta, write_label_shard
from pretrain.data.layout import annotate, in_subset, split_points
from pretrain.data.sources import SourceItem, read_sources
from pretrain.frames import SAMPLE_RATE
from pretrain.utils import PretrainError, atomic_write_json, atomic_write_text, safe_name, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD_DIR = ".build"
# A fixed member mtime makes a shard's bytes, hence its sha256, a function of its content. It
# must be an int: a float mtime makes tarfile add a PAX header to every member, which costs a
# quarter of the reading time.
TAR_MTIME = 0
PHONE_LABEL_RATES = (50, 100)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _pool(jobs: int) -> cf.ProcessPoolExecutor:
    # spawn: the parent may hold threads (torch, tqdm) that make fork unsafe.
    return cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


# --------------------------------------------------------------------------- build


def _scan_one(item: SourceItem) -> tuple[float | None, str | None]:
    """Duration in seconds from the header, or the reason the file is unreadable."""
    try:
        info = sf.info(item.path)
    except Exception as e:  # noqa: BLE001
        return None, f"unreadable: {e}"
    return info.frames / info.samplerate, None


def plan_shards(items: list[SourceItem], durations: list[float], cfg: ShardsBuildConfig) -> list[list[int]]:
    """Cut the ordered items into shards by count or by 16-bit PCM size; indices into ``items``."""
    shards: list[list[int]] = [[]]
    if cfg.per_shard is not None:
        for i in range(len(items)):
            if len(shards[-1]) == cfg.per_shard:
                shards.append([])
            shards[-1].append(i)
    else:
        limit = parse_size(cfg.target_size)
        size = 0
        for i, seconds in enumerate(durations):
            nbytes = int(seconds * SAMPLE_RATE) * 2
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += nbytes
    return [s for s in shards if s]


def _sample(key: str, audio, item: SourceItem, extra: dict, source_sr: int, channels: int, audio_format: str,
            segment: dict | None = None) -> dict:
    meta = {"key": key, "num_samples": len(audio), "duration": len(audio) / SAMPLE_RATE,
            "sample_rate": SAMPLE_RATE, "source": item.source,
            "source_sample_rate": source_sr, "source_channels": channels}
    for field in ("speaker", "chapter", "text", "meta"):
        if field in extra:
            meta[field] = extra[field]
    if segment is not None:
        meta["segment"] = segment
    return {"__key__": key, audio_format: encode(audio, audio_format), "json": json.dumps(meta).encode()}


def build_shard(out: str, index: int, items: list[SourceItem], audio_format: str,
                min_duration: float, max_duration: float | None = None, long_policy: str = "split") -> dict:
    """Encode one shard; returns (and records in .build/) its statistics and skipped items.
    Utterances longer than ``max_duration`` are split (``pretrain.data.layout.split_points``)
    or skipped, as ``long_policy`` says."""
    out_dir = Path(out)
    name = shard_name(index)
    tmp = out_dir / f"{name}.tmp"
    skipped, utterances, seconds = [], 0, 0.0
    phone_labels: dict[int, dict] = {rate: {} for rate in PHONE_LABEL_RATES}
    with open(tmp, "wb") as f:
        import webdataset as wds  # here only: it imports torch, which readers of shards need not

        writer = wds.TarWriter(f, mtime=TAR_MTIME)
        for item in items:
            try:
                audio, source_sr, channels = load_mono_16k(item.path, min_duration)
            except BadAudio as e:
                skipped.append({"source": item.source, "key": item.key, "reason": str(e)})
                continue
            if max_duration is not None and len(audio) > max_duration * SAMPLE_RATE:
                if long_policy == "skip" or "align" in item.extra:
                    why = "long_policy=skip" if long_policy == "skip" else "an aligned utterance is never cut"
                    skipped.append({"source": item.source, "key": item.key,
                                    "reason": f"longer than max_duration: {len(audio) / SAMPLE_RATE:.1f} s > "
                                              f"{max_duration} s ({why})"})
                    continue
                cuts = split_points(audio, int(max_duration * SAMPLE_RATE))
                for a, b in zip(cuts, cuts[1:]):
                    key = f"{item.key}__{round(a * 1000 / SAMPLE_RATE)}"
                    extra = {k: v for k, v in item.extra.items() if k != "text"}  # the text is the whole file's
                    writer.write(_sample(key, audio[a:b], item, extra, source_sr, channels, audio_format,
                                         {"parent": item.key, "start": a / SAMPLE_RATE, "end": b / SAMPLE_RATE}))
                    utterances += 1
                    seconds += (b - a) / SAMPLE_RATE
                continue
            sample = _sample(item.key, audio, item, item.extra, source_sr, channels, audio_format)
            if "align" in item.extra:
                try:
                    align = json.loads(Path(item.extra["align"]).read_bytes())
                    # Frame labels are derivable from the segments and live in the phones label
                    # sets; keeping them here would make every sample several kB larger to read.
                    align.pop("frame_labels", None)
                    sample["align.json"] = json.dumps(align).encode()
                    for rate in PHONE_LABEL_RATES:
                        phone_labels[rate][item.key] = alignment_frame_labels(
                            align, len(audio), source_sr, rate, PHONE_ID)
                except (OSError, ValueError, KeyError) as e:
                    skipped.append({"source": item.source, "key": item.key,
                                    "reason": f"alignment unusable: {type(e).__name__}: {e}"})
                    continue
            writer.write(sample)
            utterances += 1
            seconds += len(audio) / SAMPLE_RATE
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / name)
    # Gold phone labels of a synthetic corpus, as a label set like any other (written before
    # the shard's statistics, which mark the shard done).
    label_entries = {}
    if phone_labels[PHONE_LABEL_RATES[0]] and len(phone_labels[PHONE_LABEL_RATES[0]]) == utterances:
        for rate in PHONE_LABEL_RATES:
            label_entries[f"phones{rate}"] = write_label_shard(out_dir, f"phones{rate}", name, phone_labels[rate])
    stats = {"name": name, "utterances": utterances, "seconds": round(seconds, 6),
             "bytes": (out_dir / name).stat().st_size, "sha256": sha256_file(out_dir / name),
             "skipped": skipped, "labels": label_entries}
    atomic_write_json(out_dir / BUILD_DIR / f"{name}.json", stats)
    return stats


def build_shards(cfg: ShardsBuildConfig, progress: bool = True, argv: list[str] | None = None) -> dict:
    """Build (or resume building) the shards of ``cfg.input`` in ``cfg.out``; returns the manifest."""
    out = Path(cfg.out)
    items = [item for item in annotate(read_sources(cfg.input), cfg) if in_subset(item, cfg)]
    if not items:
        raise PretrainError(f"subset={cfg.subset} of {cfg.input} is empty (valid_fraction={cfg.valid_fraction})")
    jobs = cfg.jobs or os.cpu_count() or 1

    skipped: list[dict] = []
    durations = [0.0] * len(items)
    if cfg.per_shard is None:
        with _pool(jobs) as pool:
            scanned = list(tqdm(pool.map(_scan_one, items, chunksize=64), total=len(items),
                                desc="scanning", unit="file", disable=not progress, dynamic_ncols=True))
        keep = []
        for item, (seconds, reason) in zip(items, scanned):
            if reason is None:
                keep.append((item, seconds))
            else:
                skipped.append({"source": item.source, "key": item.key, "reason": reason})
        items, durations = [i for i, _ in keep], [d for _, d in keep]
    plan = plan_shards(items, durations, cfg)
    plan_record = {
        "format_version": FORMAT_VERSION,
        "audio_format": cfg.audio_format,
        "min_duration": cfg.min_duration,
        "shards": [[items[i].key for i in shard] for shard in plan],
    }
    # Settings added later enter the record only when used, so older builds still resume.
    for name, default in (("max_duration", None), ("long_policy", "split"), ("speaker_from", None),
                          ("transcripts", True), ("side_json", True), ("subset", "all")):
        if getattr(cfg, name) != default:
            plan_record[name] = getattr(cfg, name)
    _prepare_out(out, plan_record, cfg.overwrite)
    write_run_record(out, cfg, argv)

    stats: dict[int, dict] = {}
    todo = []
    for index, shard in enumerate(plan):
        done = out / BUILD_DIR / f"{shard_name(index)}.json"
        if done.is_file() and (out / shard_name(index)).is_file():
            stats[index] = json.loads(done.read_text())
        else:
            todo.append(index)
    if stats:
        log.info("resuming: %d of %d shards already built", len(stats), len(plan))
    bar = tqdm(total=len(plan), initial=len(stats), desc="building shards", unit="shard",
               disable=not progress, dynamic_ncols=True)
    with _pool(min(jobs, max(1, len(todo)))) as pool:
        futures = {pool.submit(build_shard, str(out), index, [items[i] for i in plan[index]],
                               cfg.audio_format, cfg.min_duration, cfg.max_duration, cfg.long_policy): index
                   for index in todo}
        for future in cf.as_completed(futures):
            stats[futures[future]] = future.result()
            bar.update(1)
    bar.close()

    for index in range(len(plan)):
        skipped.extend(stats[index]["skipped"])
    atomic_write_text(out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
    _write_phone_label_meta(out, [stats[i] for i in range(len(plan))])
    shards = [{k: v for k, v in stats[i].items() if k not in ("skipped", "labels")}
              for i in range(len(plan))]
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": f"pretrain {__version__}",
        "sample_rate": SAMPLE_RATE,
        "audio_format": cfg.audio_format,
        "shards": shards,
        "totals": {
            "shards": len(shards),
            "utterances": sum(s["utterances"] for s in shards),
            "seconds": round(sum(s["seconds"] for s in shards), 3),
            "bytes": sum(s["bytes"] for s in shards),
            "skipped": len(skipped),
        },
    }
    atomic_write_json(out / MANIFEST, manifest)
    reasons: dict[str, int] = {}
    for s in skipped:
        kind = s["reason"].split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    log.info("built %d shards: %d utterances, %.2f h; skipped %d %s", len(shards),
             manifest["totals"]["utterances"], manifest["totals"]["seconds"] / 3600, len(skipped),
             reasons or "")
    return manifest


def _write_phone_label_meta(out: Path, stats: list[dict]) -> None:
    for rate in PHONE_LABEL_RATES:
        name = f"phones{rate}"
        if not all(name in s["labels"] for s in stats):
            continue  # not every shard has alignments: no gold label set
        write_label_meta(out, name, rate, len(PHONES), {s["name"]: s["labels"][name] for s in stats},
                         {"kind": "alignment", "phones": list(PHONES),
                          "note": "phone at each frame centre, from the source's alignments"})


def _prepare_out(out: Path, plan_record: dict, overwrite: bool) -> None:
    plan_path = out / BUILD_DIR / "plan.json"
    if plan_path.is_file():
        if json.loads(plan_path.read_text()) == plan_record:
            return  # same build: resume
        if not overwrite:
            raise PretrainError(
                f"{out} holds shards of a different build (other input or settings); "
                "choose another 'out' or set overwrite=true")
        _clear(out)
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PretrainError(f"shard output {out} is not empty; choose another 'out' or set overwrite=true")
        _clear(out)
    (out / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_path, plan_record)


def _clear(out: Path) -> None:
    for path in out.iterdir():
        if path.is_dir() and path.name in (BUILD_DIR, "labels"):
            shutil.rmtree(path)
        elif path.is_file() and (path.name.startswith("shard-") or path.name in
                                 (MANIFEST, "skipped.jsonl", "config.yaml", "run.json")):
            path.unlink()


# --------------------------------------------------------------------------- reading


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise PretrainError(f"{shard_dir} has no {MANIFEST}: not a finished shard directory")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PretrainError(f"{path}: format_version {manifest.get('format_version')} is not "
                            f"{FORMAT_VERSION}, the one this version of pretrain reads")
    for shard in manifest.get("shards", []):
        # Shard names are joined into paths (label files, feature files): a received manifest
        # must not point a writer outside the directory.
        safe_name(shard.get("name"), f"{path}: shard name")
    return manifest


def shard_index(shards: Path, progress: bool = True) -> dict[str, tuple[str, int, str]]:
    """``{key: (shard name, num_samples, source)}`` from every shard's per-utterance metadata
    (the small ``.json`` members; audio is not decoded)."""
    index: dict[str, tuple[str, int, str]] = {}
    for entry in tqdm(read_manifest(shards)["shards"], desc="reading shards", unit="shard", disable=not progress,
                      dynamic_ncols=True):
        for sample in iter_shard(shards / entry["name"]):
            meta = json.loads(sample["json"])
            index[sample["__key__"]] = (entry["name"], int(meta["num_samples"]), str(meta.get("source", "")))
    return index


_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def iter_shard(path: str | Path):
    """Samples of one shard as WebDataset groups them: dicts of ``__key__`` and member bytes.

    WebDataset's rule, kept here so that reading shards does not import webdataset (and with
    it torch, 1.5 s at every start of a stage that needs neither): consecutive members whose
    names agree up to the first dot of the file name form a sample, keyed by that prefix; the
    rest of the name, lower-cased, is the field; a repeated field is an error."""
    sample: dict | None = None
    for member in _tar_members(str(path)):
        match = _KEY_EXT.match(member["fname"])
        if match is None:
            continue
        prefix, field = match.group(1), match.group(2).lower()
        if sample is None or prefix != sample["__key__"]:
            if sample is not None and len(sample) > 2:
                yield sample
            sample = {"__key__": prefix, "__url__": member["__url__"]}
        if field in sample:
            raise ValueError(f"{member['fname']}: duplicate file name in tar file {path}")
        sample[field] = member["data"]
    if sample is not None and len(sample) > 2:
        yield sample


class _NotPlainTar(Exception):
    """A header the fast reader leaves to tarfile (pax, GNU long names, base-256 sizes)."""


def _tar_members(path: str):
    """Regular members of a tar file as WebDataset's groupers take them. Our shards are plain
    ustar (short names, no extended headers); those are read here directly, two reads per
    member: 2.8x tarfile's seekable reading of the same FLAC shards, 3.5x its streaming mode
    (``benchmarks/data_pipeline.py``, section (f); benchmarks/results/data_pipeline_tar.txt).
    Any other header hands the file to tarfile, which continues after the members already
    given."""
    given = 0
    try:
        for member in _plain_tar_members(path):
            given += 1
            yield member
        return
    except _NotPlainTar:
        pass
    # Seekable "r:" mode reads each member with one read call; WebDataset's own streaming "r|*"
    # mode copies through 10 kB blocks: 1.25x slower (benchmarks/data_pipeline.py, section (f)).
    with tarfile.open(path, "r:") as tar:
        seen = 0
        for info in tar:
            if info.isreg():
                seen += 1
                if seen > given:
                    yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": path}
            tar.members = []  # tarfile keeps every header otherwise


def _plain_tar_members(path: str):
    with open(path, "rb") as f:
        while True:
            header = f.read(512)
            if len(header) < 512:
                if header:
                    raise tarfile.ReadError(f"{path}: truncated tar header")
                return  # tar files may end without their zero blocks
            if header.count(0) == 512:
                return  # end-of-archive marker
            # The header checksum: unsigned byte sum with the checksum field read as spaces.
            stored = header[148:156].split(b"\0", 1)[0].strip()
            if not stored.isdigit() or int(stored, 8) != sum(header) - sum(header[148:156]) + 256:
                raise tarfile.ReadError(f"{path}: bad tar header checksum at byte {f.tell() - 512}")
            kind = header[156:157]
            size_field = header[124:136]
            if (kind not in (b"0", b"\0") or size_field[0] & 0x80 or header[257:262] != b"ustar"
                    or header[345:346] != b"\0"):  # a ustar name prefix: leave those to tarfile
                raise _NotPlainTar
            size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
            data = f.read(size)
            if len(data) < size:
                raise tarfile.ReadError(f"{path}: truncated member at byte {f.tell() - len(data)}")
            if size % 512:
                f.seek(512 - size % 512, 1)
            yield {"fname": header[:100].split(b"\0", 1)[0].decode("utf-8"), "data": data, "__url__": path}


# --------------------------------------------------------------------------- verify


def verify_shard(shard_dir: str, entry: dict) -> list[str]:
    """Problems with one shard: checksum, then every sample decoded and checked."""
    path = Path(shard_dir) / entry["name"]
    name = entry["name"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        problems.append(f"{name}: sha256 {digest} does not match the manifest's {entry['sha256']}")
    count = 0
    try:
        for sample in iter_shard(path):
            key = sample["__key__"]
            count += 1
            audio_ext = next((e for e in EXTENSIONS if e in sample), None)
            if audio_ext is None or "json" not in sample:
                problems.append(f"{name} key {key}: missing audio or json member")
                continue
            try:
                meta = json.loads(sample["json"])
                audio = decode(sample[audio_ext])
                if len(audio) != meta["num_samples"]:
                    problems.append(f"{name} key {key}: decoded {len(audio)} samples, metadata says "
                                    f"{meta['num_samples']}")
            except Exception as e:  # noqa: BLE001 - any failure is a problem to name
                problems.append(f"{name} key {key}: {type(e).__name__}: {e}")
    except (tarfile.TarError, OSError, ValueError) as e:
        problems.append(f"{name}: unreadable after {count} samples: {type(e).__name__}: {e}")
    if count != entry["utterances"]:
        problems.append(f"{name}: {count} samples, the manifest says {entry['utterances']}")
    return problems


def verify_shards(shard_dir: str, jobs: int = 0, progress: bool = True) -> list[str]:
    """Every problem found in the shards of ``shard_dir`` (empty when all is well)."""
    manifest = read_manifest(shard_dir)
    jobs = jobs or os.cpu_count() or 1
    problems: list[str] = []
    with _pool(jobs) as pool:
        futures = [pool.submit(verify_shard, str(shard_dir), entry) for entry in manifest["shards"]]
        for future in tqdm(futures, desc="verifying", unit="shard", disable=not progress,
                           dynamic_ncols=True):
            problems.extend(future.result())
    return problems
