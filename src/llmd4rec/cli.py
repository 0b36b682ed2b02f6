"""The `llmd4rec` command. Every user error becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import InputError


def _overrides(args: argparse.Namespace) -> list[str]:
    """The dotted overrides, with --data-dir as data.data_dir (last, so it wins)."""
    return [*args.overrides, *([f"data.data_dir={args.data_dir}"] if args.data_dir else [])]


def _config(args: argparse.Namespace):
    """A new run's config, or, with --resume, the run's own config.yaml (see runs.resume_config)."""
    from .config import load_config
    from .runs import resume_config

    if args.resume:
        return resume_config(args.resume, args.config, _overrides(args))
    return load_config(args.config, _overrides(args))


def cmd_data_stats(args: argparse.Namespace) -> None:
    from .data.registry import load_dataset
    from .data.text import attach_item_text, read_text_table, text_coverage

    dataset = load_dataset(args.dataset, args.data_dir)
    if args.item_text:
        attach_item_text(dataset, read_text_table(args.item_text), args.item_text)
    stats = {**dataset.stats(), "items_with_text": text_coverage(dataset)}
    if args.json:
        print(json.dumps(stats))
        return
    for key in ("dataset", "users", "items", "interactions", "avg_len", "density", "items_with_text",
                "duplicates_dropped"):
        value = stats[key]
        print(f"{key:>13}: {value:,}" if isinstance(value, int) else f"{key:>13}: {value}")


def cmd_data_item_text(args: argparse.Namespace) -> None:
    from .data.text import build_amazon_item_text

    counts = build_amazon_item_text(args.meta, args.asin_map, args.out)
    print(f"wrote {args.out}: {counts['items']} items, {counts['with_metadata']} found in the metadata, "
          f"{counts['with_title']} with a title")


_EVAL_OVERRIDES = ("eval.", "data.data_dir=", "device=")  # what may change when a trained run is evaluated


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .config import load_config
    from .evaluation import evaluate_split, metric_keys
    from .loading import load_data, load_run
    from .tables import format_table

    if args.run_dir and "=" in args.run_dir and not Path(args.run_dir).exists():  # an override, not a folder
        args.overrides, args.run_dir = [args.run_dir, *args.overrides], None
    if args.run_dir:
        if args.config or args.dataset:
            raise InputError("a run folder is evaluated under its own config.yaml: drop --config and --dataset")
        fixed = [o.split("=", 1)[0] for o in args.overrides if not o.startswith(_EVAL_OVERRIDES)]
        if fixed:
            raise InputError(f"{', '.join(fixed)}: a run folder is evaluated as it was trained (its config.yaml); "
                             f"only {', '.join(_EVAL_OVERRIDES)} may be given")
        run = load_run(args.run_dir, _overrides(args), which=args.model)
        cfg, split, model, name = run.cfg, run.split, run.model, run.kind
        if run.kind == "llmd4rec":
            name = f"llmd4rec-{args.model or 'crm'}"
    elif args.model == "mostpop":
        from .models.popularity import MostPop

        cfg = load_config(args.config, _overrides(args) + ([f"data.name={args.dataset}"] if args.dataset else []))
        _, split = load_data(cfg)
        model, name = MostPop(split.train, split.n_items), "MostPop"
    else:
        raise InputError("give a run folder to evaluate (llmd4rec evaluate RUN_DIR), or --model mostpop "
                         "--dataset NAME for the popularity baseline")
    results = {w: evaluate_split(model, split, cfg.eval, w) for w in ("valid", "test")}
    label = f"{cfg.data.name}, {cfg.eval.mode} ranking, exclude_seen={cfg.eval.exclude_seen}"
    keys = metric_keys(cfg.eval, ("HR", "NDCG", "MRR"))
    print(f"{name} on {label}\n" + format_table({f"{name} (test)": results["test"],
                                                 f"{name} (valid)": results["valid"]}, keys))
    if args.out:
        from .io import atomic_write_json

        atomic_write_json(args.out, {"model": name, "dataset": cfg.data.name, "eval_mode": cfg.eval.mode,
                                     "exclude_seen": cfg.eval.exclude_seen, "metrics": results})


def _run_folder(path: Path) -> None:
    """Printed once: under torchrun every process returns here, after its process group is gone."""
    if os.environ.get("RANK", "0") == "0":
        print(f"run folder: {path}")


def cmd_train_crm(args: argparse.Namespace) -> None:
    from .recipes import train_crm

    _run_folder(train_crm.run(_config(args), args.resume))


def cmd_train_llm(args: argparse.Namespace) -> None:
    from .recipes import train_llm

    _run_folder(train_llm.run(_config(args), args.resume))


def cmd_distill(args: argparse.Namespace) -> None:
    from .recipes import distill

    _run_folder(distill.run(_config(args), args.resume))


def cmd_plot(args: argparse.Namespace) -> None:
    from .plots import plot_run

    for path in plot_run(Path(args.run_dir)):
        print(path)


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_bundle

    print(export_bundle(Path(args.run_dir), Path(args.out_dir), args.model, args.data_dir))


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve import serve
    from .versions import is_versioned

    if args.events or is_versioned(Path(args.bundle)):
        from .live import admin_token_from_env, create_live_app
        from .serve import run_app

        app = create_live_app(Path(args.bundle), args.events, empty_history=args.empty_history,
                              watch_interval=args.watch_interval, admin_token=admin_token_from_env())
        run_app(app, args.host, args.port)
        return
    serve(Path(args.bundle), host=args.host, port=args.port, empty_history=args.empty_history)


def cmd_recommend(args: argparse.Namespace) -> None:
    from .serve import recommend_cli
    from .versions import bundle_path

    recommend_cli(bundle_path(Path(args.bundle)), args.history, args.k, not args.include_seen)


def cmd_update(args: argparse.Namespace) -> None:
    from .update import update_bundle

    report = update_bundle(Path(args.bundle), Path(args.events), args.out, args.overrides)
    before, after = report["held_out_before"]["NDCG@10"], report["held_out_after"]["NDCG@10"]
    print(f"{report['bundle']}: {report['users']} users, {report['new_items']} new items, watermark "
          f"{report['watermark']}, held-out NDCG@10 {before:.4f} -> {after:.4f}, {report['seconds']:.1f}s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmd4rec", description=__doc__)
    p.add_argument("--version", action="version", version=f"llmd4rec {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser, resume: bool = True) -> None:
        sp.add_argument("--config", help="YAML file under configs/")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. crm_train.lr=5e-4 data.name=toys")
        sp.add_argument("--data-dir", help="dataset folder laid out like ../shared/data (data.data_dir)")
        if resume:
            sp.add_argument("--resume", metavar="RUN_DIR",
                            help="continue a stopped run from its last checkpoint, under its own config.yaml "
                                 "(overrides may only raise epochs or patience, or change device or data.data_dir)")

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    st = data.add_parser("stats", help="users, items, interactions of a dataset")
    st.add_argument("--dataset", required=True)
    st.add_argument("--data-dir")
    st.add_argument("--json", action="store_true")
    st.add_argument("--item-text", help="CSV/TSV of item id and text columns (as data.item_text)")
    st.set_defaults(func=cmd_data_stats)
    it = data.add_parser("item-text", help="build item_text.tsv from Amazon 2014 metadata and an item_id/asin map")
    it.add_argument("--meta", required=True, help="meta_CATEGORY.json.gz (JSON or Python-literal dicts per line)")
    it.add_argument("--asin-map", required=True, help="item_id<TAB>asin per line, e.g. item_asin.tsv")
    it.add_argument("--out", required=True)
    it.set_defaults(func=cmd_data_item_text)

    ev = sub.add_parser("evaluate", help="full-ranking metrics of a run folder, or of MostPop")
    ev.add_argument("run_dir", nargs="?")
    ev.add_argument("--model", choices=("mostpop", "crm", "llm"),
                    help="mostpop (no run folder); for a distillation run its crm (default) or its llm")
    ev.add_argument("--dataset", help="with --model mostpop")
    ev.add_argument("--out", help="also write the metrics as JSON here")
    with_config(ev, resume=False)
    ev.set_defaults(func=cmd_evaluate)

    for name, func, help_ in (("train-crm", cmd_train_crm, "train SASRec"),
                              ("train-llm", cmd_train_llm, "train E4SRec"),
                              ("distill", cmd_distill, "the LLMD4Rec alternating distillation")):
        sp = sub.add_parser(name, help=help_)
        with_config(sp)
        sp.set_defaults(func=func)

    pl = sub.add_parser("plot", help="draw loss and validation curves of a run folder to PNG")
    pl.add_argument("run_dir")
    pl.set_defaults(func=cmd_plot)

    ex = sub.add_parser("export", help="write a self-contained serving bundle")
    ex.add_argument("run_dir")
    ex.add_argument("out_dir")
    ex.add_argument("--model", choices=("crm", "llm"),
                    help="for a distillation run: its CRM (default) or its LLM; other runs hold one model")
    ex.add_argument("--data-dir", help="dataset folder, when the run's data.data_dir has moved")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="serve top-K recommendations over HTTP")
    sv.add_argument("bundle")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--empty-history", choices=("error", "popular"), default="error",
                    help="an empty history is a 422 error, or gets the most popular items")
    sv.add_argument("--events", metavar="PATH.db",
                    help="SQLite event store: adds POST /events and GET /users/{id}/recommendations")
    sv.add_argument("--watch-interval", type=float, default=2.0, metavar="SECONDS",
                    help="versioned bundle folder: how often to look for a new current version (0: never)")
    sv.set_defaults(func=cmd_serve)

    up = sub.add_parser("update", help="continue a SASRec bundle on new events; keep it if the result is worse")
    up.add_argument("bundle", help="a bundle, or a versioned folder (versions/N + current)")
    up.add_argument("--events", required=True, metavar="PATH.db")
    up.add_argument("--out", help="new bundle folder (default for a versioned folder: versions/N+1, made current)")
    up.add_argument("overrides", nargs="*", help="dotted overrides, e.g. update.epochs=3 update.kd_weight=0")
    up.set_defaults(func=cmd_update)

    rc = sub.add_parser("recommend", help="top-K for one history, from the shell")
    rc.add_argument("bundle")
    rc.add_argument("--history", required=True, help="comma-separated original item ids")
    rc.add_argument("--k", type=int, default=10)
    rc.add_argument("--include-seen", action="store_true")
    rc.set_defaults(func=cmd_recommend)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # key=value overrides written after an option (`update B --events E update.epochs=3`)
        args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
