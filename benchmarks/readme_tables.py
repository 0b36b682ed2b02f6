"""Rewrite the README's result tables from benchmarks/results/*.json, so no number in it is typed by hand.

Each table sits between `<!-- table:NAME -->` and `<!-- /table -->`; a missing result file leaves a note.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tables_common import RESULTS, ROOT, _f, _load, _load_note, _ndcg  # noqa: E402
from _tables_distill import (controls_notes, distill_notes, distill_table, head_notes, sweep_notes,  # noqa: E402
                             sweep_table, teacher_notes, teacher_table, text_choice_table)


def accuracy_table(rows: list[tuple[str, str]]) -> str:
    out = ["| model | result file | test HR@10 | test NDCG@10 | test HR@20 | test NDCG@20 | valid NDCG@10 | s/epoch | total s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for label, name in rows:
        r = _load(name)
        if r is None:
            out.append(f"| {label} | `{name}.json` | not run yet | | | | | | |")
            continue
        t, v = r["metrics"]["test"], r["metrics"]["valid"]
        out.append(f"| {label} | `{name}.json` | {_f(t.get('HR@10'))} | {_f(t.get('NDCG@10'))} | {_f(t.get('HR@20'))} "
                   f"| {_f(t.get('NDCG@20'))} | {_f(v.get('NDCG@10'))} | {_f(r.get('seconds_per_epoch'), 1)} "
                   f"| {_f(r.get('total_seconds', r.get('train_seconds')), 0)} |")
    return "\n".join(out)


def speed_tables() -> str:
    parts = []
    e = _load("e4srec_speed")
    if e:
        parts.append("| E4SRec training path | s/step | samples/s |\n|---|---|---|")
        parts += [f"| {k} | {_f(v['seconds_per_step'], 2)} | {_f(v['samples_per_second'], 1)} |"
                  for k, v in e["rows"].items()]
    rb = _load("sasrec_vs_recbole")
    if rb:
        target = rb["config"].get("target_ndcg")
        parts.append(f"\n| SASRec (CE) on {rb['config']['dataset']} | s/epoch | rows/epoch | anomaly detection "
                     f"| epochs to valid NDCG@10 {_f(target, 3)} | s to it |\n|---|---|---|---|---|---|")
        parts += [f"| {k} | {_f(v['seconds_per_epoch'], 1)} | {v['rows_per_epoch']:,} "
                  f"| {'n/a' if 'anomaly_detection' not in v else 'on' if v['anomaly_detection'] else 'off'} "
                  f"| {v.get('epochs_to_target') or 'n/a'} | {_f(v.get('seconds_to_target'), 0)} |"
                  for k, v in rb["rows"].items()]
    ev = _load("eval_speed_beauty")
    if ev:
        parts.append(f"\n| full-ranking evaluation, {ev['users']:,} Beauty users x {ev['items']:,} items | seconds | "
                     "peak RSS MB (row's own process) | of which ranking |\n|---|---|---|---|")
        parts += [f"| {k} | {_f(v['seconds'], 1)} | {_f(v['peak_rss_mb'], 0)} | {_f(v.get('peak_above_start_mb'), 0)} |"
                  for k, v in ev["rows"].items()]
    up = _load("upward_cache_speed")
    if up:
        parts.append(f"\n| upward phase, one SASRec epoch on {up['dataset']} | seconds |\n|---|---|")
        parts += [f"| {k} | {_f(v.get('epoch_seconds', v.get('seconds')), 1)} |" for k, v in up["rows"].items()]
        parts.append(f"| cached teacher / plain | {_f(up['cached_over_plain'], 2)}x |")
    return "\n".join(parts)


def serve_table() -> str:
    r = _load("serve_latency")
    if r is None:
        return "`serve_latency.json` not run yet."
    out = ["| bundle | concurrency | p50 ms | p99 ms | requests/s |", "|---|---|---|---|---|"]
    for bundle, levels in r["rows"].items():
        for level, m in sorted(levels.items(), key=lambda kv: int(kv[0][1:])):
            out.append(f"| {bundle} | {level[1:]} | {_f(m['p50_ms'], 1)} | {_f(m['p99_ms'], 1)} | {_f(m['rps'], 0)} |")
    return "\n".join(out)


def streaming_table() -> str:
    r = _load("streaming_ml100k")
    if r is None:
        return "`streaming_ml100k.json` not run yet."
    rows = r["rows"]
    n = len(rows["no_update"]["chunks"])
    out = ["| strategy | NDCG@10 | HR@10 | " + " | ".join(f"chunk {c + 1} NDCG@10" for c in range(n))
           + " | s/update |", "|---|---|---|" + "---|" * n + "---|"]
    for name in ("no_update", "incremental", "retrain"):
        row = rows[name]
        chunks = " | ".join(_f(c["NDCG@10"]) for c in row["chunks"])
        out.append(f"| {name} | {_f(row['overall']['NDCG@10'])} | {_f(row['overall']['HR@10'])} | {chunks} "
                   f"| {_f(row.get('seconds_per_update'), 1) if 'seconds_per_update' in row else ''} |")
    s = r["serving"]
    out += ["", "| live server, concurrency 8 | per second | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
    for label, key, rate in (("POST /events, 1 event each", "ingest_single_c8", "events_per_second"),
                             ("POST /events, 100 events each", "ingest_batch100_c8", "events_per_second"),
                             ("GET recommendations", "recommend_c8", "per_second"),
                             ("GET recommendations, swapping versions", "recommend_c8_during_swaps", "per_second")):
        m = s[key]
        out.append(f"| {label} | {_f(m[rate], 0)} | {_f(m['p50_ms'], 1)} | {_f(m['p99_ms'], 1)} | {m['errors']} |")
    swaps = s["recommend_c8_during_swaps"]
    out.append(f"\n{swaps['swaps']} swaps of `current` during the last row ({swaps['requests']} requests). Events "
               f"per second count acknowledged (on disk) events; {r['machine']['cores']} cores shared by server and "
               f"client (load average {r['load_before']:.1f} at the start). Incremental updates: "
               f"{sum(u['accepted'] for u in rows['incremental']['updates'])} of "
               f"{len(rows['incremental']['updates'])} accepted. Command: `{r['command']}`")
    return "\n".join(out)


def sharded_table() -> str:
    parts = []
    for name in ("sharded_llm_cpu", "sharded_llm_cpu_bf16", "sharded_llm_h200"):
        r = _load(name)
        if r is None:
            continue
        b = r["config"]["backbone"]
        parts.append(f"`{name}.json`: {r['config']['nproc']} processes on {r['config']['device']}, random Qwen2 "
                     f"({b['layers']} layers, hidden {b['hidden']}, {b['dtype']}), synthetic "
                     f"{r['config']['data']['users']} users x {r['config']['data']['items']} items, "
                     f"{r['config']['epochs']} epochs.\n")
        parts.append("| mode | epoch losses | valid NDCG@10 | test NDCG@10 | max loss diff vs 1 process (rel.) "
                     "| max metric diff | train s |\n|---|---|---|---|---|---|---|")
        for mode, row in r["rows"].items():
            if "losses" not in row:
                parts.append(f"| {mode} | {row.get('skipped') or row.get('failed', '')[:80]} | | | | | |")
                continue
            agree = r["agreement"].get(mode)
            loss_diff = f"{agree['max_rel_loss_diff']:.1e}" if agree else ""
            metric_diff = _f(agree["max_metric_diff"]) if agree else ""
            losses = ", ".join(_f(x) for x in row["losses"])
            parts.append(f"| {mode} | {losses} | {_f(row['valid']['NDCG@10'])} | {_f(row['test']['NDCG@10'])} "
                         f"| {loss_diff} | {metric_diff} | {_f(row['train_seconds'], 0)} |")
        parts.append("")
    return "\n".join(parts).strip() or "`sharded_llm_*.json` not run yet."


def sasrec_notes() -> str:
    ce, bce = _load("sasrec_beauty"), _load("sasrec_beauty_bce")
    if ce is None:
        return "`sasrec_beauty.json` not run yet."
    out = [f"- A Beauty SASRec run took {_f(ce['total_seconds'] / 60, 0)} minutes here "
           f"({_f(ce['seconds_per_epoch'], 0)} s per epoch, {ce['epochs_run']} epochs with early stopping, best "
           f"epoch {ce['best_epoch']}; {_load_note(ce)})."]
    if bce:
        out.append(f"- The original one-negative BCE objective, same model and protocol, reaches "
                   f"{_ndcg(bce) / _ndcg(ce):.0%} of its test NDCG@10.")
    for dataset in ("beauty", "toys"):
        seeds = _load(f"sasrec_{dataset}_seeds")
        if seeds and seeds.get("seeds", 1) > 1:
            m, sd = seeds["metrics"]["test"], seeds["std"]["test"]
            out.append(f"- Seed noise, {dataset.capitalize()} SASRec over {seeds['seeds']} seeds "
                       f"(`sasrec_{dataset}_seeds.json`): test NDCG@10 {_f(m['NDCG@10'])} ± {_f(sd['NDCG@10'])}, "
                       f"HR@10 {_f(m['HR@10'])} ± {_f(sd['HR@10'])} (mean ± sample std); a gain is claimed only "
                       f"above mean + 2 std, NDCG@10 {_f(m['NDCG@10'] + 2 * sd['NDCG@10'])}.")
    return "\n".join(out)


def precision_table() -> str:
    r = _load("sasrec_beauty_bf16")
    if r is None:
        return "`sasrec_beauty_bf16.json` not run yet."
    out = ["| SASRec on Beauty, item scores in | s/epoch | train s to best epoch | best epoch | test HR@10 | "
           "test NDCG@10 | valid NDCG@10 |", "|---|---|---|---|---|---|---|"]
    for k, v in r["rows"].items():
        t = v["metrics"]["test"]
        out.append(f"| {k} | {_f(v['seconds_per_epoch'], 1)} | {_f(v['train_seconds_to_best'], 0)} | "
                   f"{v['best_epoch']} | {_f(t['HR@10'])} | {_f(t['NDCG@10'])} | "
                   f"{_f(v['metrics']['valid']['NDCG@10'])} |")
    out.append(f"\nbfloat16 / float32 epoch time: {_f(r['epoch_ratio'], 2)} ({_load_note(r)}).")
    return "\n".join(out)


def precision_probe_table() -> str:
    r = _load("precision_probe")
    if r is None:
        return "`precision_probe.json` not run yet."
    units = r["machine"]["bf16_units"]
    flops, step = r["rows"]["matmul_4096x576x1536"]["gflops"], r["rows"]["sasrec_step"]
    out = ["| precision | matmul [4096x576]@[576x1536] GFLOPS | SASRec step on Beauty, s | epoch estimate, s |",
           "|---|---|---|---|"]
    for p in ("float32", "bfloat16"):
        out.append(f"| {p} | {_f(flops[p], 1)} | {_f(step[p]['seconds_per_step'], 3)} | "
                   f"{_f(step[p]['epoch_seconds_estimate'], 0)} |")
    out.append(f"\n{r['machine']['cpu_model']} (AMX tiles: {'yes' if units['amx_tile'] else 'no'}, AVX-512 BF16: "
               f"{'yes' if units['avx512_bf16'] else 'no'}): `auto` resolves to {r['auto_resolves_to']}; "
               f"bfloat16 / float32 step time {_f(r['bf16_over_float32_step_time'], 2)} ({_load_note(r)}).")
    return "\n".join(out)


def provenance_table() -> str:
    out = ["| result file | commit | date | wall time | torch threads / cores | load avg start -> end |",
           "|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        m = r.get("machine", {})
        commit = r["commit"][:10] + (" (dirty)" if r.get("dirty") else "") if r.get("commit") else "not recorded"
        load = (f"{m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}" if "loadavg_start" in m and
                "loadavg_end" in m else "not recorded")
        wall = r.get("wall_seconds")
        out.append(f"| `{path.name}` | {commit} | {r.get('date', '')[:10]} | "
                   f"{'not recorded' if wall is None else f'{wall / 60:.0f} min'} | "
                   f"{m.get('torch_threads', '?')} / {m.get('cores', '?')} | {load} |")
    return "\n".join(out)


def run_all_note() -> str:
    import run_all

    total, guessed = run_all.total_estimate()
    pending = [n for n, s in run_all.STEPS.items() if s.pending]
    return (f"`python benchmarks/run_all.py --data-dir ../shared/data --readme` regenerates every CPU result file "
            f"from nothing in about {run_all.fmt_seconds(total)} on this machine (the steps' result files' own times"
            + (f"; {guessed} steps without one yet count a guess" if guessed else "") + ")"
            + (f"; steps still without arguments: {', '.join(pending)}" if pending else "") + ".")


TABLES = {
    "sasrec": lambda: accuracy_table([("MostPop, Beauty", "mostpop_beauty"),
                                      ("SASRec (CE), Beauty", "sasrec_beauty"),
                                      ("SASRec (CE), item table from the LLM's reading of item text, Beauty",
                                       "sasrec_beauty_text_init"),
                                      ("SASRec (BCE, 1 negative), Beauty", "sasrec_beauty_bce"),
                                      ("SASRec (CE), Toys", "sasrec_toys"),
                                      ("SASRec (CE), LastFM", "sasrec_lastfm"),
                                      ("E4SRec (CPU preset), Beauty", "e4srec_beauty_cpu")]),
    "llmd4rec_beauty": lambda: distill_table("llmd4rec_beauty_cpu"),
    "llmd4rec_lastfm": lambda: distill_table("llmd4rec_lastfm_cpu"),
    "sasrec_notes": sasrec_notes,
    "llmd4rec_beauty_notes": lambda: distill_notes("llmd4rec_beauty_cpu"),
    "llmd4rec_lastfm_notes": lambda: distill_notes("llmd4rec_lastfm_cpu"),
    "llmd4rec_ml100k": lambda: distill_table("llmd4rec_ml100k_cpu"),
    "llmd4rec_ml100k_notes": lambda: controls_notes("llmd4rec_ml100k_cpu"),
    "sasrec_bf16": precision_table,
    "precision_probe": precision_probe_table,
    "teacher_ml100k": lambda: teacher_table("e4srec_text_ml100k_cpu"),
    "teacher_ml100k_notes": lambda: teacher_notes("e4srec_text_ml100k_cpu"),
    "teacher_beauty": lambda: teacher_table("e4srec_text_beauty_cpu"),
    "teacher_beauty_notes": lambda: teacher_notes("e4srec_text_beauty_cpu"),
    "llmd4rec_ml100k_deep": lambda: distill_table("llmd4rec_ml100k_deep_cpu"),
    "llmd4rec_ml100k_deep_notes": lambda: controls_notes("llmd4rec_ml100k_deep_cpu"),
    "upward_sweep": lambda: sweep_table("upward_sweep_ml100k"),
    "upward_sweep_deep": lambda: sweep_table("upward_sweep_ml100k_deep"),
    "upward_sweep_beauty_text": lambda: sweep_table("upward_sweep_beauty_text", "as the variant says; CRM: the start",
                                                    "text-initialised SASRec"),
    "upward_sweep_beauty_text_notes": lambda: sweep_notes("upward_sweep_beauty_text"),
    "teacher_beauty_tied": lambda: teacher_table("e4srec_tied_beauty_cpu"),
    "teacher_beauty_tied_notes": lambda: teacher_notes("e4srec_tied_beauty_cpu"),
    "teacher_beauty_heads": lambda: head_notes("e4srec_text_beauty_cpu", "e4srec_tied_beauty_cpu"),
    "upward_sweep_beauty_tied": lambda: sweep_table("upward_sweep_beauty_tied", "as the variant says; the E4SRec "
                                                    "with the tied head", "text-initialised SASRec"),
    "upward_sweep_beauty_tied_notes": lambda: sweep_notes("upward_sweep_beauty_tied"),
    "text_choice": text_choice_table,
    "provenance": provenance_table,
    "run_all": run_all_note,
    "speed": speed_tables,
    "serve": serve_table,
    "streaming": streaming_table,
    "sharded": sharded_table,
}


def main() -> None:
    for page in (ROOT / "README.md", ROOT / "docs" / "scaling.md"):
        text = page.read_text()
        for name, make in TABLES.items():
            text = re.sub(rf"(<!-- table:{name} -->\n)(?:.*?\n)??(<!-- /table -->)",
                          lambda m: m.group(1) + make() + "\n" + m.group(2), text, flags=re.S)
        page.write_text(text)


if __name__ == "__main__":
    main()
