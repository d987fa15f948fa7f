"""Shared fixtures: the synthetic corpora and shards, the local SLURM cluster, and marker handling."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


CORPORA = {
    "tiny": ([REPO / "configs/corpus/tiny.yaml"], []),  # 11 utterances, one per voice
    "small": ([], ["count=40", "max_clauses=2", "seed=3"]),  # 40 of 1-2 clauses, about 2.5 minutes
    # The demo corpus's first 320 utterances (every voice, 1-3 clauses): FLAC's property test.
    "demo320": ([], ["count=320", "seed=0"]),
}


def synthesize_test_corpus(name: str, out: Path) -> Path:
    from pretrain.config import load_config
    from pretrain.config.corpus import CorpusSynthConfig
    from pretrain.corpus.synth import synthesize_corpus

    files, overrides = CORPORA[name]
    cfg = load_config(CorpusSynthConfig, files, [*overrides, f"out={out}", "jobs=2"])
    synthesize_corpus(cfg, progress=False, argv=["test"])
    return out


def _corpus(name: str, tmp_path_factory) -> Path:
    # A GPU machine without TTS engines gets the same corpora synthesized elsewhere
    # (benchmarks/gpu_prepare.sh); a copy, since tests may write beside them.
    carried = os.environ.get("PRETRAIN_TEST_CORPORA")
    if carried and (Path(carried) / name / "corpus.json").is_file():
        out = tmp_path_factory.mktemp(f"{name}_corpus") / "corpus"
        shutil.copytree(Path(carried) / name, out)
        return out
    return synthesize_test_corpus(name, tmp_path_factory.mktemp(f"{name}_corpus"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """configs/corpus/tiny.yaml synthesized once per test session: 11 utterances, 11 voices."""
    return _corpus("tiny", tmp_path_factory)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """40 utterances of 1-2 clauses from all voices (about 2.5 minutes)."""
    return _corpus("small", tmp_path_factory)


@pytest.fixture(scope="session")
def small_shards(small_corpus, tmp_path_factory) -> Path:
    """small_corpus in 10 shards of 4 utterances, with the gold phones50/phones100 label sets."""
    from pretrain.config import load_config
    from pretrain.config.shards import ShardsBuildConfig
    from pretrain.data.shards import build_shards

    out = tmp_path_factory.mktemp("small_shards")
    cfg = load_config(ShardsBuildConfig, [], [f"input={small_corpus}", f"out={out}", "per_shard=4", "jobs=2"])
    build_shards(cfg, progress=False, argv=["test"])
    return out


@pytest.fixture(scope="session")
def noise_shards(small_corpus, tmp_path_factory) -> Path:
    """About 1.5 minutes of synthetic noise of every kind (babble cut from small_corpus), in
    shards of 4 clips."""
    from pretrain.config import load_config
    from pretrain.config.corpus import NoiseSynthConfig
    from pretrain.config.shards import ShardsBuildConfig
    from pretrain.corpus.noise import synthesize_noise
    from pretrain.data.shards import build_shards

    noise = tmp_path_factory.mktemp("noise")
    synthesize_noise(load_config(NoiseSynthConfig, [], [f"out={noise}", "hours=0.025", f"speech={small_corpus}"]),
                     progress=False, argv=["test"])
    out = tmp_path_factory.mktemp("noise_shards")
    build_shards(load_config(ShardsBuildConfig, [], [f"input={noise}", f"out={out}", "per_shard=4", "jobs=2"]),
                 progress=False, argv=["test"])
    return out


# Real recorded speech: Debian's Asterisk voice prompts (CC-BY-SA), 16-bit mono at 8 kHz, one
# voice per folder; Allison speaks both English and Spanish, so 6 folders hold 5 speakers.
RECORDED_SPEECH = Path(os.environ.get("PRETRAIN_RECORDED_SPEECH", "/usr/share/asterisk/sounds"))
RECORDED_VOICES = ("en_US_f_Allison", "es_MX_f_Allison", "fr_CA_f_June", "it_IT_m_Carlo", "ru_RU_f_IvrvoiceRU",
                   "it_IT_f_Menardi")
# The speaker is the voice's name: the folder name less its language and sex.
RECORDED_SPEAKER_FROM = r"regex ^[a-z]{2}_[A-Z]{2}_[fm]_(?P<speaker>[^/]+)/"


@pytest.fixture(scope="session")
def recorded_speech(tmp_path_factory) -> Path:
    """A folder corpus of 20 recorded prompts (2-6 s, spread over the alphabet) of each voice
    in RECORDED_VOICES (links to the installed files). Skips where the packages are missing,
    except under CI."""
    import soundfile as sf

    missing = [v for v in RECORDED_VOICES if not (RECORDED_SPEECH / v).is_dir()]
    if missing:
        reason = (f"needs the recorded voice prompts {', '.join(missing)} in {RECORDED_SPEECH} (Debian's "
                  "asterisk-core-sounds-{en,es,fr,it,ru}-wav and asterisk-prompt-it-menardi-wav; "
                  "scripts/setup.sh installs them)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("recorded")
    for voice in RECORDED_VOICES:
        files = [f for f in sorted((RECORDED_SPEECH / voice).glob("*.wav")) if 2.0 <= sf.info(f).duration <= 6.0]
        (root / voice).mkdir()
        for f in files[:: max(1, len(files) // 20)][:20]:
            (root / voice / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="session")
def recorded_shards(recorded_speech, tmp_path_factory) -> Path:
    """recorded_speech in shards of 10 (speakers from the folder names, resampled to 16 kHz) with
    the label set ``km32``: MFCC k-means (k=32) fitted on the shards themselves."""
    from pretrain.cluster.assign import assign_labels
    from pretrain.cluster.kmeans import fit
    from pretrain.config import load_config
    from pretrain.config.cluster import FeaturesMfccConfig, KmeansAssignConfig, KmeansFitConfig
    from pretrain.config.shards import ShardsBuildConfig
    from pretrain.data.shards import build_shards
    from pretrain.features.extract import FeatureSpec
    from pretrain.features.sample import dump_features

    out = tmp_path_factory.mktemp("recorded_shards")
    work = tmp_path_factory.mktemp("recorded_km")
    build_shards(load_config(ShardsBuildConfig, [], [f"input={recorded_speech}", f"out={out}", "per_shard=10",
                                                     "jobs=2", f"speaker_from={RECORDED_SPEAKER_FROM}"]),
                 progress=False, argv=["test"])
    dump_features(load_config(FeaturesMfccConfig, [], [f"shards={out}", f"out={work / 'f'}", "fraction=1.0"]),
                  FeatureSpec.mfcc(), progress=False)
    fit(load_config(KmeansFitConfig, [], [f"features={work / 'f'}", f"out={work / 'km'}", "k=32", "niter=10"]))
    assign_labels(load_config(KmeansAssignConfig, [], [f"kmeans={work / 'km'}", f"shards={out}", "name=km32"]),
                  progress=False)
    return out


@pytest.fixture(scope="session")
def uninterrupted(small_shards, tmp_path_factory) -> Path:
    """The reference training run of the resume tests (local 2-process DeepSpeed, 16 steps,
    grad_accum 2); the SLURM preemption test compares its losses with it too."""
    from tests.train.test_train import launch

    run = tmp_path_factory.mktemp("train") / "straight"
    launch(run, small_shards, "deepspeed.grad_accum=2")
    return run


CLUSTER = REPO / "slurm/local-cluster.sh"


@pytest.fixture(scope="session")
def slurm_env() -> dict:
    """The local two-node SLURM cluster (slurm/local-cluster.sh), up for the session: the
    environment its commands need. Skips without root and the SLURM packages, except under CI."""
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the SLURM tests: slurmctld is missing or not root (scripts/setup.sh "
                        "installs SLURM)")
        pytest.skip("needs root and Debian's slurmctld slurmd slurm-client munge")
    directory = os.environ.get("PRETRAIN_SLURM_DIR", "/tmp/pretrain-slurm")
    was_up = subprocess.run([str(CLUSTER), "status", directory], capture_output=True).returncode == 0
    proc = subprocess.run([str(CLUSTER), "up", directory], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = {**os.environ, "SLURM_CONF": f"{directory}/slurm.conf", "WANDB_MODE": "offline"}
    env.pop("PRETRAIN_FAULT", None)
    yield env
    if not was_up:
        subprocess.run([str(CLUSTER), "down", directory], capture_output=True, timeout=120)


def librispeech_layout(corpus: Path, root: Path, subset: str, first_speaker: int) -> Path:
    """A synthetic corpus laid out as LibriSpeech is: ``SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac``
    with a ``SPEAKER-CHAPTER.trans.txt`` per chapter (one voice = one speaker, chapter 1), and
    ``root/alignments.json``: each utterance's key (its path below ``root``, no suffix) -> the
    synthetic corpus's phone alignment file (what a forced aligner would find)."""
    import json

    alignments = {}
    records = [json.loads(line) for line in (corpus / "utterances.jsonl").read_text().splitlines()]
    speakers = {v: first_speaker + i for i, v in enumerate(sorted({r["voice"] for r in records}))}
    lines: dict[Path, list[str]] = {}
    counts: dict[str, int] = {}
    for r in records:
        spk = speakers[r["voice"]]
        n = counts[r["voice"]] = counts.get(r["voice"], -1) + 1
        folder = root / subset / str(spk) / "1"
        folder.mkdir(parents=True, exist_ok=True)
        utt = f"{spk}-1-{n:04d}"
        shutil.copy(corpus / r["audio"], folder / f"{utt}.flac")
        alignments[f"{subset}/{spk}/1/{utt}"] = str(corpus / r["align"])
        lines.setdefault(folder / f"{spk}-1.trans.txt", []).append(f"{utt} {r['text'].upper()}")
    for path, text in lines.items():
        path.write_text("\n".join(text) + "\n")
    (root / "alignments.json").write_text(json.dumps(alignments))
    return root / subset


@pytest.fixture(scope="session")
def librispeech_tree(small_corpus, tmp_path_factory) -> Path:
    """``ROOT/train-960/train-clean-100/...`` and ``ROOT/dev-clean/...``, LibriSpeech-shaped,
    from the small synthetic corpus (the same audio under other speaker ids in each)."""
    root = tmp_path_factory.mktemp("LibriSpeech")
    # Speakers 1011-1021: docs/your_data.md's split (valid_fraction=0.1, split_seed 0) holds out
    # two of them (1017 and 1020); with 11 speakers, most other id ranges hold out none.
    librispeech_layout(small_corpus, root / "train-960", "train-clean-100", 1011)
    librispeech_layout(small_corpus, root, "dev-clean", 2000)
    return root
