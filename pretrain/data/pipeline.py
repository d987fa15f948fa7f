"""Streaming WebDataset shards into padded, length-bucketed batches, with exact resume.

The plan
--------
There are ``S = world_size * max(1, num_workers)`` streams ("slots"); rank ``r``'s DataLoader
worker ``w`` feeds slot ``r * W + w``. For each epoch the shards are permuted by
``(seed, epoch)`` and dealt greedily, in that order, to the slot with the fewest utterances so
far: every shard belongs to exactly one slot, so within an epoch no utterance is dropped or
repeated, and slots differ by at most about one shard's utterances. That remainder is not
padded or cut: in epoch mode a rank may yield a few batches more than another (the trainer
agrees on when to stop); in infinite mode every slot simply moves on to its next epoch.
At least ``S`` shards are required, or some slot would have nothing to read.

A slot reads its shards in order. Within a shard, samples are read in windows of
``shuffle_window`` and each window is permuted by ``(seed, epoch, shard, window)``. Samples are
gathered into pools of ``bucket_size``, sorted by (cropped) length, cut into batches of at most
``max_tokens`` padded samples (cropped to the batch's shortest unless ``pad_audio``), and the batches of a pool are yielded in an order permuted by the
pool's start position. Crops are drawn from ``(seed, epoch, key)``. Everything is therefore a
pure function of ``(seed, epoch, world_size, num_workers)`` and the manifest.

Resume
------
A slot's state is the position where its current pool started, how many of that pool's batches
were consumed, and its counters; it travels with every batch from the worker to the main
process (workers cannot be asked for their state). ``ShardLoader.state_dict()`` holds the state
of every slot of this rank plus the slot that yielded last. On resume each slot re-reads its
pool from the saved position (no decoding), skips the consumed batches, and continues; the
DataLoader's round-robin over workers is restored by rotating which slot each worker serves.
Changing ``num_workers``, ``seed`` or the shards on resume is refused with an error saying
which field differs. A different ``world_size`` (training resumed with another process count)
follows one documented policy, :meth:`ShardLoader.load_repartitioned`: the saved positions of
the old streams cannot be mapped onto the new ones, so every new stream starts the epoch after
the furthest one any old stream had reached. Nothing is read twice within an epoch; what the
old streams had not read of their current epoch is skipped, and a warning says so.
"""

from __future__ import annotations

import json
import logging
import signal
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.config.data import DataConfig
from pretrain.data.audio import EXTENSIONS, decode_into
from pretrain.data.labels import LabelSet
from pretrain.data.mixing import Mixer
from pretrain.data.shards import iter_shard, read_manifest
from pretrain.frames import num_frames
from pretrain.utils import PretrainError

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: the mixing settings are part of the state
LABEL_PAD = -100
CROP_QUANTUM = 320  # both label grids (160 and 320 samples per frame) stay aligned


class DataError(PretrainError):
    """A corrupt shard or sample met with ``on_error=raise``."""


# --------------------------------------------------------------------------- plan


def assign_shards(counts: list[int], num_slots: int, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
    """Shard indices of each slot for one epoch (greedy by utterance count, in permuted order)."""
    order = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(counts)) if shuffle \
        else np.arange(len(counts))
    loads = np.zeros(num_slots, dtype=np.int64)
    slots: list[list[int]] = [[] for _ in range(num_slots)]
    for shard in order:
        slot = int(np.argmin(loads))  # lowest index among ties: deterministic
        slots[slot].append(int(shard))
        loads[slot] += counts[shard]
    return slots


