"""SASRec training time: llmd4rec (all-positions view) vs RecBole 1.2.1 (one row per prefix), CE loss.

Both train the same SASRec shape (hidden 64, 2 blocks, 1 head, FFN inner size 64, dropout 0.3/0.3, max length 50)
with the full softmax cross-entropy over all items, batch 128, Adam(W) lr 1e-3 without weight decay, on a
leave-one-out split, on the CPU with the same number of torch threads, back to back, each in a fresh process
(benchmarks/recbole_workers.py). Rows:

- `llmd4rec`: one row per user with a loss term at every position; its time is `epoch_seconds` of `fit_crm`.
- `recbole_1.2.1 (as shipped)`: one training row per prefix (item_list -> next item), about the same number of loss
  terms. Importing RecBole's models turns on torch's autograd anomaly detection for the whole process
  (`torch.autograd.set_detect_anomaly(True)` at import time of recbole/model/sequential_recommender/sine.py), which
  slows every backward pass; its time is the span of `Trainer._train_epoch` (its logged "training [time]").
- `recbole_1.2.1 (anomaly detection off)`: the same, with anomaly detection switched off before training: the fair
  race.

After every epoch each side is scored on the validation users, untimed, by one function (llmd4rec's full-ranking
evaluator, input history excluded, in llmd4rec's item ids; see recbole_workers.py), so `seconds_to_target` (training
seconds until validation NDCG@10 first reaches --target-ndcg) uses one metric definition on both sides.

RecBole runs in its own virtual environment (it needs numpy<1.24), from atomic files made here, so it downloads
nothing. Setup (kept out of git, see .gitignore):

    python3 -m venv .venv-recbole
    .venv-recbole/bin/pip install torch==2.13.0                      # the local CPU wheel, first
    .venv-recbole/bin/pip install --no-deps recbole==1.2.1            # its ray/thop/plotly are only for tuning
    .venv-recbole/bin/pip install "numpy<1.24" scipy pandas tqdm colorlog==4.7.2 colorama==0.4.4 \\
        scikit-learn pyyaml tensorboard tabulate texttable psutil safetensors

Then: python benchmarks/recbole_compare.py --data-dir ../shared/data --epochs 40 --target-ndcg 0.05 --stop-at-target
Writes benchmarks/results/sasrec_vs_recbole.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from itertools import accumulate
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULT_HELP, header, write_result  # noqa: E402
from recbole_workers import HPARAMS  # noqa: E402

DATASET_FILES = {"beauty": "Beauty/Beauty.txt", "lastfm": "LastFM/LastFM.txt"}
RUNS = {"llmd4rec": ("ours", "shipped"), "recbole_1.2.1 (as shipped)": ("recbole", "shipped"),
        "recbole_1.2.1 (anomaly detection off)": ("recbole", "off")}
"""row name -> (worker side, anomaly detection)."""


# ---------------------------------------------------------------- data

def write_atomic_files(src: Path, folder: Path, name: str) -> dict:
    """S3Rec `user item item ...` (chronological) -> RecBole `<folder>/<name>/<name>.inter`.

    Timestamps are a running counter over the file, so they increase within every user and order TO keeps the
    original order; ids stay tokens, RecBole remaps them itself.
    """
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    users = inters = 0
    lengths = []
    with open(src, encoding="utf-8") as f, open(out / f"{name}.inter", "w", encoding="utf-8") as g:
        g.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            user, items = parts[0], parts[1:]
            for item in items:
                g.write(f"{user}\t{item}\t{inters}\n")
                inters += 1
            users += 1
            lengths.append(len(items))
    # leave-one-out: each user trains on items[:-2]; a row per prefix has a target at positions 1..n-3
    prefix_rows = sum(max(n - 3, 0) for n in lengths)
    return {"users": users, "interactions": inters, "prefix_rows": prefix_rows}


# ---------------------------------------------------------------- driver

class LoadSampler:
    """Samples the 1-minute load average every few seconds while a run is going."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        s = self.samples
        return {"min": round(min(s), 2), "mean": round(statistics.mean(s), 2), "max": round(max(s), 2), "n": len(s)}


