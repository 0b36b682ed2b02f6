"""Recipe `llmd4rec train-llm`: the SASRec run's item table -> E4SRec -> early-stopped LoRA training -> test metrics."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import distributed, precision
from ..config import Config
from ..errors import InputError
from ..evaluation import metric_keys
from ..io import load_tensors, save_tensors
from ..loading import NEEDS_CRM_RUN, build_llm, check_reused_runs, crm_item_table, load_data
from ..runs import make_run_dir, seed_everything
from ..tables import format_table, write_results
from ..text_embeddings import item_text_embeddings
from ..training.llm import fit_llm


def run(cfg: Config, resume: str | None = None) -> Path:
    if not resume:
        if not cfg.crm_run:
            raise InputError(NEEDS_CRM_RUN)
        check_reused_runs(cfg)
    with distributed.session(cfg.device, shards=True, group=distributed.zero_stage(cfg.llm_train) > 0) as device:
        with distributed.main_first():  # one download, the others read the files; bad data makes no run folder
            dataset, split = load_data(cfg)
        cfg = precision.resolve_config(cfg, device)
        run_dir = distributed.on_main(lambda: make_run_dir(cfg, "e4srec", resume))
        seed_everything(cfg.seed)
        table_path = run_dir / "llm" / "item_table.safetensors"
        text_path = run_dir / "llm" / "text_table.safetensors"
        with distributed.main_first():  # the item table: rank 0 first, the others find its file
            if resume and table_path.exists():
                table = load_tensors(table_path)["item_table"]
            else:
                table = crm_item_table(cfg, dataset.n_items)
                if distributed.is_main():
                    save_tensors(table_path, {"item_table": table})
            if resume and text_path.exists():
                text = load_tensors(text_path)["text_table"]
            else:
                text = item_text_embeddings(cfg, dataset, device)
                if text is not None:
                    text = text.cpu()
                    if distributed.is_main():
                        save_tensors(text_path, {"text_table": text})
            seed_everything(cfg.seed)  # the same LoRA/head init whether the tables were rebuilt or read back
            model = build_llm(cfg, table, device, text)
        t0 = time.perf_counter()
        metrics = fit_llm(model, split, cfg, run_dir, resume=resume is not None)
        if distributed.is_main():
            results = {"model": "E4SRec", "dataset": dataset.name, "backbone": cfg.llm.backbone,
                       "keep_layers": cfg.llm.keep_layers, "dtype": cfg.llm.dtype,
                       "item_text": cfg.llm.item_text, "exclude_seen": cfg.eval.exclude_seen,
                       "eval_mode": cfg.eval.mode, "train_seconds": time.perf_counter() - t0,
                       "world_size": distributed.world_size(),
                       "fsdp": distributed.use_fsdp(cfg.llm_train.fsdp),
                       "zero_stage": distributed.zero_stage(cfg.llm_train), **metrics}
            if device.type == "cuda":  # this process's peak: what sharding is for
                results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            table = format_table({"E4SRec": metrics["test"]}, metric_keys(cfg.eval))
            write_results(run_dir, results, table)
            print(table, flush=True)
        distributed.barrier()
    return run_dir
