from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pretrain.config import load_config
from pretrain.config.model import ModelConfig
from pretrain.frames import conv_num_frames
from pretrain.model.hubert import HubertPretrain, LabelSpec, frame_padding_mask
from pretrain.model.masking import compute_span_mask

REPO = Path(__file__).resolve().parents[2]


@dataclass
class _Section:
    model: ModelConfig = field(default_factory=ModelConfig)


def model_config(size: str, *overrides: str) -> ModelConfig:
    """configs/model/<size>.yaml as the training config will read it (under ``model:``)."""
    return load_config(_Section, [REPO / f"configs/model/{size}.yaml"], list(overrides)).model


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size, published", [("base", 95e6), ("large", 317e6)])
def test_parameter_counts_match_the_paper(size, published):
    with torch.device("meta"):  # shapes only: no memory, no initialization time
        model = HubertPretrain(model_config(size), [LabelSpec("km", 500, 50)])
    assert abs(count(model) - published) / published < 0.01


@pytest.mark.parametrize("size", ["tiny", "base", "large"])
def test_shapes_and_layers(size):
    cfg = model_config(size)
    model = HubertPretrain(cfg, [LabelSpec("km", 100, 50)]).eval()
    if size != "tiny":
        return  # building them is the check; running them is slow on CPU
    audio = torch.randn(2, 16000)
    lengths = torch.tensor([16000, 12000])
    hidden, padding = model.backbone.hidden_states(audio, lengths)
    assert hidden.shape == (2, conv_num_frames(16000), cfg.encoder_embed_dim)
    assert padding[1].sum() == conv_num_frames(16000) - conv_num_frames(12000)
    for layer in range(1, cfg.encoder_layers + 1):
        h, _ = model.backbone.hidden_states(audio, lengths, layer=layer)
        assert h.shape == hidden.shape


@pytest.mark.parametrize("n", [400, 401, 719, 720, 16000, 48123])
def test_encoder_frames_follow_the_formula(n):
    model = HubertPretrain(model_config("tiny"), [LabelSpec("km", 10, 50)]).eval()
    assert model.backbone.features(torch.zeros(1, n)).shape[1] == conv_num_frames(n)


def test_mask_statistics_match_the_recipe():
    rng = np.random.default_rng(0)
    valid = [500] * 200 + [137] * 200
    mask = compute_span_mask(valid, 500, 0.8, 10, rng)
    long_fraction = mask[:200].float().mean().item()
    # 8 % of frames start a 10-frame span: 1 - 0.92^10 = 0.566 masked, less overlap effects.
    assert 0.54 < long_fraction < 0.60
    assert not mask[200:, 137:].any()  # nothing in padding
    assert 0.45 < mask[200:, :137].float().mean().item() < 0.65
    again = compute_span_mask(valid, 500, 0.8, 10, np.random.default_rng(0))
    assert torch.equal(mask, again)
    short = compute_span_mask([25], 30, 0.8, 10, np.random.default_rng(1))
    assert short[0, :25].sum() >= 10 and not short[0, 25:].any()  # min_spans still applies


def test_forward_reports_counts_and_respects_padding():
    model = HubertPretrain(model_config("tiny"), [LabelSpec("km", 20, 50)])
    audio, lengths = torch.randn(2, 32000), torch.tensor([32000, 19000])
    targets = {"km": torch.randint(0, 20, (2, conv_num_frames(32000)))}
    out = model(audio, lengths, targets, rng=np.random.default_rng(3))
    valid = conv_num_frames(32000) + conv_num_frames(19000)
    assert out["num_masked"] + out["num_unmasked"] == valid
    assert out["sample_size"] == out["num_masked"] > 0
    out["loss_sum"].backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="pass mask= or rng="):
        model(audio, lengths, targets)
    with pytest.raises(ValueError, match="targets outside"):
        model(audio, lengths, {"km": torch.full_like(targets["km"], 25)}, rng=np.random.default_rng(3))


