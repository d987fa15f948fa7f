"""The trainer's pure parts: label-usage perplexity and the resume compatibility check."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from pretrain.config import load_config
from pretrain.config.train import TrainConfig
from pretrain.model.hubert import LabelSpec
from pretrain.train.checkpoint import check_resumable, config_hash
from pretrain.train.loop import usage_perplexity
from pretrain.utils import PretrainError
from tests.model.test_model import REPO


def test_usage_perplexity_counts_the_classes_in_effective_use():
    ppl = usage_perplexity({"pred/km": np.array([5, 5, 5, 5, 0, 0]), "target/km": np.array([9, 0, 0, 0]),
                            "pred/empty": np.zeros(3)})
    assert ppl["usage_ppl_pred/km"] == pytest.approx(4.0)  # four equally used classes
    assert ppl["usage_ppl_target/km"] == pytest.approx(1.0)  # a collapse onto one class
    assert "usage_ppl_pred/empty" not in ppl  # nothing counted: no value rather than a fake one


def cfg(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, [REPO / "configs/model/tiny.yaml"],
                       ["run_dir=unused", "data.shards=unused", "data.labels=[km]", *overrides])


def manifest_of(c: TrainConfig, specs) -> dict:
    return {"config_hash": config_hash(c), "model": asdict(c.model),
            "labels": [[s.name, s.num_classes, s.rate] for s in specs]}


def test_resume_refuses_changed_model_fields_by_name_and_allows_safe_ones():
    specs = [LabelSpec("km", 100, 50)]
    saved = manifest_of(cfg(), specs)
    check_resumable(saved, cfg("optim.lr=0.1", "optim.max_steps=7", "optim.warmup_steps=2", "log.every=3"), specs, 8)
    # How a step is computed may change too (a resume on GPUs that want compilation, say).
    check_resumable(saved, cfg("model.compile=true", "model.checkpoint_activations=true"), specs, 8)
    with pytest.raises(PretrainError, match=r"model.encoder_layers: 2 -> 3") as err:
        check_resumable(saved, cfg("model.encoder_layers=3"), specs, 8)
    assert "step_8" in str(err.value)
    with pytest.raises(PretrainError, match=r"data.labels .*\[\['km', 100, 50\]\] -> \[\['km', 500, 50\]\]"):
        check_resumable(saved, cfg(), [LabelSpec("km", 500, 50)], 8)


def test_init_from_copies_the_backbone_and_starts_the_label_heads_fresh(tmp_path):
    import torch

    from pretrain.model.checkpoint import save_model
    from pretrain.model.hubert import HubertPretrain
    from pretrain.train.loop import init_backbone

    torch.manual_seed(0)
    old = HubertPretrain(cfg().model, [LabelSpec("it1_km100", 100, 100)])
    save_model(tmp_path / "model.pt", old)
    torch.manual_seed(1)
    new = HubertPretrain(cfg().model, [LabelSpec("it2_km500", 500, 50)])
    fresh_proj = new.final_proj.weight.detach().clone()
    assert init_backbone(new, str(tmp_path)) == str(tmp_path / "model.pt")  # a folder holding model.pt
    for (name, a), b in zip(old.backbone.state_dict().items(), new.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    # The heads belong to the new label set: untouched by the copy.
    assert torch.equal(new.final_proj.weight, fresh_proj) and new.label_embs[0].shape == (500, 32)

    wider = HubertPretrain(cfg("model.encoder_embed_dim=96").model, [LabelSpec("km", 10, 50)])
    with pytest.raises(PretrainError, match=r"does not fit this model config.*model.encoder_embed_dim: 64 "
                                            r"\(init_from\) vs 96"):
        init_backbone(wider, str(tmp_path / "model.pt"))
    with pytest.raises(PretrainError, match="no model file"):
        init_backbone(new, str(tmp_path / "missing"))


def test_data2vec_collapse_stops_training_with_the_reason():
    import numpy as np

    from pretrain.train.objectives import MOMENTS, objective_for

    c = cfg("model.objective=data2vec", "data.labels=[]", "model.data2vec.top_k_layers=2",
            "model.data2vec.collapse_check_after=100")
    objective = objective_for(c)
    dim, n = c.model.encoder_embed_dim, 1000
    rng = np.random.default_rng(0)

    def moments(scale):
        x = rng.normal(size=(n, dim)) * scale
        return np.stack([x.sum(0), (x ** 2).sum(0)]).ravel()

    alive = {f"{MOMENTS}target": moments(1.0), f"{MOMENTS}pred": moments(1.0)}
    dead = {f"{MOMENTS}target": moments(0.01), f"{MOMENTS}pred": moments(1.0)}
    metrics = objective.metrics(50, dead, n)  # before collapse_check_after: logged, not judged
    assert metrics["target_var"] == pytest.approx(0.01, rel=0.1) and metrics["pred_var"] == pytest.approx(1, rel=0.1)
    objective.metrics(100, alive, n)
    with pytest.raises(PretrainError, match=r"step 100: the data2vec target spread fell to 0\.01.*min_target_var=0\.1"
                                            r".*collapsing"):
        objective.metrics(100, dead, n)
