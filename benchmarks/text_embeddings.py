"""Read every item's text with the frozen backbone once (the cache that llm.item_text and crm.text_init reuse), and
choose the pooling and the text fields on validation: each candidate is scored by a training-free recommender that
ranks items by cosine similarity of their text embedding to the user's last item (full ranking, exclude-seen).

    python benchmarks/text_embeddings.py --dataset beauty --data-dir ../shared/data --name text_embeddings_beauty
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULT_HELP, header, write_result  # noqa: E402

from llmd4rec.config import config_to_dict, load_config  # noqa: E402
from llmd4rec.evaluation import evaluate_split  # noqa: E402
from llmd4rec.loading import load_data  # noqa: E402
from llmd4rec.text_embeddings import encode_item_text, text_fields  # noqa: E402


class LastItemText(torch.nn.Module):
    """Scores = cosine(text of the last history item, text of every item): what the text alone knows."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.functional.normalize(table, dim=1)
        self.n_items, self.max_len = len(table) - 1, 50

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        return self.table[histories[:, -1]]

    def score_items(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return state @ self.table[lo:hi].T

    def score_all(self, histories: torch.Tensor) -> torch.Tensor:
        return self.score_items(self.encode(histories), 0, self.n_items + 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--name", required=True, help=RESULT_HELP)
    p.add_argument("--poolings", nargs="+", default=["mean", "last"])
    p.add_argument("--field-sets", nargs="+", default=["all", "title"],
                   help="comma-separated text fields per candidate; 'all' = every text field of the dataset")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = [f"data.name={args.dataset}"] + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    cfg = load_config(None, base + args.overrides)
    dataset, split = load_data(cfg)
    rows = {}
    for fields in args.field_sets:
        for pooling in args.poolings:
            chosen = "" if fields == "all" else fields
            c = load_config(None, base + args.overrides + [f"text.pooling={pooling}", f"text.fields={chosen}"])
            t0 = time.perf_counter()
            table = encode_item_text(c, dataset)
            seconds = time.perf_counter() - t0
            model = LastItemText(table)
            rows[f"{fields}/{pooling}"] = {
                "fields": text_fields(c.text, dataset), "pooling": pooling, "seconds": seconds,
                "metrics": {w: evaluate_split(model, split, c.eval, w) for w in ("valid", "test")}}
            print(f"{fields}/{pooling}: valid NDCG@10 {rows[f'{fields}/{pooling}']['metrics']['valid']['NDCG@10']:.4f}"
                  f" ({seconds:.0f} s)", flush=True)
            out = header(config_to_dict(cfg))
            out["rows"] = rows
            out["chosen_on_valid"] = max(rows, key=lambda k: rows[k]["metrics"]["valid"]["NDCG@10"])
            write_result(args.name, out)


if __name__ == "__main__":
    main()