def test_100hz_labels_are_read_at_the_frame_centres():
    # A 100 Hz label set whose frame 2i equals the 50 Hz label i must give the same loss.
    torch.manual_seed(0)
    cfg = model_config("tiny", "model.dropout=0", "model.dropout_input=0", "model.attention_dropout=0")
    m50 = HubertPretrain(cfg, [LabelSpec("km", 20, 50)]).eval()
    m100 = HubertPretrain(cfg, [LabelSpec("km", 20, 100)]).eval()
    m100.load_state_dict(m50.state_dict())
    audio, lengths = torch.randn(1, 24000), torch.tensor([24000])
    t50 = torch.randint(0, 20, (1, conv_num_frames(24000)))
    t100 = torch.full((1, 1 + (24000 - 400) // 160), 19)  # odd frames: a label that must be ignored
    t100[:, ::2] = t50[:, : t100[:, ::2].shape[1]]
    mask = torch.rand(1, conv_num_frames(24000)) < 0.5
    a = m50(audio, lengths, {"km": t50}, mask=mask)
    b = m100(audio, lengths, {"km": t100}, mask=mask)
    assert torch.allclose(a["loss_sum"], b["loss_sum"]) and a["num_masked"] == b["num_masked"]


def test_loss_is_a_sum_over_utterances():
    # The normalization contract: with no padding effects and the mean-based feature penalty
    # off, the loss of a batch is the sum of its utterances' losses.
    torch.manual_seed(1)
    cfg = model_config("tiny", "model.feature_pen_weight=0", "model.extractor_mode=layer_norm")
    model = HubertPretrain(cfg, [LabelSpec("km", 20, 50)]).eval()
    audio = torch.randn(2, 16000)
    lengths = torch.tensor([16000, 16000])
    targets = torch.randint(0, 20, (2, conv_num_frames(16000)))
    mask = compute_span_mask([49, 49], 49, 0.8, 10, np.random.default_rng(0))
    both = model(audio, lengths, {"km": targets}, mask=mask)
    parts = [model(audio[i:i + 1], lengths[i:i + 1], {"km": targets[i:i + 1]}, mask=mask[i:i + 1])
             for i in range(2)]
    assert torch.allclose(both["loss_sum"], parts[0]["loss_sum"] + parts[1]["loss_sum"], rtol=1e-4)
    assert both["sample_size"] == parts[0]["sample_size"] + parts[1]["sample_size"]


def test_same_seed_same_model_same_loss():
    def run():
        torch.manual_seed(7)
        model = HubertPretrain(model_config("tiny"), [LabelSpec("km", 20, 50)])
        out = model(torch.ones(1, 16000) * 0.1, torch.tensor([16000]),
                    {"km": torch.zeros(1, 49, dtype=torch.long)}, rng=np.random.default_rng(5))
        return out["loss_sum"].item(), [p.detach().clone() for p in model.parameters()]

    (loss_a, params_a), (loss_b, params_b) = run(), run()
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def _loss_and_grads(*overrides: str, compile_layers: bool = False):
    torch.manual_seed(7)
    model = HubertPretrain(model_config("tiny", *overrides), [LabelSpec("km", 20, 50)])
    if compile_layers:
        from pretrain.train.loop import compile_layers as compile_them

        compile_them(model)
    torch.manual_seed(8)  # the dropout masks: the same draws in both models
    audio, lengths = torch.randn(2, 24000) * 0.1, torch.tensor([24000, 17000])
    out = model(audio, lengths, {"km": torch.randint(0, 20, (2, conv_num_frames(24000)))},
                rng=np.random.default_rng(5))
    out["loss_sum"].backward()
    return out["loss_sum"].detach(), {n: p.grad for n, p in model.named_parameters()}


def test_activation_checkpointing_changes_no_gradient():
    # Dropout is on (the tiny config's 0.1): the recomputed forward must replay its masks.
    loss, grads = _loss_and_grads()
    loss_ckpt, grads_ckpt = _loss_and_grads("model.checkpoint_activations=true")
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and all(torch.equal(grads[n], grads_ckpt[n]) for n in grads)


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("c++") is None and __import__("shutil").which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_layers_keep_parameter_names_and_gradients():
    # Inductor fuses and reorders arithmetic, so equal up to float rounding, not bit for bit.
    loss, grads = _loss_and_grads("model.dropout=0", "model.attention_dropout=0")
    loss_c, grads_c = _loss_and_grads("model.dropout=0", "model.attention_dropout=0", compile_layers=True)
    assert grads.keys() == grads_c.keys()  # checkpoints of compiled and eager runs are interchangeable
    assert torch.allclose(loss, loss_c, rtol=1e-4)
    for name in grads:
        assert torch.allclose(grads[name], grads_c[name], rtol=1e-3, atol=1e-5), name


def test_frame_padding_mask():
    mask = frame_padding_mask(torch.tensor([16000, 8000]), conv_num_frames(16000))
    assert mask[0].sum() == 0 and mask[1].sum() == conv_num_frames(16000) - conv_num_frames(8000)


@pytest.mark.slow
def test_tiny_model_overfits_one_batch_of_speech(tiny_corpus):
    torch.manual_seed(0)
    records = [json.loads(line) for line in (tiny_corpus / "utterances.jsonl").read_text().splitlines()]
    audios, labels = [], []
    for rec in records[:2]:
        audio, _ = sf.read(tiny_corpus / rec["audio"], dtype="float32")
        align = json.loads((tiny_corpus / rec["align"]).read_text())
        audios.append(torch.from_numpy(audio[:24000]))
        labels.append(torch.tensor(align["frame_labels"]["50"][: conv_num_frames(24000)]))
    audio, targets = torch.stack(audios), torch.stack(labels)
    lengths = torch.full((2,), 24000)
    cfg = model_config("tiny", "model.dropout=0", "model.dropout_input=0", "model.attention_dropout=0",
                       "model.feature_grad_mult=1.0")
    model = HubertPretrain(cfg, [LabelSpec("phones", 40, 50)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    mask = compute_span_mask([conv_num_frames(24000)] * 2, conv_num_frames(24000), 0.8, 10,
                             np.random.default_rng(0))
    accuracy = 0.0
    for step in range(300):
        out = model(audio, lengths, {"phones": targets}, mask=mask)
        optimizer.zero_grad()
        (out["loss_sum"] / out["sample_size"]).backward()
        optimizer.step()
        accuracy = out["correct_masked/phones"] / out["num_masked"]
        if accuracy > 0.95:
            break
    assert accuracy > 0.9, f"masked accuracy {accuracy:.3f} after {step + 1} steps"


@pytest.mark.gpu
def test_bf16_autocast_on_gpu_matches_fp32():
    torch.manual_seed(0)
    model = HubertPretrain(model_config("tiny"), [LabelSpec("km", 20, 50)]).cuda().eval()
    audio, lengths = torch.randn(2, 32000, device="cuda") * 0.1, torch.tensor([32000, 24000], device="cuda")
    with torch.no_grad():
        full, _ = model.backbone.hidden_states(audio, lengths)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half, _ = model.backbone.hidden_states(audio, lengths)
    assert torch.isfinite(half).all()
    assert (half.float() - full).abs().mean() < 0.05 * full.abs().mean()


def test_a_model_file_in_a_checkpoint_folder_is_checked_against_its_manifest(tmp_path, capsys):
    """Whichever way the model is named (the folder, or its model.pt), a byte changed since the
    checkpoint was written is refused before anything reads the weights."""
    import json
    import shutil
    from pathlib import Path

    from pretrain.utils import sha256_file
    from pretrain.model.checkpoint import load_model, resolve_model_file
    from pretrain.stages import execute
    from pretrain.utils import PretrainError

    step = tmp_path / "checkpoints/step_8"
    step.mkdir(parents=True)
    shutil.copyfile(Path(__file__).resolve().parents[1] / "assets/small_cpu_step3000.pt", step / "model.pt")
    (step / "manifest.json").write_text(json.dumps({"files": {"model.pt": sha256_file(step / "model.pt")}}))
    assert resolve_model_file(step) == resolve_model_file(step / "model.pt") == step / "model.pt"
    load_model(step)
    data = bytearray((step / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (step / "model.pt").write_bytes(bytes(data))
    for named in (step, step / "model.pt"):
        with pytest.raises(PretrainError, match=r"model.pt does not match the sha256 in .*manifest.json: the model "
                                                r"file is damaged"):
            load_model(named)
    assert execute(["export", "hf", str(step / "model.pt"), str(tmp_path / "hf")]) == 1
    assert "the model file is damaged" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    # A model file outside a checkpoint folder has no manifest to answer to.
    shutil.copyfile(step / "model.pt", tmp_path / "loose.pt")
    assert resolve_model_file(tmp_path / "loose.pt") == tmp_path / "loose.pt"
