"""Linear probes on frozen features, each with a learning-rate sweep selected on probe-dev:

- frame phone classifier: ``Linear(dim, phones)``, frame accuracy on probe-test;
- CTC phone recognizer: ``Linear(dim, phones + 1)`` (the last class is the blank), started
  from the frame classifier that probe-dev chose (its phone rows; the blank row zero) and
  trained with CTC at that classifier's learning rate (CTC is the costliest probe on a CPU, so
  it is not swept again), greedy
  decoding (argmax per frame, repeats merged, blanks dropped, then runs of silence merged into
  one), phone error rate = edit distance / reference length over probe-test, the reference being
  the utterance's phone sequence with runs of the same frame label merged;
- speaker identification: ``Linear(dim, speakers)`` on each utterance's mean frame, accuracy
  on probe-test.

Inputs are standardized with probe-train's mean and deviation. Each probe can instead take
several layers at once and learn SUPERB's weighted sum: ``softmax(w)``-weighted layers (each
standardized), ``w`` learned with the head; the learned weights are reported.

Adam, ``epochs`` passes over probe-train per learning rate, seeded initialization and order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Standardizer:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardizer":
        x = x.astype(np.float64)
        return cls(x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-5).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


class Head(nn.Module):
    """A linear layer over one representation, or over SUPERB's softmax-weighted sum of several
    (input (N, L, D))."""

    def __init__(self, dim: int, classes: int, num_layers: int = 1):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers)) if num_layers > 1 else None
        self.linear = nn.Linear(dim, classes)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return x
        return torch.einsum("l,...ld->...d", torch.softmax(self.weights, 0), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.mix(x))

    def layer_weights(self) -> list[float] | None:
        return None if self.weights is None else torch.softmax(self.weights.detach(), 0).tolist()


def _stack(layers: list[np.ndarray]) -> np.ndarray:
    return layers[0] if len(layers) == 1 else np.stack(layers, 1)


def _standardize(layers: list[np.ndarray], train_rows: np.ndarray) -> list[np.ndarray]:
    return [Standardizer.fit(x[train_rows])(x).astype(np.float32) for x in layers]


def _sweep(train_one, lrs: list[float], higher_is_better: bool):
    """Train at every learning rate; the (dev score, lr, head) with the best dev score and the
    dev score per learning rate."""
    results = []
    for lr in lrs:
        head, dev = train_one(lr)
        results.append((dev, lr, head))
    pick = max if higher_is_better else min
    return pick(results, key=lambda r: r[0]), {str(lr): dev for dev, lr, _ in results}


# --------------------------------------------------------------------------- frame phone probe


def frame_probe(layers: list[np.ndarray], phones: np.ndarray, split: np.ndarray, num_classes: int,
                lrs: list[float], epochs: int, batch: int, seed: int) -> dict:
    """``layers``: one or more (frames, dim) arrays; ``phones`` (frames,); ``split`` (frames,)
    of 0/1/2 for train/dev/test."""
    train_rows = np.flatnonzero(split == 0)
    standardizers = [Standardizer.fit(layer[train_rows]) for layer in layers]
    x = torch.from_numpy(_stack([st(layer).astype(np.float32) for st, layer in zip(standardizers, layers)]))
    y = torch.from_numpy(phones.astype(np.int64))
    dev_rows, test_rows = np.flatnonzero(split == 1), np.flatnonzero(split == 2)

    def accuracy(head, rows):
        with torch.no_grad():
            return float((head(x[rows]).argmax(-1) == y[rows]).float().mean())

    def train_one(lr):
        torch.manual_seed(seed)
        head = Head(x.shape[-1], num_classes, len(layers))
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        rows = torch.from_numpy(train_rows)
        for _ in range(epochs):
            for chunk in rows[torch.randperm(len(rows), generator=gen)].split(batch):
                loss = F.cross_entropy(head(x[chunk]), y[chunk])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return head, accuracy(head, dev_rows)

    (dev, lr, head), by_lr = _sweep(train_one, lrs, higher_is_better=True)

    def predict(frames: np.ndarray) -> np.ndarray:
        """Phone ids of new frames of the (single) probed representation."""
        with torch.no_grad():
            return head(torch.from_numpy(standardizers[0](frames).astype(np.float32))).argmax(-1).numpy()

    return {"phone_acc": 100 * accuracy(head, test_rows), "phone_acc_dev": 100 * dev, "phone_lr": lr,
            "phone_acc_dev_by_lr": {k: 100 * v for k, v in by_lr.items()}, "layer_weights": head.layer_weights(),
            "_head": head, "_predict": predict if len(layers) == 1 else None}


# --------------------------------------------------------------------------- CTC phone recognizer


def merge_runs(seq: list[int]) -> list[int]:
    """Runs of one label as one: the phone sequence of an utterance's frame labels."""
    return [s for i, s in enumerate(seq) if i == 0 or s != seq[i - 1]]


def merge_silence(seq: list[int], silence: int | None) -> list[int]:
    """Runs of silence as one silence (other repeats are real: CTC separates them by a blank)."""
    return [s for i, s in enumerate(seq) if not (i and s == silence and seq[i - 1] == silence)]


