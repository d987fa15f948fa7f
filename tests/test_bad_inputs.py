"""Bad inputs through the real ``pretrain`` command line, as a new user makes them: each ends
in one error that names the file, the key or the config field (no traceback, exit status not
0), and every input and every file that was there before is byte for byte as it was. The
table holds the cases of the issue "Nothing lost, nothing silently wrong"; each command's own
tests say more about its errors."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from pretrain.cli import main
from pretrain.phones import PHONES
from pretrain.data.labels import LabelSet
from pretrain.data.shards import read_manifest
from pretrain.utils import sha256_file

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "tests/assets/small_cpu_step3000.pt"


@pytest.fixture(scope="module")
def house(small_shards, tmp_path_factory) -> Path:
    """What a user has before the mistake: shards with their gold label sets, a checkpoint
    folder, a transformers model, a training run's folder, an iterate run."""
    from safetensors.torch import load_file, save_file

    from pretrain.config import load_config, write_run_record
    from pretrain.config.iterate import IterateConfig
    from pretrain.model.export import hf_config
    from tests.model.test_model import model_config

    root = tmp_path_factory.mktemp("house")
    shutil.copytree(small_shards, root / "shards")
    step = root / "run/checkpoints/step_8"
    step.mkdir(parents=True)
    shutil.copyfile(ASSET, step / "model.pt")
    (step / "manifest.json").write_text(json.dumps({"files": {"model.pt": sha256_file(step / "model.pt")}}))
    shutil.copytree(step, root / "damaged/checkpoints/step_8")
    flipped = bytearray((root / "damaged/checkpoints/step_8/model.pt").read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    (root / "damaged/checkpoints/step_8/model.pt").write_bytes(bytes(flipped))

    cfg = model_config("tiny", "model.extractor_mode=layer_norm", "model.layer_norm_first=true")
    good = root / "hf"
    transformers.HubertModel(hf_config(cfg)).save_pretrained(good)
    config = json.loads((good / "config.json").read_text())
    weights = load_file(good / "model.safetensors")

    def hf_variant(name: str, change: Callable[[Path], None]) -> None:
        shutil.copytree(good, root / name)
        change(root / name)

    hf_variant("hf_no_layer1", lambda f: save_file({k: v for k, v in weights.items()
                                                     if not k.startswith("encoder.layers.1.")},
                                                    f / "model.safetensors", metadata={"format": "pt"}))
    hf_variant("hf_truncated", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:5000]))
    hf_variant("hf_fields", lambda f: (f / "config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if k not in ("hidden_size", "num_hidden_layers")})))
    hf_variant("hf_json", lambda f: (f / "config.json").write_text("{not json"))
    hf_variant("hf_noweights", lambda f: (f / "model.safetensors").unlink())

    # Someone's files where a command will write.
    (root / "mine").mkdir()
    (root / "mine/config.yaml").write_text("my: own\n")
    (root / "mine/run.json").write_text('{"mine": true}\n')
    (root / "mine/train.tsv").write_text("my tsv\n")
    (root / "mine/config.json").write_text('{"my": "model"}\n')
    (root / "mine/model.pt").write_bytes(b"my model")
    (root / "full").mkdir()
    (root / "full/notes.txt").write_text("keep me\n")

    # fairseq sources that are no checkpoint, and one whose unpickling would run code.
    (root / "fs_empty.pt").write_bytes(b"")
    (root / "fs_random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "fs_bare.pt").write_bytes(pickle.dumps({"cfg": {"model": {"encoder_layers": 2}}}))
    (root / "fs_payload.pt").write_bytes(pickle.dumps(_Payload(str(root / "PWNED"))))

    # Text files: the fairseq pair of the gold labels, frame alignments, phone maps.
    assert main(["labels", "export", "--shards", str(root / "shards"), "--name", "phones100", "--out",
                 str(root / "fs"), "--no-progress"]) == 0
    keys = [k for s in read_manifest(root / "shards")["shards"] for k in LabelSet(root / "shards", "phones100")
            .load_shard(s["name"])]
    gold = {k: v for s in read_manifest(root / "shards")["shards"]
            for k, v in LabelSet(root / "shards", "phones100").load_shard(s["name"]).items()}
    (root / "frames.txt").write_text("".join(f"{k} {' '.join(PHONES[i] for i in gold[k])}\n" for k in keys))
    (root / "frames_twice.txt").write_text((root / "frames.txt").read_text() + f"{keys[3]} sil sil\n")
    (root / "frames_foreign.txt").write_text((root / "frames.txt").read_text() + "another/corpus_0001 sil sil\n")
    (root / "frames_bytes.txt").write_bytes(b"utt sil \xff\xfe sil\n")
    (root / "map.txt").write_text("".join(f"{p} {p}\n" for p in PHONES))
    (root / "map_coarse.txt").write_text("".join(f"{p} {'sil' if p == 'sil' else 'speech'}\n" for p in PHONES))
    (root / "map_bytes.txt").write_bytes(b"sil sil\n\xe9 a\n")
    (root / "tsv_bytes.tsv").write_bytes(b"/root\n\xff.flac\t100\n")
    (root / "fs/short.km").write_text("".join((root / "fs/phones100.km").read_text().splitlines(True)[:-1]))

    # An iterate run, then its records damaged the ways an interrupted write or a hand edit leaves them.
    for name, record in (("run_cut", '{"attempts": [{"started": '), ("run_empty", "")):
        run = root / name
        write_run_record(run, load_config(IterateConfig, [REPO / "configs/demo.yaml"], [f"run_dir={run}"]))
        (run / "stages").mkdir()
        (run / "stages/corpus.json").write_text(record)
    (root / "run_badcfg/stages").mkdir(parents=True)
    shutil.copyfile(root / "run_cut/run.json", root / "run_badcfg/run.json")
    (root / "run_badcfg/config.yaml").write_text("iterations: 3\n")
    return root


class _Payload:
    """A pickle that would create a file if anything unpickled it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass
class Case:
    argv: list[str]
    names: list[str]
    """What the error must say: the file, the key or the field, and the reason."""
    subprocess: bool = False
    """Run as its own processes, the way training is started (``launch local``): a failing
    rank ends with os._exit (fail-fast)."""


def cases(h: Path) -> dict[str, Case]:
    shards = str(h / "shards")
    align = ["labels", "alignments", "--shards", shards]
    imp = ["labels", "import", "--shards", shards]
    demo = ["iterate", "--config", str(REPO / "configs/demo.yaml")]
    return {
        # labels alignments
        "frames: a key twice": Case([*align, "--phone-map", f"{h}/map.txt", "--frames", f"{h}/frames_twice.txt"],
                                    [f"{h}/frames_twice.txt:41: key", "again (first on line 4)"]),
        "frames: keys of another corpus": Case([*align, "--phone-map", f"{h}/map.txt", "--frames",
                                                f"{h}/frames_foreign.txt"],
                                               [f"{h}/frames_foreign.txt: 1 keys are not utterances", "another/corpus"]),
        "frames: not UTF-8": Case([*align, "--phone-map", f"{h}/map.txt", "--frames", f"{h}/frames_bytes.txt"],
                                  [f"{h}/frames_bytes.txt: not UTF-8 text"]),
        "phone map: a folder": Case([*align, "--phone-map", str(h / "fs"), "--frames", f"{h}/frames.txt"],
                                    [f"{h / 'fs'}: a folder, where a"]),
        "phone map: not UTF-8": Case([*align, "--phone-map", f"{h}/map_bytes.txt", "--frames", f"{h}/frames.txt"],
                                     [f"{h}/map_bytes.txt: not UTF-8 text"]),
        "alignments over the gold label sets": Case(
            [*align, "--phone-map", f"{h}/map_coarse.txt", "--frames", f"{h}/frames.txt"],
            [f"{shards}/labels/phones50", "with other labels; set overwrite=true"]),
        "tolerance < 0": Case([*align, "--phone-map", f"{h}/map.txt", "--frames", f"{h}/frames.txt",
                               "tolerance=-0.1"], ["tolerance"]),
        # labels import / export
        ".tsv: not UTF-8": Case([*imp, "--tsv", f"{h}/tsv_bytes.tsv", "--km", f"{h}/fs/phones100.km", "--name", "x"],
                                [f"{h}/tsv_bytes.tsv: not UTF-8 text"]),
        ".tsv: a folder": Case([*imp, "--tsv", str(h / "fs"), "--km", f"{h}/fs/phones100.km", "--name", "x"],
                               [f"{h / 'fs'}: a folder"]),
        ".km shorter than the .tsv": Case([*imp, "--tsv", f"{h}/fs/phones100.tsv", "--km", f"{h}/fs/short.km",
                                           "--name", "x", "--rate", "100"],
                                          [f"{h}/fs/short.km has 39 lines but {h}/fs/phones100.tsv lists 40"]),
        "import over a label set of another rate": Case(
            [*imp, "--tsv", f"{h}/fs/phones100.tsv", "--km", f"{h}/fs/phones100.km", "--name", "phones50",
             "--rate", "100"], [f"{shards}/labels/phones50 already exists with other labels; set overwrite=true"]),
        "export over someone's train.tsv": Case(
            ["labels", "export", "--shards", shards, "--name", "phones50", "--out", str(h / "mine"), "split=train"],
            [f"{h}/mine/train.tsv already exists with other content; set overwrite=true"]),
        # import hf
        "hf: a layer missing from the weights": Case(["import", "hf", f"{h}/hf_no_layer1", f"{h}/new.pt"],
                                                     [f"{h}/hf_no_layer1", "missing parameters", "encoder.layers.1."]),
        "hf: truncated weights": Case(["import", "hf", f"{h}/hf_truncated", f"{h}/new.pt"],
                                      [f"{h}/hf_truncated", "could not read the weights"]),
        "hf: config.json missing fields": Case(["import", "hf", f"{h}/hf_fields", f"{h}/new.pt"],
                                               [f"{h}/hf_fields/config.json: no num_hidden_layers, hidden_size"]),
        "hf: config.json not JSON": Case(["import", "hf", f"{h}/hf_json", f"{h}/new.pt"],
                                         [f"{h}/hf_json/config.json: not valid JSON"]),
        "hf: no weights file": Case(["import", "hf", f"{h}/hf_noweights", f"{h}/new.pt"],
                                    [f"{h}/hf_noweights", "no weights file"]),
        "hf: out is a folder": Case(["import", "hf", f"{h}/hf", str(h / "mine")], [f"{h}/mine is a folder"]),
        "hf: out is someone's model": Case(["import", "hf", f"{h}/hf", f"{h}/mine/model.pt"],
                                           [f"{h}/mine/model.pt already exists with other content"]),
        "hf: out inside a checkpoint": Case(["import", "hf", f"{h}/hf", f"{h}/run/checkpoints/step_8/model.pt"],
                                            [f"{h}/run/checkpoints/step_8 is a checkpoint folder"]),
        # import fairseq
        "fairseq: an empty file": Case(["import", "fairseq", f"{h}/fs_empty.pt", f"{h}/new.pt"],
                                       [f"{h}/fs_empty.pt", "an empty file"]),
        "fairseq: random bytes": Case(["import", "fairseq", f"{h}/fs_random.pt", f"{h}/new.pt"],
                                      [f"{h}/fs_random.pt", "is not"]),
        "fairseq: a bare pickle": Case(["import", "fairseq", f"{h}/fs_bare.pt", f"{h}/new.pt"],
                                       [f"{h}/fs_bare.pt", "is not"]),
        "fairseq: a pickle that runs code": Case(["import", "fairseq", f"{h}/fs_payload.pt", f"{h}/new.pt"],
                                                 [f"{h}/fs_payload.pt"]),
        # every read of a model in a checkpoint folder checks its manifest
        "probe: a damaged model.pt named as a file": Case(
            ["probe", f"checkpoint={h}/damaged/checkpoints/step_8/model.pt", f"eval_shards={shards}",
             f"out={h}/probe_out"], [f"{h}/damaged/checkpoints/step_8/model.pt does not match the sha256"]),
        "features: a damaged checkpoint folder": Case(
            ["features", "model", f"checkpoint={h}/damaged/checkpoints/step_8", f"shards={shards}",
             f"out={h}/feats_out", "layer=1"], [f"{h}/damaged/checkpoints/step_8/model.pt does not match the sha256"]),
        "export: a damaged checkpoint": Case(["export", "hf", f"{h}/damaged/checkpoints/step_8", f"{h}/hf_out"],
                                             ["step_8/model.pt does not match the sha256", "damaged"]),
        "export: over someone's config.json": Case(["export", "hf", f"{h}/hf_source_ckpt", str(h / "mine")],
                                                   [f"{h}/mine/config.json already exists with other content"]),
        # run folders that are not runs of this project
        "iterate: run_dir holds someone's config": Case([*demo, f"run_dir={h}/mine"],
                                                        [f"{h}/mine/config.yaml exists and was not written by pretrain"]),
        "shards build: out holds someone's config": Case(["shards", "build", f"input={h}/fs/phones100.tsv",
                                                          f"out={h}/mine"],
                                                         [f"shard output {h}/mine is not empty"]),
        "corpus synth: out not empty": Case(["corpus", "synth", f"out={h}/full", "count=2"],
                                            [f"corpus output {h}/full is not empty"]),
        "train: run_dir holds someone's config": Case(
            ["train", "--config", str(REPO / "configs/model/tiny.yaml"), "--config", str(REPO / "configs/train/tiny_cpu.yaml"),
             "--run-dir", f"{h}/mine", f"data.shards={shards}", "optim.max_steps=10"],
            [f"{h}/mine/config.yaml exists and was not written by pretrain"], subprocess=True),
        # damaged records, checked up front
        "status: a stage record cut short": Case(["status", f"{h}/run_cut"],
                                                 [f"stage record {h}/run_cut/stages/corpus.json is damaged"]),
        "status: an empty stage record": Case(["status", f"{h}/run_empty"],
                                              [f"stage record {h}/run_empty/stages/corpus.json is damaged"]),
        "status: an invalid config.yaml": Case(["status", f"{h}/run_badcfg"], ["iterations"]),
        "iterate only: a stage record cut short": Case(
            [*demo, f"run_dir={h}/run_cut", "only=corpus"], [f"stage record {h}/run_cut/stages/corpus.json is damaged"]),
        "iterate: eval corpus too small": Case([*demo, f"run_dir={h}/new_run", "eval.synth_hours=0.02"],
                                               ["eval.synth_hours", "set at least"]),
        "iterate: a layer beyond the model": Case([*demo, f"run_dir={h}/new_run", "iterations.1.layer=6"],
                                                  ["iterations.1.layer: 6", "3 Transformer layers"]),
    }


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def table(house) -> dict[str, Case]:
    # export hf's source: a conv model (the asset is an Fbank one, which transformers cannot hold).
    from pretrain.model.checkpoint import save_model
    from pretrain.model.hubert import HubertPretrain, LabelSpec
    from tests.model.test_model import model_config

    if not (house / "hf_source_ckpt").exists():
        save_model(house / "hf_source_ckpt/model.pt", HubertPretrain(model_config("tiny"), [LabelSpec("km", 100, 50)]))
    return cases(house)


CASE_NAMES = list(cases(Path("/h")))


@pytest.mark.slow
@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_bad_input_is_one_error_naming_it_and_changes_nothing(name, house, table, capfd):
    case = table[name]
    before = snapshot(house)
    if case.subprocess:
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
        proc = subprocess.run([str(Path(sys.executable).parent / "launch"), "local", "--nproc", "1", "pretrain", *case.argv,
                               "--no-progress"], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code = main([*case.argv, "--no-progress"])
        out, err = capfd.readouterr()
    assert code != 0, (out, err)
    assert "Traceback" not in out + err, err
    print(f"\nbad input | {name} | exit {code} | {err.strip().splitlines()[-1]}")  # the table, with -s
    for said in case.names:
        assert said in err, f"{said!r} not in:\n{err}"
    assert not (house / "PWNED").exists()
    assert snapshot(house) == before, "a file changed, appeared or went away"


@pytest.mark.slow
def test_every_command_writing_where_the_user_names_is_a_no_op_when_rerun_with_identical_inputs(
        small_corpus, small_shards, tmp_path, capfd):
    """The other half of the overwrite guards: a rerun whose output is already there (a
    pipeline rerun, a script run twice) ends with status 0 and touches nothing, not even the
    run record."""
    from pretrain.model.checkpoint import save_model
    from pretrain.model.export import hf_config
    from pretrain.model.hubert import HubertPretrain, LabelSpec
    from tests.model.test_model import model_config

    shutil.copytree(small_shards, tmp_path / "shards")
    shards = str(tmp_path / "shards")
    transformers.HubertModel(hf_config(model_config("tiny", "model.extractor_mode=layer_norm",
                                                    "model.layer_norm_first=true"))).save_pretrained(tmp_path / "hf")
    save_model(tmp_path / "ckpt/model.pt", HubertPretrain(model_config("tiny"), [LabelSpec("km", 100, 50)]))
    (tmp_path / "map.txt").write_text("".join(f"{p} {'sil' if p == 'sil' else 'speech'}\n" for p in PHONES))
    gold = {k: v for s in read_manifest(shards)["shards"]
            for k, v in LabelSet(shards, "phones100").load_shard(s["name"]).items()}
    (tmp_path / "frames.txt").write_text("".join(f"{k} {' '.join(PHONES[i] for i in v)}\n" for k, v in gold.items()))
    commands = [
        ["corpus", "synth", f"out={tmp_path}/corpus", "count=2", "jobs=1"],
        ["shards", "build", f"input={small_corpus}", f"out={tmp_path}/built", "per_shard=8"],
        ["labels", "export", "--shards", shards, "--name", "phones100", "--out", f"{tmp_path}/fs"],
        ["labels", "import", "--shards", shards, "--tsv", f"{tmp_path}/fs/phones100.tsv", "--km",
         f"{tmp_path}/fs/phones100.km", "--name", "again", "--rate", "100"],
        ["labels", "alignments", "--shards", shards, "--phone-map", f"{tmp_path}/map.txt", "--frames",
         f"{tmp_path}/frames.txt", "prefix=coarse"],
        ["import", "hf", f"{tmp_path}/hf", f"{tmp_path}/imported.pt"],
        ["export", "hf", f"{tmp_path}/ckpt", f"{tmp_path}/exported"],
    ]
    for argv in commands:
        assert main([*argv, "--no-progress"]) == 0, capfd.readouterr().err
        capfd.readouterr()
        before = snapshot(tmp_path)
        assert main([*argv, "--no-progress"]) == 0, capfd.readouterr().err
        out, err = capfd.readouterr()
        assert snapshot(tmp_path) == before, argv
        assert "Traceback" not in out + err