def busy_processes(limit: int = 6) -> list[str]:
    """Other processes using CPU when the benchmark starts (command lines, shortened)."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu", "--no-headers"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    me = str(Path(__file__).name)
    rows = [line.strip() for line in out if me not in line and " ps -eo" not in line]
    return [r[:140] for r in rows[:limit] if float(r.split()[0]) >= 5.0]


def run_worker(name: str, python: str, args: argparse.Namespace, work: Path) -> tuple[dict, dict, str]:
    side, anomaly = RUNS[name]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    run = re.sub(r"\W+", "_", name).strip("_")
    cmd = [python, str(HERE / "recbole_workers.py"), side, "--run", run, "--work", str(work),
           "--dataset", args.dataset, "--data-dir", str(Path(args.data_dir).resolve()),
           "--config", str(Path(args.config).resolve()), "--epochs", str(args.epochs), "--threads", str(args.threads),
           "--anomaly", anomaly, "--target-ndcg", str(args.target_ndcg)] + ["--stop-at-target"] * args.stop_at_target
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with LoadSampler() as load:
        proc = subprocess.run(cmd, cwd=work if side == "recbole" else HERE.parent, env=env, capture_output=True,
                              text=True)
    log = proc.stdout + proc.stderr
    (work / f"{run}.log").write_text(log)
    if proc.returncode != 0:
        sys.stderr.write(log[-6000:])
        raise SystemExit(f"[{name}] worker failed with exit code {proc.returncode}; log in {work / f'{run}.log'}")
    result = json.loads((work / f"{run}_result.json").read_text())
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if side == "recbole":
        result["recbole_logged_seconds_each"] = [float(x) for x in
                                                 re.findall(r"epoch \d+ training \[time: ([\d.]+)s", log)]
    print(f"[{name}] epochs {[round(s, 1) for s in result['seconds_per_epoch_each']]} s, load {load.summary()}",
          flush=True)
    return result, load.summary(), log


def row(r: dict, load: dict, target: float) -> dict:
    """Seconds per epoch, and training seconds (and epochs) until validation NDCG@10 first reached the target."""
    each, ndcg = r.pop("seconds_per_epoch_each"), r.pop("valid_ndcg10_each")
    reached = next((i for i, v in enumerate(ndcg) if v >= target), None)
    return {"seconds_per_epoch": round(statistics.mean(each), 2), "seconds_per_epoch_each": [round(s, 2) for s in each],
            "valid_ndcg10_each": [round(v, 5) for v in ndcg], "best_valid_ndcg10": max(ndcg, default=None),
            "epochs_to_target": None if reached is None else reached + 1,
            "seconds_to_target": None if reached is None else round(list(accumulate(each))[reached], 1),
            "rows_per_epoch": r.pop("rows_per_epoch"), **r, "loadavg_1min_during_run": load}


def write_valid(cfg_path: str, data_dir: str, work: Path) -> None:
    """The validation histories and targets in llmd4rec's ids, and its item ids, for both workers."""
    from llmd4rec.config import load_config
    from llmd4rec.loading import load_data

    dataset, split = load_data(load_config(cfg_path, [f"data.data_dir={data_dir}"]))
    (work / "valid.json").write_text(json.dumps({"n_items": dataset.n_items, "item_ids": dataset.item_ids,
                                                 "inputs": split.valid_inputs, "targets": split.valid_targets}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--dataset", default="beauty", choices=sorted(DATASET_FILES))
    p.add_argument("--config", help="llmd4rec's SASRec config (default configs/sasrec/DATASET.yaml)")
    p.add_argument("--epochs", type=int, default=2, help="at most this many epochs per run")
    p.add_argument("--target-ndcg", type=float, default=0.05, help="validation NDCG@10 for seconds_to_target")
    p.add_argument("--stop-at-target", action="store_true", help="end each run at the epoch reaching the target")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    p.add_argument("--recbole-python", default=str(HERE.parent / ".venv-recbole" / "bin" / "python"))
    p.add_argument("--order", default=",".join(RUNS), help=f"runs, back to back, from: {', '.join(RUNS)}")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for every worker ('' keeps the environment's): on a loaded machine a "
                        "spinning 2-thread OpenMP team is ~10x slower for small ops, on both sides")
    p.add_argument("--out", default="sasrec_vs_recbole", help=RESULT_HELP)
    args = p.parse_args()
    args.config = args.config or str(HERE.parent / "configs" / "sasrec" / f"{args.dataset}.yaml")
    order = args.order.split(",")
    if unknown := [n for n in order if n not in RUNS]:
        p.error(f"unknown runs in --order: {unknown}; choose from {list(RUNS)}")


    src = Path(args.data_dir) / DATASET_FILES[args.dataset]
    if any(RUNS[n][0] == "recbole" for n in order) and not Path(args.recbole_python).exists():
        raise SystemExit(f"no RecBole python at {args.recbole_python}: see the setup in this file's docstring")
    config = {"dataset": args.dataset, "epochs": args.epochs, "target_ndcg": args.target_ndcg,
              "stop_at_target": args.stop_at_target, "threads": args.threads, "device": "cpu", "order": order,
              "omp_wait_policy": args.omp_wait_policy or None, **HPARAMS,
              "split": "leave-one-out (RecBole eval_args split LS valid_and_test, order TO, mode full)",
              "valid_metric": "NDCG@10 by llmd4rec's evaluator on both sides: full ranking, input history excluded"}
    out = header(config)
    out["busy_processes_at_start"] = busy_processes()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="recbole_compare_") as tmp:
        work = Path(tmp)
        data_stats = write_atomic_files(src, work / "atomic", args.dataset)
        write_valid(args.config, args.data_dir, work)
        for name in order:
            python = args.recbole_python if RUNS[name][0] == "recbole" else sys.executable
            result, load, _ = run_worker(name, python, args, work)
            runs[name] = row(result, load, args.target_ndcg)
    out.update({"data": {"source": str(src), **data_stats}, "rows": runs})
    if "llmd4rec" in runs:
        ours = runs["llmd4rec"]
        out["speedup_llmd4rec_vs"] = {
            name: {"per_epoch": round(r["seconds_per_epoch"] / ours["seconds_per_epoch"], 2),
                   "to_target": (round(r["seconds_to_target"] / ours["seconds_to_target"], 2)
                                 if r["seconds_to_target"] and ours["seconds_to_target"] else None)}
            for name, r in runs.items() if name != "llmd4rec"}
    recbole = next((r for n, r in runs.items() if RUNS[n][0] == "recbole"), None)
    out["versions"] = {"torch": next(iter(runs.values()))["versions"]["torch"],
                       **({"recbole": recbole["versions"]["recbole"], "numpy_recbole_venv": recbole["versions"]["numpy"]}
                          if recbole else {})}
    out["notes"] = NOTES
    print(json.dumps({k: {"seconds_per_epoch": v["seconds_per_epoch"], "seconds_to_target": v["seconds_to_target"]}
                      for k, v in runs.items()}, indent=2))
    write_result(args.out, out)


NOTES = [
    "RecBole materialises one training row per prefix (item_list -> next item, up to 50 items each); llmd4rec trains "
    "on one row per user with a loss term at every position (all-positions view). Same next-item targets, so about "
    "the same number of full-softmax loss terms per epoch; llmd4rec keeps only each user's latest 50 targets.",
    "Both: batch 128 rows (prefixes for RecBole, users for llmd4rec), so llmd4rec takes fewer, larger steps.",
    "Timed: the training part of each epoch only (RecBole: Trainer._train_epoch; llmd4rec: fit_crm epoch_seconds). "
    "Data loading, dataset building and the per-epoch validation are excluded on both sides.",
    "seconds_to_target sums the timed training seconds of the epochs up to the first whose validation NDCG@10 (same "
    "evaluator, same users, same item exclusion on both sides) reached the target.",
    "RecBole 1.2.1 enables torch.autograd.set_detect_anomaly(True) at import time of its sequential models (sine.py); "
    "anomaly_detection_as_shipped records it, anomaly_detection what each run trained with.",
    "Model differences kept as each library has them: RecBole SASRec is post-LayerNorm with a learned absolute "
    "position embedding and layer_norm_eps 1e-12, Adam, no grad clipping; llmd4rec SASRec is pre-LayerNorm with SDPA "
    "attention, tied output embeddings, AdamW(weight_decay=0), grad clip 5.0. inner_size is 64 in RecBole to match "
    "llmd4rec's FFN width (RecBole's default is 256).",
    "OMP_WAIT_POLICY=PASSIVE in every worker (config.omp_wait_policy): with other jobs on the cores, a spinning "
    "OpenMP team made small matmuls ~10x slower; passive waiting removes that for both sides alike.",
    "RecBole 1.2.1 venv: installed with --no-deps (ray, thop, plotly are only used by hyper-parameter tuning, "
    "quick_start and FLOPs counting, not imported here) and numpy<1.24 (np.float and friends).",
]


if __name__ == "__main__":
    main()
