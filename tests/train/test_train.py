"""Real DeepSpeed training on CPU: 2 processes over gloo, the tiny model, the gold phone
labels of the synthetic corpus."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
REPO = Path(__file__).resolve().parents[2]
LAUNCH = Path(sys.executable).parent / "launch"


def launch(run_dir: Path, shards: Path, *overrides: str, nproc: int = 2, fault: dict | None = None,
           check: bool = True, gpu: bool = False, configs: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
    env.pop("PRETRAIN_FAULT", None)
    if fault:
        env["PRETRAIN_FAULT"] = json.dumps(fault)
    cmd = [str(LAUNCH), "local", "--nproc", str(nproc), "pretrain", "train",
           "--config", str(REPO / "configs/model/tiny.yaml"), "--config", str(REPO / "configs/train/tiny_cpu.yaml"),
           *[a for c in configs for a in ("--config", str(REPO / c))], "--run-dir", str(run_dir), f"data.shards={shards}", "log.every=1", "optim.max_steps=16",
           "checkpoint.every=4", "data.max_tokens=40000", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]  # a resumed run appends: later wins
    return out


def test_resume_with_another_process_count(small_shards, tmp_path):
    # A 2-process run's step_8, continued by 1 process: ZeRO 1's partitioned optimizer state
    # goes through DeepSpeed's universal format, the data through the loader's repartition policy.
    # (Its own 12-step reference rather than the long tests' 16-step `uninterrupted`: CI time.)
    two = tmp_path / "two"
    launch(two, small_shards, "deepspeed.grad_accum=2", "optim.max_steps=12")
    run = tmp_path / "one"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints/step_8", run / "checkpoints/step_8")
    proc = launch(run, small_shards, "deepspeed.grad_accum=2", "optim.max_steps=12", nproc=1)
    assert "converting it to DeepSpeed's universal format" in proc.stderr
    assert "world_size 2 -> 1" in proc.stderr
    # The loaded state equals the saved one: weights from model.pt, Adam's moments summed
    # over the two ranks' ZeRO partitions, read straight from DeepSpeed's files.
    import torch

    loaded = json.loads(re.search(r"resumed from step 8: (\{.*\})", proc.stderr).group(1))
    saved = run / "checkpoints/step_8"
    weights = torch.load(saved / "model.pt", weights_only=True)["state_dict"]
    m = v = 0.0
    for part in sorted((saved / "ds").glob("zero_pp_rank_*_optim_states.pt")):
        for st in torch.load(part, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"].values():
            m += float(st["exp_avg"].double().abs().sum())
            v += float(st["exp_avg_sq"].double().sum())
    assert len(list((saved / "ds").glob("zero_pp_rank_*"))) == 2
    w = sum(float(t.double().abs().sum()) for t in weights.values() if t.is_floating_point())
    assert loaded == pytest.approx({"weights_abs_sum": w, "adam_m_abs_sum": m, "adam_v_sum": v}, rel=1e-9)
    straight, resumed = losses(two), losses(run)
    assert sorted(resumed) == [9, 10, 11, 12]
    # Other batches (the partition changed), the same weights and optimizer state: the losses
    # stay at the trained level, far below where training started.
    for step, loss in resumed.items():
        assert abs(loss - straight[step]) < 0.1 * straight[step], (step, loss, straight[step])
    assert (run / "checkpoints/step_12/manifest.json").is_file()


def complete_checkpoints(run: Path) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in folder.glob("step_*")
                  if p.name[5:].isdigit() and (p / "manifest.json").is_file())


@pytest.mark.long
def test_kill_and_a_crash_at_every_save_phase_never_load_a_partial_checkpoint(uninterrupted, small_shards,
                                                                             tmp_path):
    run = tmp_path / "crashes"
    common = ("deepspeed.grad_accum=2", "optim.max_steps=8", "checkpoint.every=2")
    # kill -9 of rank 1 between a forward and its backward, in the 6th step.
    proc = launch(run, small_shards, *common, fault={"kill_at": 5, "rank": 1}, check=False)
    assert proc.returncode != 0 and "test fault: killing this rank mid-step" in proc.stderr
    assert complete_checkpoints(run) == [2, 4]
    # Then a process dies inside the save of step_6, at three kinds of moment in turn: with
    # rank files half written (the same state as before any write: a .tmp folder without a
    # manifest), with the manifest written but the folder not renamed, and after the rename
    # but before `latest`. Every relaunch resumes from step_4 and redoes steps 5-6 until a
    # save completes. (The other two SAVE_PHASES leave states these three already cover; they
    # were dropped to keep CI under 20 minutes.)
    for phase, rank in [("mid_write", 1), ("before_rename", 0), ("before_latest", 0)]:
        proc = launch(run, small_shards, *common, check=False,
                      fault={"crash_save": {"step": 6, "phase": phase, "rank": rank}})
        assert proc.returncode != 0, phase
        assert f"killing rank {rank} at save phase {phase} of step 6" in proc.stderr
        assert "resumed from step 4" in proc.stderr, phase
        if phase != "mid_write":
            assert "removing the unfinished checkpoint" in proc.stderr, phase  # the previous crash's
        if phase == "before_latest":  # renamed, so complete: `latest` is only a convenience
            assert complete_checkpoints(run) == [2, 4, 6]  # died before pruning too
            assert (run / "checkpoints/latest").read_text().strip() == "step_4"
        else:
            assert complete_checkpoints(run) == [2, 4], phase
            assert (run / "checkpoints/step_6.tmp").is_dir(), phase
    proc = launch(run, small_shards, *common)
    assert "resumed from step 6" in proc.stderr
    # Bit for bit through step 7; the 8th loss follows the 7th update, whose learning rate
    # already depends on max_steps (8 here, 16 in the reference run) through the decay.
    assert {k: v for k, v in losses(run).items() if k <= 7} == \
        {k: v for k, v in losses(uninterrupted).items() if k <= 7}
    assert sorted(losses(run)) == list(range(1, 9))
    assert complete_checkpoints(run) == [6, 8]


@pytest.mark.long
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(uninterrupted, small_shards, tmp_path):
    # With ZeRO 2 (the reference run uses ZeRO 1).
    run = tmp_path / "fallback"
    launch(run, small_shards, "deepspeed.grad_accum=2", "checkpoint.keep_last=3", "deepspeed.zero_stage=2",
           fault={"exit_after_save": 12})
    victim = next((run / "checkpoints/step_12/ds").glob("*model_states.pt"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (run / "checkpoints/step_16.tmp").mkdir()  # an unfinished save left behind
    proc = launch(run, small_shards, "deepspeed.grad_accum=2", "checkpoint.keep_last=3", "deepspeed.zero_stage=2")
    assert f"checkpoint step_12 is damaged ({victim} does not match its sha256); quarantined as " in proc.stderr
    assert (run / "checkpoints/step_12.bad").is_dir()  # kept for inspection, never loaded or pruned
    assert "removing the unfinished checkpoint" in proc.stderr
    assert "resumed from step 8" in proc.stderr
    # The same trajectory as the ZeRO 1 reference up to rounding: ZeRO 2 reduces each
    # micro-batch's gradients over the ranks before summing the two micro-batches, ZeRO 1
    # sums them first, so the sums differ in the last bits (measured: about 1e-7 relative).
    straight, resumed = losses(uninterrupted), losses(run)
    assert sorted(resumed) == sorted(straight) == list(range(1, 17))
    assert resumed == pytest.approx(straight, rel=1e-5)


@pytest.mark.parametrize("zero_stage", [0, pytest.param(3, marks=pytest.mark.long)])
def test_non_finite_loss_or_gradient_changes_no_parameter(small_shards, tmp_path, zero_stage):
    # ZeRO 0 in fp32 runs torch's AdamW, where the gradient check is ours; ZeRO 3 is DeepSpeed's
    # own partitioned optimizer (and its parameters must be gathered to write model.pt).
    run = tmp_path / "nan"
    proc = launch(run, small_shards, "optim.max_steps=5", "optim.warmup_steps=1", "checkpoint.every=1",
                  "checkpoint.keep_last=10", f"deepspeed.zero_stage={zero_stage}",
                  fault={"nan_at": 2, "nan_rank": 1, "nan_grad_at": 3, "rank": 0})
    assert "step 3: non-finite loss on some rank" in proc.stderr
    assert "step 4: non-finite gradient on some rank" in proc.stderr
    import torch

    def weights(step):
        return torch.load(run / f"checkpoints/step_{step}/model.pt", weights_only=True)["state_dict"]

    w = {step: weights(step) for step in (2, 3, 4, 5)}
    assert all(v.numel() > 0 for v in w[2].values())  # whole tensors, also under ZeRO 3
    assert all(torch.equal(w[2][k], w[3][k]) for k in w[2])  # the NaN-loss step changed nothing
    assert all(torch.equal(w[3][k], w[4][k]) for k in w[3])  # nor did the NaN-gradient step
    assert any(not torch.equal(w[4][k], w[5][k]) for k in w[4])  # the next one trains
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 2
    # Label usage: the gold phone labels use many of the 40 classes.
    assert 5 < records[-1]["usage_ppl_target/phones100"] <= 40


def test_too_many_bad_steps_stop_with_a_clear_message(small_shards, tmp_path):
    proc = launch(tmp_path / "bad", small_shards, "optim.max_steps=4", "optim.warmup_steps=1", "max_bad_steps=1",
                  fault={"nan_at": 1, "nan_rank": 0}, check=False)
    assert proc.returncode != 0
    assert "consecutive steps with a non-finite loss" in proc.stderr


def test_gradients_do_not_depend_on_how_the_batch_is_split(tmp_path):
    # 1 rank with 4 utterances vs 2 ranks with 2 each: equal gradients, because the loss is a
    # sum over frames divided by the masked-frame count of all ranks.
    import torch

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    grads = {}
    for nproc in (1, 2):
        out = tmp_path / f"grads{nproc}.pt"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                               "--master_port", str(free_port()), str(REPO / "tests/train/grad_child.py"),
                               str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-4000:]
        grads[nproc] = torch.load(out, weights_only=True)
    assert grads[1].keys() == grads[2].keys()
    worst = max((grads[1][k] - grads[2][k]).abs().max().item() for k in grads[1])
    assert worst < 1e-6, worst
    assert max(g.abs().max().item() for g in grads[1].values()) > 1e-3  # not trivially zero


@pytest.mark.long
def test_wavlm_with_utterance_and_noise_mixing_trains_and_exports(small_shards, noise_shards, tmp_path):
    import numpy as np
    import torch
    import transformers

    run = tmp_path / "wavlm"
    launch(run, small_shards, "optim.max_steps=8", "optim.lr=0.002", f"data.mixing.noise_shards={noise_shards}",
           "data.mixing.prob=0.5", f"valid_shards={small_shards}", "valid_every=8", "valid_batches=2",
           configs=("configs/model/wavlm_tiny.yaml", "configs/train/wavlm_mixing.yaml"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in train)
    assert np.mean([r["loss"] for r in train[-3:]]) < np.mean([r["loss"] for r in train[:3]])
    mixed = sum(r["mixed_speech_frac"] + r["mixed_noise_frac"] for r in train) / len(train)
    assert 0.2 < mixed < 0.8, mixed  # prob 0.5, of a few hundred utterances
    assert any(r["mixed_noise_frac"] > 0 for r in train) and any(r["mixed_speech_frac"] > 0 for r in train)
    assert any("valid_loss" in r for r in records)
    # The trained model exports to transformers' WavLMModel with the same hidden states.
    from pretrain.model.checkpoint import load_model
    from pretrain.model.export import export_hf

    export_hf(run / "checkpoints/step_8", tmp_path / "hf")
    hf = transformers.WavLMModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(run / "checkpoints/step_8").eval()
    assert ours.cfg.arch == "wavlm"
    wave = torch.randn(1, 24000) * 0.1
    with torch.no_grad():
        mine, _ = ours.backbone.hidden_states(wave, torch.tensor([24000]))
        theirs = hf(wave).last_hidden_state
    assert (mine - theirs).abs().max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_training_with_loss_scaling_and_zero2(small_shards, tmp_path, precision):
    run = tmp_path / precision
    launch(run, small_shards, "optim.max_steps=6", f"deepspeed.precision={precision}", "deepspeed.zero_stage=2",
           nproc=1, gpu=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["loss"] < records[0]["loss"] * 1.5
    if precision == "fp16":
        assert "loss_scale" in records[-1]


def test_checkpoints_are_probed_in_the_background_and_logged_at_their_step(small_shards, tmp_path):
    """probe.every=1: each saved checkpoint gets a background `pretrain probe`; its results land
    in run_dir/probes/step_N and in metrics.jsonl / TensorBoard at step N."""
    run = tmp_path / "run"
    launch(run, small_shards, "model.frontend=fbank", "optim.max_steps=4", "optim.warmup_steps=1", "checkpoint.every=2",
           "probe.every=1",
           f"probe.eval_shards={small_shards}",
           "probe.overrides=[probes=phone,baselines=none,layers=2,phone.epochs=4,phone.ctc_epochs=1]")
    for step in (2, 4):
        record = json.loads((run / f"probes/step_{step}/probe.json").read_text())
        assert record["step"] == step and "phone_acc" in record["rows"]["model"]["layers"]["2"]
        assert (run / f"probes/step_{step}/.logged").exists()
        assert not (run / f"probes/step_{step}/model.pt").exists()  # the hard link is dropped once logged
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probed = {r["probe_step"]: r for r in rows if "probe_step" in r}
    assert sorted(probed) == [2, 4] and probed[4]["probe/model/2/phone_acc"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("probe/best/phone_acc")] == [2, 4]


def test_wav2vec2_trains_and_a_killed_run_resumes_bitwise(small_shards, tmp_path):
    """wav2vec 2.0 (model.objective) through the same trainer: 2 ranks, grad_accum 2, no labels.
    Rank 1 is killed mid-step 5; the relaunch resumes from step 4 and every later loss, the
    contrastive and diversity losses and the code perplexities equal the uninterrupted run's bit for bit: the
    distractors and the Gumbel noise are drawn from (seed, step, rank), the temperature follows
    the step, and the quantizer's weights are in the checkpoint."""
    import numpy as np

    w2v = ("data.labels=[]", "model.objective=wav2vec2", "model.wav2vec2.num_vars=32",
           "model.wav2vec2.codevector_dim=32", "model.wav2vec2.num_negatives=20", "model.wav2vec2.temp_decay=0.9",
           "model.mask_prob=0.65", "deepspeed.grad_accum=2", "optim.max_steps=6")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    launch(straight, small_shards, *w2v)
    proc = launch(killed, small_shards, *w2v, fault={"kill_at": 5, "rank": 1}, check=False)
    assert proc.returncode != 0 and "test fault: killing this rank mid-step" in proc.stderr
    proc = launch(killed, small_shards, *w2v)
    assert "resumed from step 4" in proc.stderr
    assert sorted(losses(straight)) == list(range(1, 7))
    assert losses(killed) == losses(straight)
    rows = {json.loads(line)["step"]: json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()}
    again = {json.loads(line)["step"]: json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()}
    keys = ("contrastive_loss", "diversity_loss", "acc_contrastive", "code_ppl/g0", "prob_ppl/g1", "temperature")
    for step in range(5, 7):
        assert {k: again[step][k] for k in keys} == {k: rows[step][k] for k in keys}, step
    # The temperature anneals by 0.9 per update from 2, and is logged for the window's last update.
    assert [round(rows[s]["temperature"], 6) for s in range(1, 7)] == [round(max(2 * 0.9 ** (s - 1), 0.5), 6)
                                                                        for s in range(1, 7)]
    assert all(np.isfinite(r["loss"]) and 1 <= r["code_ppl/g0"] <= 32 for r in rows.values())
    assert not any(k.startswith("acc_masked") for r in rows.values() for k in r)
    # The checkpoint keeps the collapse guard's count beside the weights.
    import torch

    payload = torch.load(straight / "checkpoints/step_6/model.pt", weights_only=True)
    assert payload["objective_state"] == {"low_windows": 0} and "quantizer.codevectors" in payload["state_dict"]


