"""Rewrite the README's result tables from benchmarks/results/*.json, so no number in it is typed by hand.

Each table sits between `<!-- table:NAME -->` and `<!-- /table -->`; a missing result file leaves a note.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _f(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


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


def distill_table(name: str) -> str:
    r = _load(name)
    if r is None:
        return f"`{name}.json` not run yet."
    keys = ["HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]
    out = ["| model | " + " | ".join(keys) + " | valid NDCG@10 |", "|---|" + "---|" * (len(keys) + 1)]
    for model, m in r["rows"].items():
        std = m.get("std", {}).get("test", {})
        cells = [_f(m["test"].get(k)) + (f" ± {_f(std[k])}" if k in std else "") for k in keys]
        label = f"{model} (mean of {m['seeds']} seeds ± std)" if "seeds" in m else model
        out.append(f"| {label} | " + " | ".join(cells) + f" | {_f(m['valid'].get('NDCG@10'))} |")
    return "\n".join(out) + (f"\n\nPreset `{r.get('preset', '')}` (backbone {r['config']['llm']['backbone']}, "
                              f"keep_layers={r['config']['llm']['keep_layers']}). Ablation rows report the "
                              f"distilled CRM and LLM of that run. Command: `{r['command']}`")


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


def _ndcg(r: dict | None, row: str | None = None, split: str = "test") -> float | None:
    if r is None:
        return None
    m = r["rows"].get(row) if row else r.get("metrics")
    return m[split]["NDCG@10"] if m else None


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


def _load_note(r: dict) -> str:
    m = r["machine"]
    if "loadavg_start" not in m:
        return "its result file predates the load records"
    return (f"load average {m['loadavg_start'][0]:.1f} at the start and {m['loadavg_end'][0]:.1f} at the end on "
            f"{m['cores']} cores, {m['torch_threads']} torch threads")


def distill_notes(name: str) -> str:
    r = _load(name)
    if r is None:
        return f"`{name}.json` not run yet."
    rows = r["rows"]
    out = [f"- Downward distillation: {r['config']['distill']['rounds']} rounds of the CRM teaching the LLM move "
           f"E4SRec's test NDCG@10 from {_f(_ndcg(r, 'E4SRec'))} to {_f(_ndcg(r, 'LLMD4Rec_L'))} "
           f"(SASRec: {_f(_ndcg(r, 'SASRec'))})."]
    ablations = [f"{label} at {_f(_ndcg(r, row))}" for label, row in (
        ("with one round (no loop)", "no_loop (LLM)"), ("without adaptive weights", "no_weights (LLM)"),
        ("without the embedding update", "no_embedding_update (LLM)"), ("upward only", "upward_only (LLM)"))
        if row in rows]
    if ablations:
        out.append("- The LLM ends " + ", ".join(ablations) + ".")
    base = _load("e4srec_beauty_cpu") if name == "llmd4rec_beauty_cpu" else None
    if base and base.get("run_dir") != r.get("llm_run"):
        out.append(f"- The E4SRec baseline of the table above (`e4srec_beauty_cpu.json`, test NDCG@10 "
                   f"{_f(_ndcg(base))}) is another run than this suite's starting E4SRec ({_f(_ndcg(r, 'E4SRec'))}).")
    phases = r.get("phases")
    if not phases:
        out.append("- Validation NDCG@10 per distillation phase: this result file predates their record "
                   "(`phases`, written by distill_suite.py).")
        return "\n".join(out)
    for ablation, by_phase in phases.items():
        ups = [f"{phase} {_f(v['start'])} -> {_f(v['best_distilled'])} (kept {v.get('kept', 'n/a')})"
               for phase, v in by_phase.items() if phase.endswith("-up")]
        if ups:
            out.append(f"- Upward phases of `{ablation}`, CRM validation NDCG@10 at the start -> best distilled "
                       f"epoch: " + "; ".join(ups) + ".")
    return "\n".join(out)


def controls_notes(name: str) -> str:
    """Where a CRM gain comes from, in numbers: the distilled CRM against SASRec's seed noise and every control."""
    r = _load(name)
    if r is None or "SASRec" not in r["rows"]:
        return f"`{name}.json` not run yet."
    rows = r["rows"]
    base = rows["SASRec"]
    mean, std = base["test"]["NDCG@10"], base.get("std", {}).get("test", {}).get("NDCG@10")
    bar = None if std is None else mean + 2 * std
    out = [f"- SASRec test NDCG@10 {_f(mean)}" + (f" ± {_f(std)} over {base['seeds']} seeds: a gain counts above "
                                                  f"{_f(bar)} (mean + 2 std)." if bar is not None else
                                                  " (one seed: no noise floor recorded).")]
    for row in [k for k in rows if k.startswith(("LLMD4Rec_C", "control_"))]:
        value = rows[row]["test"]["NDCG@10"]
        verdict = "" if bar is None else (" above the noise floor" if value > bar else " within or below the noise floor")
        out.append(f"- {row}: {_f(value)} (valid {_f(rows[row]['valid']['NDCG@10'])}){verdict}.")
    controls = {k: v["test"]["NDCG@10"] for k, v in rows.items() if k.startswith("control_")}
    if controls and "LLMD4Rec_C" in rows:
        best = max(controls, key=controls.get)
        diff = rows["LLMD4Rec_C"]["test"]["NDCG@10"] - controls[best]
        out.append(f"- The strongest control is {best} ({_f(controls[best])}); LLMD4Rec_C is {_f(abs(diff))} "
                   f"{'above' if diff > 0 else 'below'} it: "
                   + ("what the LLM adds beyond text and self-distillation." if diff > 0 else
                      "the gain over SASRec, if any, is explained without the LLM."))
    share = r.get("analysis", {}).get("vs_SASRec", {})
    for row in ("E4SRec", "LLMD4Rec_L", "LLMD4Rec_C"):
        if row in share:
            out.append(f"- {row} ranks the test target better than SASRec for {share[row]['better']:.1%} of users "
                       f"(worse for {share[row]['worse']:.1%}).")
    ht = r.get("analysis", {}).get("head_tail", {})
    if ht:
        out.append("- Test NDCG@10 on head / tail targets (top 20% of items by training interactions / the rest): "
                   + "; ".join(f"{k} {_f(v['head']['NDCG@10'])} / {_f(v['tail']['NDCG@10'])}" for k, v in ht.items())
                   + ".")
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


