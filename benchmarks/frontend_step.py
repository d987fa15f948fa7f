"""Training-step time with the conv waveform encoder against the Fbank front end, side by side.

The same Transformer (the ``model:`` section of a config, default ``configs/small_cpu.yaml``)
with ``frontend: conv`` and ``frontend: fbank``, the same batch, targets and span mask;
forward + backward in training mode, alternating between the two ``--repeats`` times. Prints
the medians, audio-seconds per second per process, and ``ratio_fbank_vs_conv`` (< 1: the Fbank
model is faster). Threads: ``--threads`` (a training process on this 2-core machine gets 1).

Usage: python benchmarks/frontend_step.py [--config configs/small_cpu.yaml] [--batch 8] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pretrain.config import load_config
from pretrain.config.model import ModelConfig
from pretrain.frames import conv_num_frames
from pretrain.model.hubert import HubertPretrain, LabelSpec
from pretrain.model.masking import compute_span_mask

REPO = Path(__file__).resolve().parents[1]


@dataclass
class _Section:
    model: ModelConfig = field(default_factory=ModelConfig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/small_cpu.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="audio per utterance")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # Only the model section matters here; the rest of a training config is ignored.
    import yaml

    section = {"model": yaml.safe_load(Path(args.config).read_text()).get("model", {})}
    tmp = Path("/tmp") / "frontend_step_model.yaml"
    tmp.write_text(yaml.safe_dump(section))
    models = {}
    for frontend in ("conv", "fbank"):
        cfg = load_config(_Section, [tmp], [f"model.frontend={frontend}", "model.encoder_layerdrop=0"]).model
        torch.manual_seed(0)
        models[frontend] = HubertPretrain(cfg, [LabelSpec("km", 100, 50)]).train()

    samples = int(args.seconds * 16000)
    frames = conv_num_frames(samples)
    audio = torch.randn(args.batch, samples) * 0.1
    lengths = torch.full((args.batch,), samples)
    targets = {"km": torch.randint(0, 100, (args.batch, frames))}
    cfg = models["conv"].cfg
    mask = compute_span_mask([frames] * args.batch, frames, cfg.mask_prob, cfg.mask_length, np.random.default_rng(0))

    def step(model) -> float:
        start = time.perf_counter()
        out = model(audio, lengths, targets, mask=mask)
        (out["loss_sum"] / out["sample_size"]).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for model in models.values():
        step(model)  # warm-up
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(step(model))
    audio_s = args.batch * args.seconds
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in median.items():
        params = sum(p.numel() for p in models[name].parameters())
        print(json.dumps({"bench": "frontend_step", "frontend": name, "params": params, "threads": args.threads,
                          "batch": args.batch, "seconds_per_utterance": args.seconds,
                          "step_s_median": round(t, 4), "audio_s_per_s": round(audio_s / t, 1)}))
    ratio = median["fbank"] / median["conv"]
    print(f"\n{args.batch} x {args.seconds:g} s, forward+backward, {args.threads} thread(s): conv "
          f"{median['conv']:.3f} s, fbank {median['fbank']:.3f} s, ratio {ratio:.3f} "
          f"(the conv encoder is {1 - median['fbank'] / median['conv']:.0%} of the conv model's step)")
    print(json.dumps({"bench": "frontend_step", "ratio_fbank_vs_conv": round(ratio, 4)}))


if __name__ == "__main__":
    main()
