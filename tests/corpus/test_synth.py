from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pretrain.config import load_config
from pretrain.config.core import ConfigError
from pretrain.config.corpus import CorpusSynthConfig
from pretrain.corpus import synth as synth_mod
from pretrain.corpus.engines import VOICES, RawUtterance, SynthesisError
from pretrain.phones import PHONE_ID, PHONES, SILENCE
from pretrain.corpus.synth import finalize, plan_utterance, synth_chunk, synthesize_corpus
from pretrain.frames import conv_num_frames, mfcc_num_frames
from pretrain.utils import PretrainError

pytestmark = pytest.mark.slow


def records(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus / "utterances.jsonl").read_text().splitlines()]


def corpus_cfg(out: Path, *overrides: str) -> CorpusSynthConfig:
    return load_config(CorpusSynthConfig, [], [f"out={out}", *overrides])


def test_tiny_corpus_has_every_voice_once(tiny_corpus):
    recs = records(tiny_corpus)
    assert [r["voice"] for r in recs] == list(VOICES)
    summary = json.loads((tiny_corpus / "corpus.json").read_text())
    assert summary["utterances"] == 11 and summary["failed"] == 0
    assert summary["phones"] == list(PHONES)
    assert (tiny_corpus / "failures.jsonl").read_text() == ""
    assert (tiny_corpus / "config.yaml").exists() and (tiny_corpus / "run.json").exists()


def test_alignments_are_sane(tiny_corpus):
    for rec in records(tiny_corpus):
        audio, sr = sf.read(tiny_corpus / rec["audio"], dtype="float32")
        align = json.loads((tiny_corpus / rec["align"]).read_text())
        n = len(audio)
        assert sr == 16000 and n == rec["num_samples"] == align["num_samples"]
        segs = align["segments"]
        # Contiguous from the first sample to the last, silence at both ends.
        assert segs[0][1] == 0 and segs[-1][2] == n
        assert all(a[2] == b[1] and a[1] < a[2] for a, b in zip(segs, segs[1:]))
        assert segs[0][0] == SILENCE and segs[-1][0] == SILENCE
        assert all(p in PHONE_ID for p, _, _ in segs)
        # Frame counts equal those of a 25/10 ms MFCC and of the HuBERT conv encoder.
        assert len(align["frame_labels"]["100"]) == mfcc_num_frames(n)
        assert len(align["frame_labels"]["50"]) == conv_num_frames(n)
        # The labels sit on the audio: the edge silences are far quieter than the speech.
        speech = np.concatenate([audio[s:e] for p, s, e in segs if p != SILENCE])
        edges = np.concatenate([audio[: segs[0][2]], audio[segs[-1][1]:]])
        ratio_db = 10 * np.log10(np.mean(speech**2) / np.mean(edges**2))
        assert ratio_db > 20, (rec["utt_id"], ratio_db)
        # 100 Hz frame labels agree with the segment under each frame centre.
        ids = np.array(align["frame_labels"]["100"])
        for p, s, e in segs:
            inside = [i for i in range(len(ids)) if s <= 160 * i + 200 < e]
            assert all(ids[i] == PHONE_ID[p] for i in inside)


def tree_digest(root: Path) -> dict[str, str]:
    skip = {"run.json", "config.yaml"}  # provenance: output path, time, jobs
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip
    }


def test_same_seed_gives_identical_files_whatever_the_job_count(tmp_path):
    args = ("count=24", "chunk_size=8", "max_clauses=1", "seed=7")
    synthesize_corpus(corpus_cfg(tmp_path / "a", *args, "jobs=1"), progress=False)
    synthesize_corpus(corpus_cfg(tmp_path / "b", *args, "jobs=2"), progress=False)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert len([k for k in a if k.endswith(".flac")]) == 24
    assert a == b


def test_seed_changes_the_corpus():
    cfg0 = load_config(CorpusSynthConfig, [], ["out=x", "count=5", "seed=0"])
    cfg1 = load_config(CorpusSynthConfig, [], ["out=x", "count=5", "seed=1"])
    assert [plan_utterance(cfg0, i).text for i in range(5)] != [plan_utterance(cfg1, i).text for i in range(5)]
    assert plan_utterance(cfg0, 3) == plan_utterance(cfg0, 3)


