"""The two training processes of recbole_compare.py: RecBole 1.2.1's SASRec (run with RecBole's own venv) and
llmd4rec's (run with the project's). Each writes <work>/<run>_result.json.

Both time only the training part of each epoch, then score the validation users untimed with the same function,
`valid_metrics`: llmd4rec's full-ranking evaluator (every item ranked, ties against the target, the input history
excluded except a repeated target) over the validation histories and targets the driver wrote to <work>/valid.json,
in llmd4rec's item ids. RecBole's model is wrapped to score in those ids, so both sides' validation NDCG@10 is one
definition over one set of users, and `time to a validation NDCG@10` compares like with like.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HPARAMS = {"hidden": 64, "inner_size": 64, "n_layers": 2, "n_heads": 1, "hidden_dropout": 0.3, "attn_dropout": 0.3,
           "max_len": 50, "batch_size": 128, "lr": 0.001, "weight_decay": 0.0, "loss": "CE (full softmax)"}


class Reached(Exception):
    """Raised after the epoch that first reaches --target-ndcg, when the run stops there."""


def valid_metrics(scorer, valid: dict) -> float:
    """Validation NDCG@10 of a scorer (llmd4rec's protocol: encode / score_items / n_items / max_len)."""
    from llmd4rec.evaluation import compute_ranks, metrics_from_ranks

    ranks = compute_ranks(scorer, valid["inputs"], valid["targets"], valid["n_items"], exclude_seen=True)
    return metrics_from_ranks(ranks, (10,))["NDCG@10"]


class RecBoleScorer:
    """RecBole's SASRec seen through llmd4rec's scorer protocol, in llmd4rec's item ids (0 = padding)."""

    def __init__(self, model, ours_to_rb: torch.Tensor, max_len: int):
        self.model, self.ours_to_rb, self.max_len = model, ours_to_rb, max_len
        self.n_items = len(ours_to_rb) - 1

    @torch.no_grad()
    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        """Left-padded llmd4rec histories -> RecBole's left-aligned item_seq and item_seq_len -> its last state."""
        lengths = (histories > 0).sum(1)
        width = histories.shape[1]
        shift = (torch.arange(width)[None, :] + (width - lengths)[:, None]).clamp(max=width - 1)
        seq = self.ours_to_rb[histories.gather(1, shift)]
        seq[torch.arange(width)[None, :] >= lengths[:, None]] = 0
        return self.model.forward(seq, lengths.clamp(min=1))

    @torch.no_grad()
    def score_items(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return state @ self.model.item_embedding.weight[self.ours_to_rb[lo:hi]].T


def _timed_epochs(run, spans: list, ndcg: list, score, args: argparse.Namespace):
    """Wraps one training epoch: times it, then evaluates untimed; raises Reached to stop at the target."""
    def wrapped(*a, **k):
        s = time.perf_counter()
        out = run(*a, **k)
        spans.append(time.perf_counter() - s)
        ndcg.append(score())
        print(f"epoch {len(spans)}: {spans[-1]:.1f} s, valid NDCG@10 {ndcg[-1]:.4f}", flush=True)
        if args.stop_at_target and ndcg[-1] >= args.target_ndcg:
            raise Reached
        return out
    return wrapped


def worker_recbole(args: argparse.Namespace) -> None:
    """In the RecBole venv: SequentialDataset + dataloaders, then fit without RecBole's validation."""
    import logging

    import numpy
    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    sys.path.insert(0, str(ROOT / "src"))  # llmd4rec's evaluator only (torch + numpy)
    work = Path(args.work)
    valid = json.loads((work / "valid.json").read_text())
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
    t0 = time.perf_counter()
    dataset = create_dataset(config)
    train_data, _valid_data, _test_data = data_preparation(config, dataset)
    prep_seconds = time.perf_counter() - t0
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    torch.set_num_threads(args.threads)
    shipped = torch.is_anomaly_enabled()  # importing RecBole's models turns it on (sine.py, at import time)
    if args.anomaly == "off":
        torch.autograd.set_detect_anomaly(False)
    token_id = dataset.field2token_id["item_id"]
    ours_to_rb = torch.tensor([0] + [token_id[t] for t in valid["item_ids"][1:]], dtype=torch.long)
    scorer = RecBoleScorer(model, ours_to_rb, HPARAMS["max_len"])

    def score() -> float:
        model.eval()
        return valid_metrics(scorer, valid)

    spans, ndcg = [], []
    trainer._train_epoch = _timed_epochs(trainer._train_epoch, spans, ndcg, score, args)
    logging.getLogger().info("timed epochs start")
    anomaly = torch.is_anomaly_enabled()
    try:
        trainer.fit(train_data, valid_data=None, saved=False, show_progress=False)
    except Reached:
        pass
    rows = len(train_data._dataset)
    result = {"seconds_per_epoch_each": spans, "valid_ndcg10_each": ndcg, "rows_per_epoch": rows,
              "loss_terms_per_epoch": rows, "steps_per_epoch": len(train_data), "items": dataset.item_num - 1,
              "users": dataset.user_num - 1, "prep_seconds": prep_seconds, "threads": torch.get_num_threads(),
              "anomaly_detection": anomaly, "anomaly_detection_as_shipped": shipped,
              "params": sum(p.numel() for p in model.parameters()),
              "versions": {"recbole": recbole.__version__, "numpy": numpy.__version__, "torch": torch.__version__},
              "train_loss": {str(k): float(v) for k, v in trainer.train_loss_dict.items()}}
    (work / f"{args.run}_result.json").write_text(json.dumps(result, indent=2))


def worker_ours(args: argparse.Namespace) -> None:
    """In the llmd4rec venv: fit_crm as `llmd4rec train-crm` runs it, its validation replaced by valid_metrics."""
    import numpy

    from llmd4rec.config import load_config
    from llmd4rec.data.dataset import all_positions
    from llmd4rec.models.sasrec import SASRec
    from llmd4rec.loading import load_data
    from llmd4rec.runs import read_metrics, seed_everything
    from llmd4rec.training import crm, phase

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    valid = json.loads((work / "valid.json").read_text())
    cfg = load_config(args.config, [f"data.data_dir={args.data_dir}", f"crm_train.epochs={args.epochs}",
                                    f"crm_train.patience={args.epochs}", "crm_train.eval_every=1",
                                    "device=cpu", f"crm.hidden={HPARAMS['hidden']}",
                                    f"crm.n_layers={HPARAMS['n_layers']}", f"crm.n_heads={HPARAMS['n_heads']}",
                                    f"crm.dropout={HPARAMS['hidden_dropout']}", f"crm.max_len={HPARAMS['max_len']}",
                                    f"crm_train.users_per_batch={HPARAMS['batch_size']}",
                                    f"crm_train.lr={HPARAMS['lr']}", f"crm_train.weight_decay={HPARAMS['weight_decay']}",
                                    "crm_train.loss=ce"])
    if cfg.data.name != args.dataset:
        raise SystemExit(f"config dataset '{cfg.data.name}' differs from --dataset '{args.dataset}'")
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    dataset, split = load_data(cfg)
    inputs, targets = all_positions(split.train, cfg.crm.max_len)
    prep_seconds = time.perf_counter() - t0
    model = SASRec(dataset.n_items, cfg.crm)
    ndcg: list[float] = []

    def evaluate(net, _split, _eval, which, device=None) -> dict:
        if which != "valid":
            return {}  # the test split is not part of this comparison
        ndcg.append(valid_metrics(net, valid))
        return {"NDCG@10": ndcg[-1]}

    log_metrics = phase.log_metrics

    def log_then_maybe_stop(run_dir, record) -> None:
        log_metrics(run_dir, record)
        if "valid" in record:
            print(f"epoch {record['epoch']}: {record['epoch_seconds']:.1f} s, valid NDCG@10 "
                  f"{record['valid']['NDCG@10']:.4f}", flush=True)
            if args.stop_at_target and record["valid"]["NDCG@10"] >= args.target_ndcg:
                raise Reached

    crm.evaluate_split, phase.log_metrics = evaluate, log_then_maybe_stop
    run_dir = work / "ours_run"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        crm.fit_crm(model, split, cfg, run_dir)
    except Reached:
        pass
    records = [r for r in read_metrics(run_dir) if r.get("phase") == "crm"]
    result = {"seconds_per_epoch_each": [r["epoch_seconds"] for r in records], "valid_ndcg10_each": ndcg,
              "rows_per_epoch": int(inputs.shape[0]), "loss_terms_per_epoch": int((targets > 0).sum()),
              "steps_per_epoch": -(-int(inputs.shape[0]) // cfg.crm_train.users_per_batch),
              "items": dataset.n_items, "users": dataset.n_users, "prep_seconds": prep_seconds,
              "threads": torch.get_num_threads(), "anomaly_detection": torch.is_anomaly_enabled(),
              "params": sum(p.numel() for p in model.parameters()),
              "grad_clip": cfg.crm_train.grad_clip, "tie_weights": cfg.crm.tie_weights,
              "versions": {"numpy": numpy.__version__, "torch": torch.__version__},
              "train_loss": {str(r["epoch"]): r["loss"] for r in records}}
    (work / f"{args.run}_result.json").write_text(json.dumps(result, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("side", choices=["recbole", "ours"])
    p.add_argument("--run", required=True, help="name of this run: <work>/<run>_result.json")
    p.add_argument("--work", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--anomaly", choices=["shipped", "off"], default="shipped")
    p.add_argument("--target-ndcg", type=float, required=True)
    p.add_argument("--stop-at-target", action="store_true")
    args = p.parse_args()
    (worker_recbole if args.side == "recbole" else worker_ours)(args)


if __name__ == "__main__":
    main()
