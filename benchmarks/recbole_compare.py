"""SASRec training time per epoch: llmd4rec (all-positions view) vs RecBole 1.2.1 (one row per prefix), CE loss.

Both train the same SASRec shape (hidden 64, 2 blocks, 1 head, FFN inner size 64, dropout 0.3/0.3, max length 50)
with the full softmax cross-entropy over all items, batch 128, Adam(W) lr 1e-3 without weight decay, on Beauty with
a leave-one-out split, on the CPU with the same number of torch threads, back to back, each in a fresh process.
Only the training part of an epoch is timed; neither side evaluates during the timed epochs.

- RecBole materialises one training row per prefix (item_list -> next item): ~131k rows of up to 50 items, one loss
  term per row. It runs in its own virtual environment (it needs numpy<1.24), from atomic files made here, so it
  downloads nothing. Its time is the span of `Trainer._train_epoch`, what it logs as "epoch N training [time: X s]".
- llmd4rec keeps one row per user (~22k rows) with a loss term at every position: the same next-item targets,
  so about the same number of loss terms. Its time is `epoch_seconds` of `fit_crm` (metrics.jsonl), which excludes
  evaluation; evaluation is stubbed out in the worker since it is not timed.

Setup of the RecBole environment (kept out of git, see .gitignore):

    python3 -m venv .venv-recbole
    .venv-recbole/bin/pip install torch==2.13.0                      # the local CPU wheel, first
    .venv-recbole/bin/pip install --no-deps recbole==1.2.1            # its ray/thop/plotly are only for tuning
    .venv-recbole/bin/pip install "numpy<1.24" scipy pandas tqdm colorlog==4.7.2 colorama==0.4.4 \\
        scikit-learn pyyaml tensorboard tabulate texttable psutil

Then: python benchmarks/recbole_compare.py --data-dir ../shared/data --epochs 2
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
HPARAMS = {"hidden": 64, "inner_size": 64, "n_layers": 2, "n_heads": 1, "hidden_dropout": 0.3, "attn_dropout": 0.3,
           "max_len": 50, "batch_size": 128, "lr": 0.001, "weight_decay": 0.0, "loss": "CE (full softmax)"}
DATASET_FILES = {"beauty": "Beauty/Beauty.txt"}


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


# ---------------------------------------------------------------- workers (each in its own process)

def worker_recbole(args: argparse.Namespace) -> None:
    """Runs inside the RecBole venv: build SequentialDataset + dataloaders, then fit without validation."""
    import logging

    import numpy
    import recbole
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    work = Path(args.work)
    config_dict = {
        "data_path": str(work / "atomic"), "checkpoint_dir": str(work / "recbole_saved"),
        "use_gpu": False, "seed": 2020, "reproducibility": True, "show_progress": False, "state": "INFO",
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": HPARAMS["max_len"],
        "hidden_size": HPARAMS["hidden"], "inner_size": HPARAMS["inner_size"], "n_layers": HPARAMS["n_layers"],
        "n_heads": HPARAMS["n_heads"], "hidden_dropout_prob": HPARAMS["hidden_dropout"],
        "attn_dropout_prob": HPARAMS["attn_dropout"], "hidden_act": "gelu", "loss_type": "CE",
        "train_neg_sample_args": None, "epochs": args.epochs, "train_batch_size": HPARAMS["batch_size"],
        "learning_rate": HPARAMS["lr"], "weight_decay": HPARAMS["weight_decay"], "learner": "adam",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "eval_step": 0, "metrics": ["Recall", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
    }
    config = Config(model="SASRec", dataset=args.dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    torch.set_num_threads(args.threads)
    init_logger(config)
    logger = logging.getLogger()
    t0 = time.perf_counter()
    dataset = create_dataset(config)
    train_data, _valid_data, _test_data = data_preparation(config, dataset)
    prep_seconds = time.perf_counter() - t0
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    torch.set_num_threads(args.threads)

    spans = []
    train_epoch = trainer._train_epoch

    def timed(*a, **k):  # the same span RecBole logs as "training [time: X s]"
        s = time.perf_counter()
        out = train_epoch(*a, **k)
        spans.append(time.perf_counter() - s)
        return out

    trainer._train_epoch = timed
    logger.info("timed epochs start")
    trainer.fit(train_data, valid_data=None, saved=False, show_progress=False)
    rows = len(train_data._dataset)
    result = {"seconds_per_epoch_each": spans, "rows_per_epoch": rows, "loss_terms_per_epoch": rows,
              "steps_per_epoch": len(train_data), "items": dataset.item_num - 1, "users": dataset.user_num - 1,
              "prep_seconds": prep_seconds, "threads": torch.get_num_threads(),
              "params": sum(p.numel() for p in model.parameters()),
              "versions": {"recbole": recbole.__version__, "numpy": numpy.__version__, "torch": torch.__version__},
              "train_loss": {str(k): float(v) for k, v in trainer.train_loss_dict.items()}}
    (work / "recbole_result.json").write_text(json.dumps(result, indent=2))


def worker_ours(args: argparse.Namespace) -> None:
    """Runs in the llmd4rec venv: fit_crm as `llmd4rec train-crm` runs it, evaluation stubbed (it is not timed)."""
    import numpy
    import torch

    from llmd4rec.config import load_config
    from llmd4rec.data.dataset import all_positions
    from llmd4rec.models.sasrec import SASRec
    from llmd4rec.pretrained import load_data
    from llmd4rec.runs import read_metrics, seed_everything
    from llmd4rec.training import crm

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cfg = load_config(args.config, [f"data.data_dir={args.data_dir}", f"crm_train.epochs={args.epochs}",
                                    "device=cpu", f"crm.hidden={HPARAMS['hidden']}",
                                    f"crm.n_layers={HPARAMS['n_layers']}", f"crm.n_heads={HPARAMS['n_heads']}",
                                    f"crm.dropout={HPARAMS['hidden_dropout']}", f"crm.max_len={HPARAMS['max_len']}",
                                    f"crm_train.batch_size={HPARAMS['batch_size']}", f"crm_train.lr={HPARAMS['lr']}",
                                    f"crm_train.weight_decay={HPARAMS['weight_decay']}", "crm_train.loss=ce"])
    if cfg.data.name != args.dataset:
        raise SystemExit(f"config dataset '{cfg.data.name}' differs from --dataset '{args.dataset}'")
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    dataset, split = load_data(cfg)
    inputs, targets = all_positions(split.train, cfg.crm.max_len)
    prep_seconds = time.perf_counter() - t0
    model = SASRec(dataset.n_items, cfg.crm)
    crm.evaluate_split = lambda *a, **k: {"NDCG@10": 0.0}  # not timed either way; saves ~20 s a call
    run_dir = work / "ours_run"
    run_dir.mkdir(parents=True, exist_ok=True)
    crm.fit_crm(model, split, cfg, run_dir)
    records = [r for r in read_metrics(run_dir) if r.get("phase") == "crm"]
    result = {"seconds_per_epoch_each": [r["epoch_seconds"] for r in records], "rows_per_epoch": int(inputs.shape[0]),
              "loss_terms_per_epoch": int((targets > 0).sum()),
              "steps_per_epoch": -(-int(inputs.shape[0]) // cfg.crm_train.batch_size),
              "items": dataset.n_items, "users": dataset.n_users, "prep_seconds": prep_seconds,
              "threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters()),
              "grad_clip": cfg.crm_train.grad_clip, "tie_weights": cfg.crm.tie_weights,
              "versions": {"numpy": numpy.__version__, "torch": torch.__version__},
              "train_loss": {str(r["epoch"]): r["loss"] for r in records}}
    (work / "ours_result.json").write_text(json.dumps(result, indent=2))


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


def run_worker(name: str, python: str, args: argparse.Namespace, work: Path, cwd: Path) -> tuple[dict, dict, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--work", str(work), "--dataset", args.dataset,
           "--data-dir", str(Path(args.data_dir).resolve()), "--config", str(Path(args.config).resolve()),
           "--epochs", str(args.epochs), "--threads", str(args.threads)]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with LoadSampler() as load:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (work / f"{name}.log").write_text(log)
    if proc.returncode != 0:
        sys.stderr.write(log[-6000:])
        raise SystemExit(f"[{name}] worker failed with exit code {proc.returncode}; log in {work / f'{name}.log'}")
    result = json.loads((work / f"{name}_result.json").read_text())
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[{name}] epochs {[round(s, 1) for s in result['seconds_per_epoch_each']]} s, load {load.summary()}",
          flush=True)
    return result, load.summary(), log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--dataset", default="beauty", choices=sorted(DATASET_FILES))
    p.add_argument("--config", default=str(HERE.parent / "configs" / "sasrec" / "beauty.yaml"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in both workers")
    p.add_argument("--recbole-python", default=str(HERE.parent / ".venv-recbole" / "bin" / "python"))
    p.add_argument("--order", default="llmd4rec,recbole", help="which runs first (back to back)")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for both workers ('' keeps the environment's): on a loaded machine a "
                        "spinning 2-thread OpenMP team is ~10x slower for small ops, on both sides")
    p.add_argument("--out", default=str(HERE / "results" / "sasrec_vs_recbole.json"))
    p.add_argument("--worker", choices=["recbole", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "recbole":
        return worker_recbole(args)
    if args.worker == "ours":
        return worker_ours(args)

    sys.path.insert(0, str(HERE))
    from _common import header

    src = Path(args.data_dir) / DATASET_FILES[args.dataset]
    if not Path(args.recbole_python).exists():
        raise SystemExit(f"no RecBole python at {args.recbole_python}: see the setup in this file's docstring")
    config = {"dataset": args.dataset, "epochs": args.epochs, "threads": args.threads, "device": "cpu",
              "order": args.order, "omp_wait_policy": args.omp_wait_policy or None, **HPARAMS,
              "split": "leave-one-out (RecBole eval_args split LS valid_and_test, order TO, mode full)"}
    out = header(config)
    out["load_at_start"] = {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
                            "busy_processes": busy_processes()}
    runs, loads = {}, {}
    with tempfile.TemporaryDirectory(prefix="recbole_compare_") as tmp:
        work = Path(tmp)
        data_stats = write_atomic_files(src, work / "atomic", args.dataset)
        for name in args.order.split(","):
            if name == "recbole":
                runs["recbole_1.2.1"], loads["recbole_1.2.1"], log = run_worker(
                    "recbole", args.recbole_python, args, work, work)
                logged = [float(x) for x in re.findall(r"epoch \d+ training \[time: ([\d.]+)s", log)]
                runs["recbole_1.2.1"]["recbole_logged_seconds_each"] = logged
            elif name == "llmd4rec":
                runs["llmd4rec"], loads["llmd4rec"], _ = run_worker("ours", sys.executable, args, work, HERE.parent)
            else:
                raise SystemExit(f"unknown run '{name}' in --order")

    rows = {}
    for name, r in runs.items():
        each = r.pop("seconds_per_epoch_each")
        rows[name] = {"seconds_per_epoch": round(statistics.mean(each), 2),
                      "seconds_per_epoch_each": [round(s, 2) for s in each],
                      "rows_per_epoch": r.pop("rows_per_epoch"), **r, "loadavg_1min_during_run": loads[name]}
    ours, theirs = rows["llmd4rec"]["seconds_per_epoch"], rows["recbole_1.2.1"]["seconds_per_epoch"]
    out.update({
        "data": {"source": str(src), **data_stats},
        "rows": rows,
        "ratio_llmd4rec_over_recbole": round(ours / theirs, 3),
        "speedup_llmd4rec_vs_recbole": round(theirs / ours, 2),
        "not_slower": ours <= theirs,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "versions": {"recbole": rows["recbole_1.2.1"]["versions"]["recbole"],
                     "numpy_recbole_venv": rows["recbole_1.2.1"]["versions"]["numpy"],
                     "numpy_llmd4rec_venv": rows["llmd4rec"]["versions"]["numpy"],
                     "torch": rows["llmd4rec"]["versions"]["torch"]},
        "notes": [
            "RecBole materialises one training row per prefix (item_list -> next item, up to 50 items each); "
            "llmd4rec trains on one row per user with a loss term at every position (all-positions view). "
            "Same next-item targets, so about the same number of full-softmax loss terms per epoch; "
            "llmd4rec keeps only each user's latest 50 targets, so it has slightly fewer.",
            "Both: batch 128 rows (prefixes for RecBole, users for llmd4rec), so llmd4rec takes fewer, larger steps.",
            "Timed: training part of each epoch only. RecBole: Trainer._train_epoch (= its logged 'training [time]'); "
            "llmd4rec: fit_crm epoch_seconds from metrics.jsonl. Data loading, dataset building and evaluation "
            "are excluded on both sides; no evaluation runs during the timed epochs.",
            "Model differences kept as each library has them: RecBole SASRec is post-LayerNorm with a learned "
            "absolute position embedding and layer_norm_eps 1e-12, Adam, no grad clipping; llmd4rec SASRec is "
            "pre-LayerNorm with SDPA attention, tied output embeddings, AdamW(weight_decay=0), grad clip 5.0. "
            "inner_size is set to 64 in RecBole to match llmd4rec's FFN width (RecBole's default is 256).",
            "The machine is shared: other jobs were running (see load_at_start and loadavg_1min_during_run), "
            "so absolute times are noisy; the two runs were back to back under the same conditions.",
            "OMP_WAIT_POLICY=PASSIVE in both workers (config.omp_wait_policy): with other jobs on the 2 cores, "
            "a spinning 2-thread OpenMP team made small matmuls ~10x slower (0.6 ms -> 10 ms for [6400,64]@[64,64]) "
            "and per-epoch times mostly scheduling noise; passive waiting removes that for both sides alike.",
            "RecBole 1.2.1 venv: installed with --no-deps (ray, thop, plotly are only used by hyper-parameter "
            "tuning / quick_start / FLOPs and are not imported here) and numpy<1.24 (np.float and friends).",
        ],
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: {"seconds_per_epoch": v["seconds_per_epoch"], "rows_per_epoch": v["rows_per_epoch"]}
                      for k, v in rows.items()}, indent=2))
    print(f"ratio llmd4rec/recbole = {out['ratio_llmd4rec_over_recbole']}; wrote {args.out}")


if __name__ == "__main__":
    main()