def test_stretch_slows_every_voice_and_leaves_the_default_corpus_as_it_was(tmp_path):
    """The protocol's speaking-rate axis: ``stretch`` scales each utterance's drawn duration
    factor; at 1.0 the plans are those of a config without it."""
    base = load_config(CorpusSynthConfig, [], ["out=x", "count=6", "seed=4"])
    slow = load_config(CorpusSynthConfig, [], ["out=x", "count=6", "seed=4", "stretch=1.3"])
    for i in range(6):
        a, b = plan_utterance(base, i), plan_utterance(slow, i)
        assert b.stretch == pytest.approx(1.3 * a.stretch) and (b.text, b.lead) == (a.text, a.lead)
    voices = ["festival-kal", "flite-awb", "espeak-m3"]  # one per engine
    args = ("count=3", "max_clauses=1", "seed=4", "jobs=2", f"voices=[{','.join(voices)}]")
    synthesize_corpus(corpus_cfg(tmp_path / "a", *args), progress=False)
    synthesize_corpus(corpus_cfg(tmp_path / "b", *args, "stretch=1.3"), progress=False)
    for a, b in zip(records(tmp_path / "a"), records(tmp_path / "b")):
        speech_a = a["duration"] - 0.6  # at most 0.3 s of added silence at each end
        assert b["duration"] > 1.15 * speech_a, (a["voice"], a["duration"], b["duration"])
    with pytest.raises(ConfigError, match="stretch"):
        load_config(CorpusSynthConfig, [], ["out=x", "count=1", "stretch=3"])


def test_hours_gives_the_shortest_prefix_reaching_the_target(tmp_path):
    target_s = 40.0
    out = tmp_path / "h"
    synthesize_corpus(corpus_cfg(out, f"hours={target_s / 3600}", "chunk_size=4", "jobs=2"), progress=True)
    recs = records(out)
    durations = [r["duration"] for r in recs]
    assert [r["index"] for r in recs] == list(range(len(recs)))
    assert sum(durations) >= target_s > sum(durations[:-1])
    assert len(list((out / "audio").rglob("*.flac"))) == len(recs)  # extra chunks removed


def test_existing_output_is_not_clobbered(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(PretrainError, match="not empty"):
        synthesize_corpus(corpus_cfg(out, "count=1"), progress=False)
    assert (out / "precious.txt").read_text() == "keep"
    synthesize_corpus(corpus_cfg(out, "count=2", "overwrite=true"), progress=False)
    assert len(records(out)) == 2


def test_failed_utterances_are_recorded_not_dropped(tmp_path, monkeypatch):
    # A festival voice that does not exist makes festival itself fail for that utterance.
    bad = VOICES["festival-kal"].__class__("festival-kal", "festival", "no_such_voice_diphone",
                                           ("festival",))
    monkeypatch.setitem(synth_mod.VOICES, "festival-kal", bad)
    cfg = corpus_cfg(tmp_path, "count=11", "max_clauses=1")
    recs = synth_chunk(cfg, list(range(4)))
    assert [r["ok"] for r in recs] == [False, True, True, True]
    assert "festival failed" in recs[0]["reason"] and recs[0]["utt_id"] == "festival-kal_0000000"
    written = {p.name for p in tmp_path.rglob("*.flac")}
    assert written == {f"{r['utt_id']}.flac" for r in recs[1:]}


def test_finalize_rejects_silent_audio_and_pads_with_silence():
    cfg = load_config(CorpusSynthConfig, [], ["out=x", "count=1"])
    plan = plan_utterance(cfg, 0)
    with pytest.raises(SynthesisError, match="silent"):
        finalize(RawUtterance(np.zeros(16000, np.float32), 16000, [("ah", 0.0, 1.0)]), plan, 1e-4)
    tone = (0.5 * np.sin(np.arange(8000) / 5.0)).astype(np.float32)
    # Labels that overrun the audio are clipped; labels that stop short are closed by silence.
    pcm, segs = finalize(RawUtterance(tone, 16000, [("ah", 0.0, 0.2), ("s", 0.2, 0.4)]), plan, 0.0)
    lead = round(plan.lead * 16000)
    assert segs == [(SILENCE, 0, lead), ("ah", lead, lead + 3200), ("s", lead + 3200, lead + 6400),
                    (SILENCE, lead + 6400, len(pcm))]
    assert len(pcm) == lead + 8000 + round(plan.trail * 16000)
    pcm, segs = finalize(RawUtterance(tone, 16000, [("ah", 0.0, 0.3), ("s", 0.3, 0.9)]), plan, 0.0)
    assert segs[-2] == ("s", lead + 4800, lead + 8000)