def greedy_decode(logits: torch.Tensor, blank: int, silence: int | None) -> list[int]:
    """Argmax per frame, repeats merged, blanks dropped, silence runs merged."""
    return merge_silence([p for p in merge_runs(logits.argmax(-1).tolist()) if p != blank], silence)


def edit_distance(a: list[int], b: list[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def ctc_probe(layers: list[np.ndarray], offsets: np.ndarray, phones: list[np.ndarray], split: list[str],
              num_classes: int, silence: int | None, lrs: list[float], epochs: int, batch: int, seed: int,
              init: Head | None = None) -> dict:
    """``phones``: per utterance, its 50 Hz frame labels; ``split`` per utterance. ``init``: a
    frame classifier the CTC head starts from (its phone rows copied, the blank row zero)."""
    utt_rows = lambda s: [i for i, sp in enumerate(split) if sp == s]  # noqa: E731
    train_u = utt_rows("train")
    train_frames = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in train_u])
    x = torch.from_numpy(_stack(_standardize(layers, train_frames)))
    targets = [merge_runs(p.tolist()) for p in phones]
    blank = num_classes
    per_batch = max(1, batch // 512)  # utterances per update (batch counts frames)

    def utt(i):
        return x[offsets[i]:offsets[i + 1]]

    def per(head, rows):
        errors = length = 0
        with torch.no_grad():
            for i in rows:
                hyp = greedy_decode(head(utt(i)), blank, silence)
                errors += edit_distance(hyp, targets[i])
                length += len(targets[i])
        return 100 * errors / max(length, 1)

    def train_one(lr):
        torch.manual_seed(seed)
        head = Head(x.shape[-1], num_classes + 1, len(layers))
        if init is not None:
            with torch.no_grad():
                head.linear.weight.zero_()
                head.linear.bias.zero_()
                head.linear.weight[:num_classes] = init.linear.weight
                head.linear.bias[:num_classes] = init.linear.bias
                if head.weights is not None:
                    head.weights.copy_(init.weights)
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = [train_u[j] for j in rng.permutation(len(train_u))]
            for start in range(0, len(order), per_batch):
                chunk = order[start:start + per_batch]
                feats = nn.utils.rnn.pad_sequence([utt(i) for i in chunk])  # (T, B, [L,] D)
                logp = F.log_softmax(head(feats), -1)
                tgt = torch.tensor([t for i in chunk for t in targets[i]])
                loss = F.ctc_loss(logp, tgt, torch.tensor([int(offsets[i + 1] - offsets[i]) for i in chunk]),
                                  torch.tensor([len(targets[i]) for i in chunk]), blank=blank,
                                  reduction="mean", zero_infinity=True)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return head, per(head, utt_rows("dev"))

    (dev, lr, head), by_lr = _sweep(train_one, lrs, higher_is_better=False)
    return {"per": per(head, utt_rows("test")), "per_dev": dev, "per_lr": lr, "per_dev_by_lr": by_lr,
            "ctc_layer_weights": head.layer_weights()}


# --------------------------------------------------------------------------- speaker identification


def pooled(layer: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.stack([layer[offsets[i]:offsets[i + 1]].mean(0) if offsets[i + 1] > offsets[i]
                     else np.zeros(layer.shape[1], np.float32) for i in range(len(offsets) - 1)])


def speaker_probe(layers: list[np.ndarray], offsets: np.ndarray, speakers: list[str], split: list[str],
                  lrs: list[float], epochs: int, seed: int) -> dict:
    names = sorted(set(speakers))
    y = torch.tensor([names.index(s) for s in speakers])
    rows = {s: np.array([i for i, sp in enumerate(split) if sp == s]) for s in ("train", "dev", "test")}
    means = [pooled(layer, offsets) for layer in layers]
    standardizers = [Standardizer.fit(m[rows["train"]]) for m in means]
    x = torch.from_numpy(_stack([st(m).astype(np.float32) for st, m in zip(standardizers, means)]))

    def accuracy(head, r):
        with torch.no_grad():
            return float((head(x[r]).argmax(-1) == y[r]).float().mean())

    def train_one(lr):
        torch.manual_seed(seed)
        head = Head(x.shape[-1], len(names), len(layers))
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        train = torch.from_numpy(rows["train"])
        for _ in range(epochs):  # full batch: a few hundred utterances at most per split
            loss = F.cross_entropy(head(x[train]), y[train])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return head, accuracy(head, rows["dev"])

    (dev, lr, head), by_lr = _sweep(train_one, lrs, higher_is_better=True)

    def predict(utterance_means: np.ndarray) -> np.ndarray:
        """Speaker names of new utterances, given their mean frames (single representation)."""
        with torch.no_grad():
            ids = head(torch.from_numpy(standardizers[0](utterance_means).astype(np.float32))).argmax(-1)
        return np.array([names[i] for i in ids.tolist()])

    return {"speaker_acc": 100 * accuracy(head, rows["test"]), "speaker_acc_dev": 100 * dev, "speaker_lr": lr,
            "speaker_acc_dev_by_lr": {k: 100 * v for k, v in by_lr.items()}, "speakers": len(names),
            "speaker_layer_weights": head.layer_weights(), "_predict": predict if len(layers) == 1 else None}
