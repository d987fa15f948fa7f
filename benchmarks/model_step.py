"""Forward + backward time of our HuBERT against transformers.HubertModel, side by side.

Both networks get the same configuration (``configs/model/<size>.yaml``), the same weights
(ours are copied into transformers'), the same batch and the same span mask. transformers has
no HuBERT pretraining head, so it gets the equivalent one here: ``final_proj``, label
embeddings, cosine logits over the temperature and cross-entropy on the masked frames (without
the feature penalty, which only makes its side cheaper). Both run in training mode (dropout
on, LayerDrop off so that every step does the same work). Timings alternate between the two, ``--repeats`` times, and the medians are compared.

On CPU this prints seconds per step and ``ratio_vs_hf`` (ours / theirs; < 1 means faster).
With ``--device cuda`` it also reports audio-seconds per second in bf16 autocast.

Usage: python benchmarks/model_step.py [--size base] [--batch 2] [--seconds 4] [--repeats 7]
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
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.config.model import ModelConfig
from pretrain.frames import conv_num_frames
from pretrain.model.export import hf_config
from pretrain.model.hubert import HubertPretrain, LabelSpec
from pretrain.model.masking import compute_span_mask

REPO = Path(__file__).resolve().parents[1]
CLASSES = 500


@dataclass
class _Section:
    model: ModelConfig = field(default_factory=ModelConfig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per utterance")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from transformers import HubertModel

    device = torch.device(args.device)
    # LayerDrop off: it skips random layers, so two steps would not do the same work.
    cfg = load_config(_Section, [REPO / f"configs/model/{args.size}.yaml"], ["model.encoder_layerdrop=0"]).model
    torch.manual_seed(0)
    ours = HubertPretrain(cfg, [LabelSpec("km", CLASSES, 50)]).to(device).train()
    theirs = HubertModel(hf_config(cfg)).to(device).train()
    theirs.load_state_dict(ours.backbone.state_dict())
    head = torch.nn.Linear(cfg.encoder_embed_dim, cfg.final_dim).to(device)
    head.load_state_dict(ours.final_proj.state_dict())
    label_embs = torch.nn.Parameter(ours.label_embs[0].detach().clone())

    samples = int(args.seconds * 16000)
    frames = conv_num_frames(samples)
    audio = torch.randn(args.batch, samples, device=device) * 0.1
    lengths = torch.full((args.batch,), samples, device=device)
    targets = torch.randint(0, CLASSES, (args.batch, frames), device=device)
    mask = compute_span_mask([frames] * args.batch, frames, cfg.mask_prob, cfg.mask_length,
                             np.random.default_rng(0)).to(device)

    def step_ours():
        out = ours(audio, lengths, {"km": targets}, mask=mask)
        (out["loss_sum"] / out["sample_size"]).backward()

    def step_theirs():
        hidden = theirs(audio, mask_time_indices=mask).last_hidden_state
        proj = head(hidden[mask])
        logits = F.normalize(proj.float(), dim=-1) @ F.normalize(label_embs.float(), dim=-1).T / cfg.logit_temp
        F.cross_entropy(logits, targets[mask]).backward()

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in (step_ours, step_theirs):  # warm-up: allocator, kernels, lazy init
        timed(fn)
    times = {"ours": [], "transformers": []}
    for _ in range(args.repeats):
        times["ours"].append(timed(step_ours))
        times["transformers"].append(timed(step_theirs))
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    audio_s = args.batch * args.seconds
    for name, t in median.items():
        print(json.dumps({"bench": "model_step", "impl": name, "size": args.size, "device": args.device,
                          "batch": args.batch, "seconds_per_utterance": args.seconds,
                          "step_s_median": round(t, 4), "min": round(min(times[name]), 4),
                          "max": round(max(times[name]), 4), "audio_s_per_s": round(audio_s / t, 1)}))
    ratio = median["ours"] / median["transformers"]
    print(f"\n{args.size} forward+backward, {args.batch} x {args.seconds:.0f} s on {args.device}: "
          f"ours {median['ours']:.3f} s, transformers {median['transformers']:.3f} s, ratio {ratio:.3f}")
    print(json.dumps({"bench": "model_step", "ratio_vs_hf": round(ratio, 4), "target_ratio": 1.0,
                      "ours_audio_s_per_s": round(audio_s / median["ours"], 1), "device": args.device,
                      "precision": "bf16-autocast" if device.type == "cuda" else "fp32"}))


if __name__ == "__main__":
    main()
