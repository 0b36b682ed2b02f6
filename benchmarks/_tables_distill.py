"""The README's tables and notes on model quality beyond plain SASRec: the distillation suites and their controls,
the teacher comparison, the item-text choice and the upward-phase sweep."""

from __future__ import annotations

from _tables_common import _f, _load, _load_note, _ndcg


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


def head_notes(linear: str, tied: str) -> str:
    """The same teacher comparison with the paper's item head and the tied one: what the head changes, row by row."""
    a, b = _load(linear), _load(tied)
    if a is None or b is None:
        return f"`{linear}.json` or `{tied}.json` not run yet."
    out = []
    for row in ("E4SRec", "E4SRec_text"):
        x, y = a["rows"][row], b["rows"][row]
        out.append(f"- {row}, linear -> tied head: valid NDCG@10 {_f(x['valid']['NDCG@10'])} -> "
                   f"{_f(y['valid']['NDCG@10'])}, test {_f(x['test']['NDCG@10'])} -> {_f(y['test']['NDCG@10'])}, "
                   f"tail targets {_f(x['tail']['NDCG@10'])} -> {_f(y['tail']['NDCG@10'])}.")
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


def sweep_table(name: str, teacher: str = "the undistilled E4SRec", start: str = "SASRec") -> str:
    r = _load(name)
    if r is None:
        return f"`{name}.json` not run yet."
    out = [f"| upward phase (teacher: {teacher}) | best valid NDCG@10 | its test NDCG@10 | best epoch |",
           "|---|---|---|---|",
           f"| start: {start} (not trained further) | {_f(r['start']['valid']['NDCG@10'])} | "
           f"{_f(r['start']['test']['NDCG@10'])} | |"]
    for k, v in r["rows"].items():
        mark = " (chosen on validation)" if k == r["chosen_on_valid"] else ""
        out.append(f"| `{k}`{mark} | {_f(v['valid']['NDCG@10'])} | {_f(v['test']['NDCG@10'])} | {v['best_epoch']} |")
    return "\n".join(out) + f"\n\n{len(r['rows'])} variants run. Command: `{r['command']}`"


def sweep_notes(name: str) -> str:
    """Which variants pass the start on validation, and the spread of each teacher over its seeds."""
    r = _load(name)
    if r is None:
        return f"`{name}.json` not run yet."
    start = r["start"]["valid"]["NDCG@10"]
    rows = r["rows"]
    above = [k for k, v in rows.items() if v["valid"]["NDCG@10"] > start]
    out = [f"- Best on validation: `{r['chosen_on_valid']}`; past the start ({_f(start)}) on validation: "
           + (", ".join(f"`{k}`" for k in above) or "none") + "."]
    by_teacher: dict[str, list] = {}
    for k, v in rows.items():
        teacher = next((w.split("=")[1] for w in k.split() if w.startswith("distill.teacher=")), "llm")
        by_teacher.setdefault(teacher, []).append(v)
    for teacher, vs in by_teacher.items():
        valid = [v["valid"]["NDCG@10"] for v in vs]
        test = [v["test"]["NDCG@10"] for v in vs]
        out.append(f"- teacher={teacher}: {len(vs)} run(s), valid NDCG@10 {_f(min(valid))}-{_f(max(valid))}, "
                   f"test {_f(min(test))}-{_f(max(test))}.")
    return "\n".join(out)
