"""What a pretraining objective adds to the training loop, behind one interface, so the loop
(``pretrain.train.loop``) reads the same for every objective and knows none by name.

The model itself (``pretrain.model``) computes each objective's loss; an objective here holds
what lives beside the model: per-step extras for its forward (data2vec's EMA teacher), the
update after each optimizer step, the sums it adds to the logged metrics, and what its
checkpoints keep beside the weights. A new objective is a subclass registered in
``OBJECTIVES`` under its ``model.objective`` name; the loop needs no change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pretrain.config.train import TrainConfig
from pretrain.model.checkpoint import load_objective_state, load_teacher_state
from pretrain.model.data2vec import EmaTeacher, ema_decay, spread
from pretrain.model.wav2vec2 import gumbel_temperature, perplexity
from pretrain.utils import PretrainError


class Objective:
    """Masked prediction of cluster labels (HuBERT, WavLM): nothing beside the model."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def prepare(self, model: torch.nn.Module, resume_from: Path | None) -> None:
        """After the model is built (and before it is compiled or wrapped): the objective's own
        state, restored from the checkpoint folder ``resume_from`` when resuming."""

    def to(self, device: torch.device) -> None:
        """Move that state to the engine's device."""

    def forward_extras(self, step: int, rank: int) -> dict:
        """Keyword arguments of every forward of optimizer step ``step`` (counted from 0) on
        ``rank``: a function of the two and the objective's state, so that a resumed run passes
        exactly what the uninterrupted one would have."""
        return {}

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """After optimizer step ``step`` (counted from 1), applied or skipped."""

    def sums(self, outs: list[dict]) -> dict[str, np.ndarray]:
        """Arrays of this step's micro-batch outputs, summed over steps and ranks into the
        logging window like the label histograms (keys must not clash with ``pred/``,
        ``target/``)."""
        return {}

    def metrics(self, step: int, sums: dict[str, np.ndarray], num_masked: float) -> dict:
        """Logged metrics from a window's global sums (may stop training with the reason)."""
        return {}

    def model_file_extras(self) -> dict:
        """Keyword arguments of ``save_model`` for a checkpoint: what resuming needs beside
        the weights."""
        return {}


MOMENTS = "moments/"
"""Prefix of the data2vec per-channel sums among the summed arrays."""


class Data2VecObjective(Objective):
    """data2vec: regression onto an EMA teacher's averaged top layers. The teacher starts as
    the student (identical on every rank, and so is every update after), follows it after
    every step, whether applied or skipped (the decay schedule follows the step count, so a
    resumed run continues it exactly), and is saved with each checkpoint."""

    def prepare(self, model: torch.nn.Module, resume_from: Path | None) -> None:
        self.teacher = EmaTeacher(model)
        if resume_from is not None:
            self.teacher.load_state_dict(load_teacher_state(resume_from), strict=True)

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)

    def forward_extras(self, step: int, rank: int) -> dict:
        return {"teacher": self.teacher}

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        self.teacher.update(model, ema_decay(self.cfg.model, step))

    def sums(self, outs: list[dict]) -> dict[str, np.ndarray]:
        return {f"{MOMENTS}{kind}": sum(o[f"{kind}_moments"].numpy().ravel() for o in outs)
                for kind in ("target", "pred")}

    def metrics(self, step: int, sums: dict[str, np.ndarray], num_masked: float) -> dict:
        """The spread of targets and predictions over the window's masked frames (all ranks),
        and the collapse guard: stopping with the reason beats training a dead representation."""
        d, dim = self.cfg.model.data2vec, self.cfg.model.encoder_embed_dim
        target = spread(torch.from_numpy(sums[f"{MOMENTS}target"].reshape(2, dim)), num_masked)
        pred = spread(torch.from_numpy(sums[f"{MOMENTS}pred"].reshape(2, dim)), num_masked)
        if step >= d.collapse_check_after:
            for name, value, floor in (("target", target, d.min_target_var), ("prediction", pred, d.min_pred_var)):
                if value < floor:
                    raise PretrainError(
                        f"step {step}: the data2vec {name} spread fell to {value:.4g}, below "
                        f"model.data2vec.min_{'target' if name == 'target' else 'pred'}_var={floor}: the "
                        "representation is collapsing (the loss can keep falling while it does). Resume from an "
                        "earlier checkpoint with a lower learning rate or a slower teacher (ema_decay), or lower "
                        "the floor if this spread is expected.")
        return {"target_var": target, "pred_var": pred, "ema_decay": ema_decay(self.cfg.model, step)}

    def model_file_extras(self) -> dict:
        return {"teacher": self.teacher.state_dict()}


