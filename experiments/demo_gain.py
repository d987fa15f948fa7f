"""The demo, measured: `pretrain iterate --config configs/demo.yaml` into an empty folder, timed,
then the iteration gain read from its own outputs on the held-out shards:

- ``pnmi_mfcc`` / ``pnmi_it2``: held-out PNMI of the MFCC labels and of iteration 2's labels at
  iteration 2's k (``it<i>.heldout`` / ``it2.mfcc_heldout``);
- ``phone_acc_it1`` / ``phone_acc_it2``: frame phone accuracy of each model's best layer;
- ``abx_within_it1`` / ``abx_within_it2``: ABX error within speakers of each model's best layer;
- the baselines' phone accuracy (MFCC, log-mel, the untrained twin) and the verdict lines of
  the report.

``--write-reference`` stores the run's loss and masked-accuracy curves as the ``demo`` entry of
``pretrain/reference_curves.json`` (drawn faintly in every report that names it).
The last line is JSON.

    python experiments/demo_gain.py --out /tmp/demo_gain              # about 15 min on 2 cores
    python experiments/demo_gain.py --out /tmp/demo_gain --set iterations.0.max_steps=300
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pretrain.pipeline.experiment import BIN
from pretrain.pipeline.report import best_of, training_curves, write_reference_curves
from pretrain.resources import config_path
from pretrain.utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def reference_entry(run: Path, iterations: int, description: str) -> dict:
    return {"description": description,
            "curves": {f"it{i}": training_curves(run / f"it{i}" / "train") for i in range(1, iterations + 1)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(config_path("configs/demo.yaml")))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="iterate override")
    ap.add_argument("--out", default="/tmp/demo_gain", help="run directory (emptied first)")
    ap.add_argument("--keep", action="store_true", help="reuse what is in --out (no fresh run, no timing)")
    ap.add_argument("--write-reference", action="store_true",
                    help="store this run's curves as the 'demo' reference curves")
    args = ap.parse_args(argv)
    run = Path(args.out).resolve()
    if run.exists() and not args.keep:
        shutil.rmtree(run)
    start = time.perf_counter()
    cmd = [str(BIN / "pretrain"), "iterate", "--config", args.config, f"run_dir={run}", *args.set, "--no-progress"]
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    minutes = (time.perf_counter() - start) / 60
    if rc:
        sys.exit(f"the demo failed (exit {rc}): {' '.join(cmd)}")
    from pretrain.stages import resolve

    _, cfg, _, _ = resolve(["iterate", "--config", args.config, f"run_dir={run}", *args.set])
    n = len(cfg.iterations)
    k = cfg.iterations[-1].k

    def heldout(i: int, name: str) -> float:
        return json.loads((run / f"it{i}" / name / "quality.json").read_text())["pnmi"]

    probes = {i: json.loads((run / f"it{i}" / "probe" / "probe.json").read_text()) for i in range(1, n + 1)}
    record = {"minutes": minutes, "k": k,
              "pnmi_mfcc": heldout(1, "heldout") if k == cfg.iterations[0].k else heldout(n, "mfcc_heldout"),
              f"pnmi_it{n}": heldout(n, "heldout"), "pnmi_it1_labels": heldout(1, "heldout")}
    for i in range(1, n + 1):
        for metric, key in (("phone_acc", "phone_acc"), ("abx_within", "abx_within"), ("abx_across", "abx_across")):
            value, layer = best_of(probes[i], "model", metric)
            record[f"{key}_it{i}"], record[f"{key}_it{i}_layer"] = value, layer
    for name in ("mfcc", "logmel", "untrained"):
        for metric in ("phone_acc", "abx_within"):
            record[f"{metric}_{name}"] = best_of(probes[1], name, metric)[0]
    stages = {p.stem: json.loads(p.read_text()).get("seconds") for p in (run / "stages").glob("*.json")}
    record["stage_seconds"] = stages
    report = (run / "report.md").read_text()
    verdict = next((line for line in report.splitlines() if line.startswith("On held-out speech")), "")
    record["verdict"] = verdict
    record["criteria"] = {
        "a_it2_labels_beat_mfcc": record[f"pnmi_it{n}"] > record["pnmi_mfcc"],
        "b_phone_acc_it2_beats_it1": record[f"phone_acc_it{n}"] > record["phone_acc_it1"],
        "b_abx_within_it2_beats_it1": record[f"abx_within_it{n}"] < record["abx_within_it1"],
        "c_models_beat_mfcc_phone_acc": all(record[f"phone_acc_it{i}"] > record["phone_acc_mfcc"]
                                            for i in range(1, n + 1)),
        "c_models_beat_untrained_phone_acc": all(record[f"phone_acc_it{i}"] > record["phone_acc_untrained"]
                                                 for i in range(1, n + 1)),
    }
    if args.write_reference:
        write_reference_curves("demo", reference_entry(run, n, f"configs/demo.yaml as measured by experiments/demo_gain.py, "
                                                        f"{minutes:.1f} min on 2 CPU cores"))
    atomic_write_json(run / "demo_gain.json", record)
    print(verdict)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