def teacher_table(name: str) -> str:
    r = _load(name)
    if r is None:
        return f"`{name}.json` not run yet."
    out = ["| model | valid NDCG@10 | test HR@10 | test NDCG@10 | test NDCG@20 | head / tail test NDCG@10 | "
           "ranks the test target better / worse than SASRec | train s |", "|---|---|---|---|---|---|---|---|"]
    for row, v in r["rows"].items():
        vs = v.get("vs_SASRec")
        share = f"{100 * vs['better']:.1f}% / {100 * vs['worse']:.1f}%" if vs else ""
        out.append(f"| {row} | {_f(v['valid']['NDCG@10'])} | {_f(v['test']['HR@10'])} | {_f(v['test']['NDCG@10'])} | "
                   f"{_f(v['test']['NDCG@20'])} | {_f(v['head']['NDCG@10'])} / {_f(v['tail']['NDCG@10'])} | "
                   f"{share} | {_f(v['train_seconds'], 0) if 'train_seconds' in v else ''} |")
    out.append(f"\nBackbone {r['backbone']}, keep_layers={r['keep_layers']}; head: the top "
               f"{100 * r['head_share_of_items']:.0f}% of items by training interactions; A+B: the product of experts "
               f"of two rows, LLM weight {r.get('ensemble_alpha', 0.5)} ({_load_note(r)}). "
               f"Command: `{r['command']}`")
    return "\n".join(out)


def teacher_notes(name: str) -> str:
    """What the teacher comparison says, in words computed from its file: which rows text helps, on validation."""
    r = _load(name)
    if r is None:
        return f"`{name}.json` not run yet."
    rows = r["rows"]
    v = {k: rows[k]["valid"]["NDCG@10"] for k in rows}
    best = max(v, key=v.get)
    out = [f"- Best on validation NDCG@10: {best} ({_f(v[best])})."]
    for plain, text in (("SASRec", "SASRec_text_init"), ("E4SRec", "E4SRec_text")):
        if plain in v and text in v:
            word = "raises" if v[text] > v[plain] else "lowers"
            out.append(f"- Text {word} {plain}'s validation NDCG@10: {_f(v[plain])} -> {_f(v[text])} (test "
                       f"{_f(rows[plain]['test']['NDCG@10'])} -> {_f(rows[text]['test']['NDCG@10'])}; tail targets "
                       f"{_f(rows[plain]['tail']['NDCG@10'])} -> {_f(rows[text]['tail']['NDCG@10'])}).")
    for k in ("E4SRec", "E4SRec_text"):
        if k in rows:
            vs = rows[k]["vs_SASRec"]
            out.append(f"- {k} ranks the test target better than SASRec for {100 * vs['better']:.1f}% of users "
                       f"(worse for {100 * vs['worse']:.1f}%): what an upward phase can hand over.")
    for k in rows:
        if "+" in k:
            crm = k.split("+")[0]
            word = "above" if v[k] > v[crm] else "not above"
            out.append(f"- The teacher {k} validates {word} {crm} alone ({_f(v[k])} against {_f(v[crm])}; test "
                       f"{_f(rows[k]['test']['NDCG@10'])} against {_f(rows[crm]['test']['NDCG@10'])}).")
    return "\n".join(out)


def text_choice_table() -> str:
    out = ["| dataset | fields / pooling | valid NDCG@10 | test NDCG@10 | seconds to read all items |",
           "|---|---|---|---|---|"]
    for name in ("text_embeddings_ml100k", "text_embeddings_beauty"):
        r = _load(name)
        if r is None:
            continue
        for k, v in r["rows"].items():
            mark = " (chosen)" if k == r["chosen_on_valid"] else ""
            out.append(f"| {r['config']['data']['name']} | {', '.join(v['fields'])} / {v['pooling']}{mark} | "
                       f"{_f(v['metrics']['valid']['NDCG@10'])} | {_f(v['metrics']['test']['NDCG@10'])} | "
                       f"{_f(v['seconds'], 0)} |")
    return "\n".join(out)


def sweep_table(name: str) -> str:
    r = _load(name)
    if r is None:
        return f"`{name}.json` not run yet."
    out = ["| upward phase (teacher: the undistilled E4SRec) | best valid NDCG@10 | its test NDCG@10 | best epoch |",
           "|---|---|---|---|",
           f"| start: SASRec (not trained further) | {_f(r['start']['valid']['NDCG@10'])} | "
           f"{_f(r['start']['test']['NDCG@10'])} | |"]
    for k, v in r["rows"].items():
        mark = " (chosen on validation)" if k == r["chosen_on_valid"] else ""
        out.append(f"| `{k}`{mark} | {_f(v['valid']['NDCG@10'])} | {_f(v['test']['NDCG@10'])} | {v['best_epoch']} |")
    return "\n".join(out) + f"\n\n{len(r['rows'])} variants run. Command: `{r['command']}`"


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
    sys.path.insert(0, str(ROOT / "benchmarks"))
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