W2V = "wav2vec2/"
"""Prefix of the wav2vec 2.0 sums among the summed arrays."""


class Wav2Vec2Objective(Objective):
    """wav2vec 2.0: the model draws its distractors and Gumbel noise from a generator seeded
    by (run seed, step, rank), and its temperature follows the step; both are handed to every
    forward, so a resumed run draws and anneals exactly as the uninterrupted one. Its one
    state is the collapse guard's count of low-perplexity log windows."""

    def prepare(self, model: torch.nn.Module, resume_from: Path | None) -> None:
        self.low_windows = 0
        if resume_from is not None:
            self.load_state_dict(load_objective_state(resume_from))

    def state_dict(self) -> dict:
        return {"low_windows": self.low_windows}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"low_windows"}:
            raise PretrainError(f"wav2vec 2.0 objective state has keys {sorted(state)}, expected ['low_windows']")
        self.low_windows = int(state["low_windows"])

    def forward_extras(self, step: int, rank: int) -> dict:
        seed = np.random.SeedSequence([self.cfg.seed, step, rank, 0x57A2]).generate_state(1, np.uint64)[0]
        return {"generator": torch.Generator().manual_seed(int(seed)),
                "temperature": gumbel_temperature(self.cfg.model, step)}

    def sums(self, outs: list[dict]) -> dict[str, np.ndarray]:
        scalars = np.array([sum(float(o[k]) for o in outs) for k in ("contrastive_sum", "diversity_sum", "correct")])
        return {f"{W2V}scalars": scalars,
                f"{W2V}soft": sum(o["code_soft"].numpy().ravel() for o in outs),
                f"{W2V}hard": sum(o["code_hard"].numpy().ravel() for o in outs)}

    def metrics(self, step: int, sums: dict[str, np.ndarray], num_masked: float) -> dict:
        """The two losses, the accuracy, the codebooks' perplexities (of the softmax and of the
        hard codes, per group, over the window's masked frames on every rank), the temperature;
        and the collapse guard."""
        w = self.cfg.model.wav2vec2
        contrastive, diversity, correct = sums[f"{W2V}scalars"]
        n = max(num_masked, 1.0)
        out = {"contrastive_loss": contrastive / n, "diversity_loss": diversity / n, "acc_contrastive": correct / n,
               "temperature": gumbel_temperature(self.cfg.model, step - 1)}  # the last update's
        soft = torch.from_numpy(sums[f"{W2V}soft"].reshape(w.num_groups, w.num_vars))
        hard = torch.from_numpy(sums[f"{W2V}hard"].reshape(w.num_groups, w.num_vars))
        soft_ppl = perplexity(soft / soft.sum(-1, keepdim=True).clamp(min=1e-12))
        hard_ppl = perplexity(hard / hard.sum(-1, keepdim=True).clamp(min=1e-12))
        for g in range(w.num_groups):
            out[f"prob_ppl/g{g}"] = float(soft_ppl[g])
            out[f"code_ppl/g{g}"] = float(hard_ppl[g])
        if step >= w.collapse_check_after and num_masked > 0:
            low = float(hard_ppl.min()) < w.min_code_perplexity
            self.low_windows = self.low_windows + 1 if low else 0
            if self.low_windows >= w.collapse_windows:
                raise PretrainError(
                    f"step {step}: a wav2vec 2.0 codebook's perplexity stayed below model.wav2vec2."
                    f"min_code_perplexity={w.min_code_perplexity} for {self.low_windows} log windows (per group: "
                    f"{', '.join(f'{v:.3g}' for v in hard_ppl.tolist())} of {w.num_vars} entries): the quantizer "
                    "has collapsed onto a few codes and the contrastive task is trivial. Resume from an earlier "
                    "checkpoint with a higher diversity_weight or a lower learning rate, or lower the floor if "
                    "this is expected.")
        return out

    def model_file_extras(self) -> dict:
        return {"objective_state": self.state_dict()}


OBJECTIVES: dict[str, type[Objective]] = {"hubert": Objective, "data2vec": Data2VecObjective,
                                          "wav2vec2": Wav2Vec2Objective}
"""``model.objective`` -> its objective."""


def objective_for(cfg: TrainConfig) -> Objective:
    return OBJECTIVES[cfg.model.objective](cfg)