def test_data2vec_trains_and_resumes_bitwise_with_its_teacher(small_shards, tmp_path):
    """data2vec (model.objective) through the same trainer: 2 ranks under ZeRO 2, no labels, an
    EMA teacher that a restart restores (a teacher rebuilt from the student would change every
    later loss)."""
    # ZeRO 2: the optimizer state and gradients are partitioned; the teacher, outside
    # DeepSpeed, reads the student's full parameters on every rank.
    d2v = ("data.labels=[]", "model.data2vec.top_k_layers=2", "optim.max_steps=6", "checkpoint.every=3",
           "model.data2vec.ema_anneal_steps=4", "deepspeed.zero_stage=2")
    configs = ("configs/model/data2vec.yaml",)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(straight, small_shards, *d2v, configs=configs)
    # A new process from the saved step 3 (a copy: one launch fewer than a crash and a restart,
    # which the HuBERT tests exercise; the teacher's restore is the same either way).
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints/step_3", resumed / "checkpoints/step_3")
    proc = launch(resumed, small_shards, *d2v, configs=configs)
    assert "resumed from step 3" in proc.stderr
    assert sorted(losses(straight)) == list(range(1, 7))
    assert losses(resumed) == {step: loss for step, loss in losses(straight).items() if step > 3}
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    # The spread of targets and predictions is logged (the collapse guard reads it), and the
    # teacher's decay follows its schedule: 0.999 rising to 0.9999 over 4 updates.
    assert all(r["target_var"] > 0 and r["pred_var"] > 0 for r in logged)
    assert [round(r["ema_decay"], 7) for r in logged] == [0.999225, 0.99945, 0.999675, 0.9999, 0.9999, 0.9999]
    assert not any(k.startswith("acc_") for r in logged for k in r)
    # data2vec's architecture (configs/model/data2vec.yaml) exports as a Data2VecAudioModel with
    # the same hidden states at every layer, padded batch and attention mask included.
    import torch
    import transformers

    from pretrain.cli import main
    from pretrain.model.checkpoint import load_model

    assert main(["export", "hf", str(straight / "checkpoints/step_6"), str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf/README.md").read_text()
    assert "# data2vec pretrained with pretrain" in card and "6 optimizer steps" in card
    ours = load_model(straight / "checkpoints/step_6").eval()
    assert ours.cfg.conv_pos_depth == 5 and ours.cfg.extractor_mode == "layer_norm"
    hf = transformers.Data2VecAudioModel.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(tmp_path / "hf")
    torch.manual_seed(0)
    speech = [torch.randn(24000).numpy() * 0.1, torch.randn(17000).numpy() * 0.3]
    inputs = processor(speech, sampling_rate=16000, padding=True, return_tensors="pt")
    lengths = torch.tensor([24000, 17000])
    with torch.no_grad():
        theirs = hf(inputs.input_values, attention_mask=inputs.attention_mask, output_hidden_states=True)
        audio = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(s) for s in speech], batch_first=True)
        for layer in range(1, ours.cfg.encoder_layers + 1):
            mine, padding = ours.backbone.hidden_states(audio, lengths, layer=layer)
            valid = ~padding
            assert (mine - theirs.hidden_states[layer])[valid].abs().max() < 1e-4
