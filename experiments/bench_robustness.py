"""Robustness measured: bad inputs, faulty clients, crash and resume. Writes
experiments/results/robustness/robustness.{md,json}.

    FEDPRUNE_DATA_ROOT=../shared/data .venv/bin/python experiments/bench_robustness.py \\
        --out experiments/results/robustness

1. Every bad-input class through the real strategy (SparseFedAvg.aggregate_train on
   hand-built Flower replies, beside one honest reply): the field the rejection names and
   whether the round went on with the honest reply alone.
2. A simulation in which, every round, 10% of the clients fail, 10% time out and 10% reply
   garbage (``faults.*``, seeded): rounds completed and what each round's row recorded.
3. Crash and resume: the same run uninterrupted, and killed with SIGKILL (the whole process
   tree) after round 2 then continued with ``fedprune run --resume``: final weights and every
   row compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the Flower message builders the tests use

SMALL = ["data.num_clients=6", "data.partitioner=iid", "data.train_subset=3000",
         "data.test_subset=1000", "model.width=8", "train.max_steps=10", "fed.rounds=8"]


# ----------------------------------------------------------------------------- 1. bad inputs


def bad_inputs() -> list[dict]:
    import logging

    from flwr.app import Array, ArrayRecord

    from fedprune.config import load_config
    from fedprune.fl.faults import GARBAGE, corrupt
    from fedprune.fl.server_core import SparseServer
    from fedprune.masks import wire
    from fedprune.methods import method_class
    from flower_helpers import reply, server_message, train_reply
    from server.experiment import make_strategy

    cfg = load_config("default", ["model.width=2", "data.num_clients=40", "fed.quorum=0"])
    core = SparseServer(cfg)
    honest_state = {n: v.copy() for n, v in core.state.items()}
    honest = ({"arrays": wire.encode_up(honest_state, core.masks)},
              {"num-examples": 5, "partition-id": 1, "train_loss": 1.0})
    cases = [(which, GARBAGE[which], *corrupt(*honest, which)) for which in GARBAGE]
    for label, key, value in (("inf_examples", "num-examples", float("inf")),
                              ("vector_examples", "num-examples", [3, 4]),
                              ("zero_examples", "num-examples", 0),
                              ("vector_loss", "train_loss", [0.5, 0.5])):
        records, metrics = corrupt(*honest, "bad_partition")
        metrics.update({"partition-id": 1, key: value})
        cases.append((label, f"{key} = {value!r}", records, metrics))
    rows = []
    for label, description, records, metrics in cases:
        strategy = make_strategy(cfg, core, method_class(cfg.method.name)(cfg, core))
        msgs = [server_message(1, {}, {}), server_message(2, {}, {})]
        good = train_reply(msgs[0], wire.encode_up(honest_state, core.masks), 5, 0)
        bad = reply(msgs[1], None, metrics)
        for key, arrays in records.items():
            bad.content[key] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
        logs = _capture(logging.getLogger("flwr"))
        arrays, _ = strategy.aggregate_train(1, [good, bad])
        stats = strategy.stats[1]
        reason = next((m for m in logs.messages if "rejected reply" in m), "")
        rows.append({"class": label, "bad value": description,
                     "rejected": stats["rejected"] == 1,
                     "field and reason logged": reason.split("field ", 1)[-1][:90],
                     "round went on": arrays is not None and stats["accepted"] == 1})
        logs.close()
    return rows


class _capture:
    def __init__(self, logger) -> None:
        import logging

        self.messages: list[str] = []
        self.logger = logger
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.messages.append(record.getMessage())
        logger.addHandler(self.handler)

    def close(self) -> None:
        self.logger.removeHandler(self.handler)


# ----------------------------------------------------------------------------- 2. faults


def faulty_run(out: Path) -> dict:
    from fedprune.config import load_config
    from fedprune.fl.faults import draw
    from server.simulate import simulate

    overrides = [*SMALL, "faults.fail=0.1", "faults.timeout=0.1", "faults.garbage=0.1",
                 "faults.seed=13", "fed.round_timeout=10", f"run.out_dir={out}",
                 "run.name=faults"]
    cfg = load_config("default", overrides)
    clean = simulate(load_config("default", [*SMALL, f"run.out_dir={out}", "run.name=clean"]),
                     out / "clean")
    t0 = time.time()
    summary = simulate(cfg, out / "faults")
    rows = [json.loads(x) for x in (out / "faults" / "metrics.jsonl").read_text().splitlines()]
    drawn = {r: [draw(cfg, p, r) for p in range(6)] for r in range(1, 9)}
    return {"overrides": overrides, "wall_seconds": time.time() - t0,
            "rounds_completed": summary["rounds"], "final_accuracy": summary["final_accuracy"],
            "clean_final_accuracy": clean["final_accuracy"],
            "rows": [{k: r[k] for k in ("round", "clients", "failures", "rejected",
                                        "timed_out", "retries", "accuracy")} for r in rows],
            "drawn": {str(r): [k or "-" for k in v] for r, v in drawn.items()}}


# ----------------------------------------------------------------------------- 3. resume


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedprune.cli", "run", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def crash_and_resume(out: Path) -> dict:
    from safetensors.numpy import load_file

    from fedprune.fl.recorder import load_checkpoint, read_rows

    overrides = [*SMALL, "method.name=fedtiny", "method.delta_r=1", f"run.out_dir={out}"]
    assert _cli(["default", *overrides, "run.name=full"]).wait() == 0
    cut = _cli(["default", *overrides, "run.name=cut"])
    while len(read_rows(out / "cut" / "metrics.jsonl")) < 3:
        if cut.poll() is not None:
            raise RuntimeError("the run ended before it could be killed")
        time.sleep(0.2)
    from flower_helpers import crash

    tree = crash(cut.pid)  # the whole process tree at once, as a crash would
    cut.wait()
    psutil.wait_procs(tree, timeout=30)
    killed_after = load_checkpoint(out / "cut")[0]
    assert _cli(["--resume", str(out / "cut")]).wait() == 0
    a, b = (read_rows(out / d / "metrics.jsonl") for d in ("full", "cut"))
    keys = ("round", "accuracy", "loss", "density", "adjusted_layer", "adjusted_k")
    wa, wb = (load_file(str(out / d / "model.safetensors")) for d in ("full", "cut"))
    return {"overrides": overrides, "killed_after_round": killed_after,
            "rows_equal": [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys}
                                                                  for r in b],
            "weights_bitwise_equal": all(np.array_equal(wa[k], wb[k]) for k in wa),
            "final_accuracy": [a[-1]["accuracy"], b[-1]["accuracy"]]}


# ----------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = ["# Robustness", "", f"Machine: {result['machine']}. Command: "
             "`experiments/bench_robustness.py --out experiments/results/robustness`", "",
             "## Bad inputs (one honest reply beside each bad one, real strategy path)", "",
             "| class | bad value | rejected | field and reason logged | round went on |",
             "|---|---|---|---|---|"]
    for r in result["bad_inputs"]:
        lines.append(f"| {r['class']} | {r['bad value']} | {'yes' if r['rejected'] else 'NO'} "
                     f"| {r['field and reason logged']} | "
                     f"{'yes' if r['round went on'] else 'NO'} |")
    f = result["faults"]
    lines += ["", "## 30% faulty clients per round (10% fail, 10% time out, 10% garbage)", "",
              f"`{' '.join(f['overrides'][:-2])}`: {f['rounds_completed']} of 8 rounds "
              f"completed, {sum(r['failures'] for r in f['rows'])} of "
              f"{sum(r['clients'] for r in f['rows'])} client replies failed, final "
              f"accuracy {100 * f['final_accuracy']:.2f}% (the same run without faults: "
              f"{100 * f['clean_final_accuracy']:.2f}%), {f['wall_seconds']:.0f} s.", "",
              "| round | sampled | failures | rejected | timed out | retries | accuracy |",
              "|---|---|---|---|---|---|---|"]
    for r in f["rows"][1:]:
        lines.append(f"| {r['round']} | {r['clients']} | {r['failures']} | {r['rejected']} | "
                     f"{r['timed_out']} | {r['retries']} | {100 * r['accuracy']:.2f}% |")
    c = result["resume"]
    lines += ["", "## SIGKILL and resume", "",
              f"FedTiny progressive pruning, 8 rounds; the whole process tree killed after "
              f"round {c['killed_after_round']}, then `fedprune run --resume`: every row equal "
              f"to the uninterrupted run's: {c['rows_equal']}; final weights bitwise equal: "
              f"{c['weights_bitwise_equal']} (final accuracy {c['final_accuracy'][0]:.4f} vs "
              f"{c['final_accuracy'][1]:.4f}).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="experiments/results/robustness")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
                         f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM",
              "bad_inputs": bad_inputs()}
    with tempfile.TemporaryDirectory() as tmp:
        result["faults"] = faulty_run(Path(tmp))
        result["resume"] = crash_and_resume(Path(tmp))
    (out / "robustness.json").write_text(json.dumps(result, indent=2))
    (out / "robustness.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
