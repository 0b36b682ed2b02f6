"""Recipe `llmd4rec train-crm`: data -> split -> SASRec -> early-stopped training -> test metrics of the best epoch."""

from __future__ import annotations

import time
from pathlib import Path

from .. import distributed, precision
from ..config import Config
from ..evaluation import metric_keys
from ..loading import load_data
from ..models.sasrec import SASRec
from ..plots import plot_run
from ..runs import make_run_dir, seed_everything
from ..tables import format_table, write_results
from ..text_embeddings import init_item_table_from_text
from ..training.crm import fit_crm


def run(cfg: Config, resume: str | None = None) -> Path:
    with distributed.session(cfg.device) as device:
        with distributed.main_first():  # one download, the others read the files; bad data makes no run folder
            dataset, split = load_data(cfg)
        cfg = precision.resolve_config(cfg, device)
        run_dir = distributed.on_main(lambda: make_run_dir(cfg, "sasrec", resume))
        seed_everything(cfg.seed)
        model = SASRec(dataset.n_items, cfg.crm).to(device)
        if cfg.crm.text_init and resume is None:
            init_item_table_from_text(model, cfg, dataset)
        t0 = time.perf_counter()
        metrics = fit_crm(model, split, cfg, run_dir, resume=resume is not None)
        if distributed.is_main():
            results = {"model": "SASRec", "dataset": dataset.name, "exclude_seen": cfg.eval.exclude_seen,
                       "eval_mode": cfg.eval.mode, "train_seconds": time.perf_counter() - t0, **metrics}
            table = format_table({"SASRec": metrics["test"]}, metric_keys(cfg.eval))
            write_results(run_dir, results, table)
            plot_run(run_dir)
            print(table, flush=True)
        distributed.barrier()
    return run_dir