def _key_hash(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


@dataclass
class _Item:
    """A sample read from a shard but not decoded."""

    shard: str
    key: str
    num_samples: int
    audio: bytes
    epoch: int
    labels: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class SlotState:
    """Where one slot's stream is, in terms that survive a restart."""

    pool_start: tuple[int, int, int] = (0, 0, 0)
    """(epoch, index into the slot's shard list, position in the shard's permuted order)."""
    batches_done: int = 0
    """Batches of the pool starting at ``pool_start`` already yielded."""
    read_counts: dict = field(default_factory=lambda: {"read": 0, "too_short": 0, "read_errors": 0,
                                                       "damaged_shards": []})
    """Counters of samples read up to ``pool_start`` (the pool's own are recounted on rebuild),
    and the (epoch, shard) pairs found damaged."""
    yield_counts: dict[str, int] = field(default_factory=lambda: {"samples": 0, "decode_errors": 0})
    """Counters of samples decoded and yielded so far."""

    def to_dict(self) -> dict:
        return {"pool_start": list(self.pool_start), "batches_done": self.batches_done,
                "read_counts": _copy_counts(self.read_counts), "yield_counts": dict(self.yield_counts)}

    @classmethod
    def from_dict(cls, d: dict) -> "SlotState":
        expected = {"pool_start", "batches_done", "read_counts", "yield_counts"}
        if set(d) != expected:
            raise ValueError(f"slot state has keys {sorted(d)}, expected {sorted(expected)}")
        return cls(tuple(d["pool_start"]), int(d["batches_done"]), _copy_counts(d["read_counts"]),
                   dict(d["yield_counts"]))


def _copy_counts(counts: dict) -> dict:
    return {k: [list(m) for m in v] if isinstance(v, list) else v for k, v in counts.items()}


# --------------------------------------------------------------------------- one slot


class SlotStream:
    """Batches of one slot, each with the slot's state after it."""

    def __init__(self, cfg: DataConfig, shard_dir: Path, shards: list[dict], num_slots: int,
                 slot: int, label_sets: list[LabelSet], epoch: int | None, mixer: Mixer | None = None):
        self.cfg = cfg
        self.mixer = mixer
        self.dir = shard_dir
        self.shards = shards
        self.counts = [s["utterances"] for s in shards]
        self.num_slots = num_slots
        self.slot = slot
        self.label_sets = label_sets
        self.only_epoch = epoch  # None: infinite
        self._assignments: dict[int, list[int]] = {}

    def slot_shards(self, epoch: int) -> list[int]:
        if epoch not in self._assignments:
            self._assignments = {epoch: assign_shards(self.counts, self.num_slots, self.cfg.seed, epoch,
                                                      self.cfg.shuffle)[self.slot]}
        return self._assignments[epoch]

    # ---- reading samples

    def _samples(self, pos: tuple[int, int, int], counts: dict) -> Iterator[tuple[_Item, tuple]]:
        """Samples from position ``pos`` on, each with the position after it."""
        epoch, shard_pos, sample_pos = pos
        while True:
            if self.only_epoch is not None and epoch != self.only_epoch:
                return
            shards = self.slot_shards(epoch)
            if shard_pos >= len(shards):
                if self.only_epoch is not None:
                    return
                epoch, shard_pos, sample_pos = epoch + 1, 0, 0
                continue
            for item, p, last in self._read_shard(epoch, shards[shard_pos], sample_pos, counts):
                # After a shard's last sample, point at the next shard, so that a pool starting
                # there does not re-read this one.
                yield item, ((epoch, shard_pos + 1, 0) if last else (epoch, shard_pos, p + 1))
            shard_pos, sample_pos = shard_pos + 1, 0

    def _read_shard(self, epoch: int, shard_index: int, start: int, counts: dict):
        """(item, position in the permuted order, is the shard's last sample) from ``start`` on."""
        name = self.shards[shard_index]["name"]
        labels = {ls.name: ls.load_shard(name) for ls in self.label_sets}
        window = self.cfg.shuffle_window
        raw = iter_shard(self.dir / name)
        read = 0

        def fetch() -> dict | None:
            nonlocal raw, read
            if raw is None:
                return None
            try:
                sample = next(raw)
                read += 1
                return sample
            except StopIteration:
                raw = None
                return None
            except PretrainError:
                raise
            except Exception as e:  # noqa: BLE001 - tar/IO errors of a damaged shard
                raw = None
                message = f"shard {name}: unreadable after {read} samples: {type(e).__name__}: {e}"
                if self.cfg.on_error == "raise":
                    raise DataError(f"{message} (set on_error=skip to skip such shards)") from e
                # Marked by (epoch, shard), so re-reading the shard after a resume or for the next
                # pool does not count the same damage twice.
                mark = [epoch, shard_index]
                if mark not in counts["damaged_shards"]:
                    counts["damaged_shards"].append(mark)
                    counts["read_errors"] += 1
                    log.warning("skipping the rest of %s", message)
                return None

        try:
            window_index = start // window
            for _ in range(window_index * window):  # to the resume point: read, not decoded
                if fetch() is None:
                    return
            pending = fetch()
            while pending is not None:
                buffer = [pending]
                while len(buffer) < window and (sample := fetch()) is not None:
                    buffer.append(sample)
                # One sample of look-ahead tells whether this window ends the shard.
                pending = fetch() if len(buffer) == window else None
                perm = (np.random.default_rng([self.cfg.seed, epoch, shard_index, window_index])
                        .permutation(len(buffer)) if self.cfg.shuffle else np.arange(len(buffer)))
                for j, k in enumerate(perm):
                    p = window_index * window + j
                    if p < start:
                        continue
                    item = self._parse(buffer[k], name, epoch, labels, counts)
                    if item is not None:
                        yield item, p, pending is None and j == len(buffer) - 1
                window_index += 1
        finally:
            if raw is not None:
                raw.close()

    def _parse(self, sample: dict, shard: str, epoch: int, labels: dict, counts: dict) -> _Item | None:
        key = sample.get("__key__", "?")
        counts["read"] += 1
        try:
            meta = json.loads(sample["json"])
            audio = next(sample[ext] for ext in EXTENSIONS if ext in sample)
            n = int(meta["num_samples"])
        except Exception as e:  # noqa: BLE001
            self._skip_or_raise(f"shard {shard}, key '{key}': bad sample ({type(e).__name__}: {e})",
                                counts, "read_errors")
            return None
        if n < self.cfg.min_sample_size:
            counts["too_short"] += 1
            return None
        item = _Item(shard, key, n, audio, epoch)
        for ls in self.label_sets:
            item.labels[ls.name] = ls.fit(labels[ls.name], shard, key, n)
        return item

    def _skip_or_raise(self, message: str, counts: dict, counter: str) -> None:
        if self.cfg.on_error == "raise":
            raise DataError(f"{message} (set on_error=skip to skip such samples)")
        counts[counter] += 1
        log.warning("skipping %s", message)

    # ---- batching

    def _crop(self, item: _Item, length: int) -> tuple[int, int]:
        """(offset, length): ``length`` samples at a seeded offset that is a multiple of 320."""
        if not self.cfg.random_crop or length == item.num_samples:
            return 0, length
        slots = (item.num_samples - length) // CROP_QUANTUM + 1
        rng = np.random.default_rng([self.cfg.seed, item.epoch, _key_hash(item.key)])
        return int(rng.integers(slots)) * CROP_QUANTUM, length

    def _make_batches(self, pool: list[_Item]) -> list[list[_Item]]:
        pool = sorted(pool, key=lambda it: (min(it.num_samples, self.cfg.max_sample_size), it.key))
        batches: list[list[_Item]] = []
        for item in pool:
            length = min(item.num_samples, self.cfg.max_sample_size)
            if batches and (len(batches[-1]) + 1) * length <= self.cfg.max_tokens:
                batches[-1].append(item)
            else:
                batches.append([item])
        return batches

    def batches(self, state: SlotState) -> Iterator[tuple[dict | None, SlotState]]:
        read_counts = _copy_counts(state.read_counts)
        yield_counts = dict(state.yield_counts)
        pos = tuple(state.pool_start)
        skip = state.batches_done
        exhausted = False
        # One reader for the whole stream: a pool continues where the previous one stopped
        # (re-opening the shard per pool would re-read it from its start each time). Only a
        # resume starts a reader mid-shard, from the saved pool start.
        samples = self._samples(pos, read_counts)
        while not exhausted:
            pool_start, counts_at_start = pos, _copy_counts(read_counts)
            pool: list[_Item] = []
            for item, nxt in samples:
                pool.append(item)
                pos = nxt
                if len(pool) == self.cfg.bucket_size:
                    break
            else:
                exhausted = True
            if not pool:
                break
            batches = self._make_batches(pool)
            order = (np.random.default_rng([self.cfg.seed, self.slot, *pool_start]).permutation(len(batches))
                     if self.cfg.shuffle else np.arange(len(batches)))
            for done, b in enumerate(order, start=1):
                if done <= skip:
                    continue
                batch = self._collate(batches[b], yield_counts, pool)
                out_state = SlotState(pool_start, done, counts_at_start, dict(yield_counts))
                if batch is not None:
                    yield batch, out_state
            skip = 0
        samples.close()
        # The stream's end, as a state without a batch: it carries the last pool's read
        # counters (skipped, too short), which no batch state includes.
        yield None, SlotState(pos, 0, read_counts, dict(yield_counts))

    def _collate(self, items: list[_Item], counts: dict[str, int], pool: list[_Item] = ()) -> dict | None:
        lengths = [min(item.num_samples, self.cfg.max_sample_size) for item in items]
        if not self.cfg.pad_audio:
            lengths = [min(lengths)] * len(items)
        crops = [self._crop(item, length) for item, length in zip(items, lengths)]
        # Lengths are known from the metadata, so each utterance decodes straight into its row,
        # in float32 (libsndfile's 1/32768 scale, applied as each sample is written: no pass
        # over the batch).
        # Only the padding is zeroed: a zero-filled batch would be written twice.
        audio = torch.empty((len(items), max(length for _, length in crops)), dtype=torch.float32)
        pcm = audio.numpy()
        good, restarts = [], 0
        for i, (item, (offset, length)) in enumerate(zip(items, crops)):
            pcm[i, length:] = 0.0
            try:
                restarts += decode_into(item.audio, offset, pcm[i, :length])
            except Exception as e:  # noqa: BLE001
                self._skip_or_raise(f"shard {item.shard}, key '{item.key}': audio does not decode ({e})",
                                    counts, "decode_errors")
                continue
            good.append(i)
        if not good:
            return None
        if len(good) < len(items):
            items, crops = [items[i] for i in good], [crops[i] for i in good]
            audio = audio[good, : max(length for _, length in crops)].contiguous()
            pcm = audio.numpy()
        counts["samples"] += len(items)
        lengths = torch.tensor([length for _, length in crops], dtype=torch.long)
        mixing = torch.zeros(len(items), dtype=torch.int8)
        if self.mixer is not None and self.mixer.enabled:
            mixing = torch.from_numpy(self.mixer.mix(audio.numpy(), lengths.tolist(), items, pool,
                                                     _key_hash, counts))
        batch: dict[str, Any] = {
            "keys": [item.key for item in items],
            "audio": audio,
            "mixing": mixing,  # per row: 0 clean, 1 speech mixed in, 2 noise mixed in
            # FLAC crops that were decoded from the stream's start, their frame not found
            # (pretrain.data.flac): logged, as a rising count would mean slower data workers.
            "decode_restarts": restarts,
            "padding_mask": torch.arange(pcm.shape[1])[None, :] >= lengths[:, None],
            "lengths": lengths,
            "offsets": torch.tensor([offset for offset, _ in crops], dtype=torch.long),
            "labels": {},
        }
        for ls in self.label_sets:
            hop = 16000 // ls.label_rate
            seqs = [item.labels[ls.name][offset // hop: offset // hop + num_frames(length, ls.label_rate)]
                    for item, (offset, length) in zip(items, crops)]
            out = torch.full((len(seqs), max(len(q) for q in seqs)), LABEL_PAD, dtype=torch.long)
            for i, q in enumerate(seqs):
                out[i, : len(q)] = torch.from_numpy(np.asarray(q, dtype=np.int64))
            batch["labels"][ls.name] = out
        return batch


# --------------------------------------------------------------------------- loader


def _describe_mixing(fingerprint: dict | None) -> str:
    if fingerprint is None:
        return "off"
    shown = {k: v for k, v in fingerprint.items() if k != "noise_shards"}
    if fingerprint["noise_shards"]:
        shown["noise_shards"] = f"{len(fingerprint['noise_shards'])} shards " \
            f"(sha256 {fingerprint['noise_shards'][0][2][:12]}...)"
    return json.dumps(shown)


def _ignore_preemption_signal(_worker: int) -> None:
    # SLURM signals every process of a task, data workers included (SIGUSR1 before a time
    # limit, SIGTERM on `scontrol requeue` or `scancel`); only the trainer acts on them
    # (checkpoint at the step boundary, then exit), and a worker killed by one would fail the
    # step before the checkpoint. Workers end with the trainer (torch's parent watchdog) or by
    # SLURM's SIGKILL after KillWait.

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _SlotDataset(IterableDataset):
    def __init__(self, loader: "ShardLoader", states: dict[int, SlotState], rotation: int, epoch: int | None):
        self.loader, self.states, self.rotation, self.epoch = loader, states, rotation, epoch

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        logical = (worker + self.rotation) % self.loader.workers_per_rank
        stream = self.loader.slot_stream(logical, self.epoch)
        for batch, state in stream.batches(self.states[logical]):
            yield logical, batch, state.to_dict()


class ShardLoader:
    """Batches of this rank's share of the shards; ``state_dict()`` resumes at any batch.

    In epoch mode (``infinite=false``) each ``iter()`` yields one epoch and the next ``iter()``
    the following epoch; in infinite mode one ``iter()`` never ends.
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.dir = Path(cfg.shards)
        manifest = read_manifest(self.dir)
        self.shards = manifest["shards"]
        self.workers_per_rank = max(1, cfg.num_workers)
        self.num_slots = world_size * self.workers_per_rank
        if len(self.shards) < self.num_slots:
            raise PretrainError(
                f"{self.dir} has {len(self.shards)} shards, fewer than the {self.num_slots} streams of "
                f"world_size {world_size} x num_workers {self.workers_per_rank}; build more, smaller "
                "shards (pretrain shards build --per-shard N) or use fewer workers")
        self.label_sets = [LabelSet(self.dir, name) for name in cfg.labels]
        self.mixer = Mixer(cfg.mixing, cfg.seed)
        self.fingerprint = [[s["name"], s["utterances"], s["sha256"]] for s in self.shards]
        self.epoch = 0
        self._reset_slots(0)

    def _reset_slots(self, epoch: int) -> None:
        # Counters carry over from epoch to epoch; positions start afresh.
        old = getattr(self, "slots", {})
        self.slots = {w: SlotState(pool_start=(epoch, 0, 0)) for w in range(self.workers_per_rank)}
        for w, state in old.items():
            self.slots[w].read_counts = _copy_counts(state.read_counts)
            self.slots[w].yield_counts = dict(state.yield_counts)
        self.last_slot = -1

    def slot_stream(self, logical: int, epoch: int | None) -> SlotStream:
        return SlotStream(self.cfg, self.dir, self.shards, self.num_slots,
                          self.rank * self.workers_per_rank + logical, self.label_sets, epoch, self.mixer)

    def __iter__(self) -> Iterator[dict]:
        epoch = None if self.cfg.infinite else self.epoch
        rotation = (self.last_slot + 1) % self.workers_per_rank
        dataset = _SlotDataset(self, dict(self.slots), rotation, epoch)
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the global
        # torch RNG at every iter(), which would shift the trainer's dropout stream on resume.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                            persistent_workers=False, prefetch_factor=4 if self.cfg.num_workers else None,
                            worker_init_fn=_ignore_preemption_signal,
                            generator=torch.Generator().manual_seed(self.cfg.seed))
        for logical, batch, state in loader:
            self.slots[logical] = SlotState.from_dict(state)
            if batch is None:  # a slot's end-of-stream state
                continue
            self.last_slot = logical
            yield batch
        if not self.cfg.infinite:
            self.epoch += 1
            self._reset_slots(self.epoch)

    def metrics(self) -> dict[str, int]:
        """Counters over this rank's slots: samples read/yielded, dropped short, errors skipped."""
        total: dict[str, int] = {}
        for state in self.slots.values():
            for counts in (state.read_counts, state.yield_counts):
                for k, v in counts.items():
                    if isinstance(v, int):
                        total[k] = total.get(k, 0) + v
        return total

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.cfg.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_workers": self.workers_per_rank,
            "infinite": self.cfg.infinite,
            "shards": self.fingerprint,
            "mixing": self.mixer.state_fingerprint(),
            "epoch": self.epoch,
            "last_slot": self.last_slot,
            "slots": {str(k): v.to_dict() for k, v in self.slots.items()},
        }

    def _check_saved(self, state: dict, names: tuple[str, ...]) -> None:
        """Refuse a saved state whose ``names`` fields or shards differ from this loader's."""
        mine = self.state_dict()
        for name in names:
            if state[name] != mine[name]:
                raise PretrainError(
                    f"cannot resume the data loader: it was saved with {name}={state[name]}, now "
                    f"{name}={mine[name]}; the data partition depends on seed, world_size and "
                    "num_workers, so resume with the saved values")
        if state["shards"] != self.fingerprint:
            raise PretrainError("cannot resume the data loader: the shards in "
                                f"{self.dir} differ from those it was saved with")
        if state["mixing"] != mine["mixing"]:
            raise PretrainError(f"cannot resume the data loader: it was saved with data.mixing "
                                f"{_describe_mixing(state['mixing'])}, now {_describe_mixing(mine['mixing'])}; "
                                "a resumed run must mix as the saved one did")

    def load_repartitioned(self, states: list[dict]) -> int:
        """Continue from the states of *all* ranks of a run with another ``world_size``.

        Every slot of this loader starts at the beginning of epoch ``E + 1``, where ``E`` is the
        furthest epoch any old slot had started; the counters restart. Returns that epoch.
        """
        if not states:
            raise ValueError("load_repartitioned needs the data states of the old ranks")
        for state in states:
            self._check_saved(state, ("seed", "num_workers", "infinite"))
        reached = max(max([int(s["epoch"])] + [int(v["pool_start"][0]) for v in s["slots"].values()])
                      for s in states)
        self.epoch = reached + 1
        self._reset_slots(self.epoch)
        log.warning("data: resuming %d old streams with %d new ones (world_size %d -> %d); the new "
                    "streams start epoch %d, the unread rest of epoch %d is skipped",
                    len(states) * self.workers_per_rank, self.num_slots, states[0]["world_size"],
                    self.world_size, self.epoch, reached)
        return self.epoch

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by a loader with the same partition; strict on keys."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"data loader state has keys {sorted(state)}, expected {sorted(expected)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"data loader state version {state['version']} is not {STATE_VERSION}")
        self._check_saved(state, ("seed", "world_size", "rank", "num_workers", "infinite"))
        if set(state["slots"]) != {str(w) for w in range(self.workers_per_rank)}:
            raise ValueError(f"data loader state has slots {sorted(state['slots'])}")
        self.epoch = int(state["epoch"])
        self.last_slot = int(state["last_slot"])
        self.slots = {int(k): SlotState.from_dict(v) for k, v in state["slots"].items()}
