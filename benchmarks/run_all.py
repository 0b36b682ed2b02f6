"""Regenerate every CPU result file from nothing, in dependency order, each step chaining the run folders of the
steps before it (read from their result files) under --runs (runs/all/<step>). Paths given relative to the folder
it is started from; the steps run from the repository root.

    python benchmarks/run_all.py --data-dir ../shared/data              # everything not up to date
    python benchmarks/run_all.py --list                                 # steps, status, estimated duration
    python benchmarks/run_all.py --only sasrec_beauty e4srec_beauty_cpu --dry-run

A step is up to date, and skipped unless --force, when each of its result files exists, was written from a clean
tree whose code is the code here now (`commit`; result files and generated pages aside), and is newer (`date`) than
the result files of the steps it needs. A step that stopped resumes: a recipe benchmark continues its unfinished run
folder (`--resume`), a distillation suite its unfinished runs. --force moves the step's run folder aside first
(to <runs>/.superseded/) so nothing of an earlier attempt is read back.

Adding a step is one entry in STEPS. In a step's arguments, {data} is --data-dir, {runs} the step's run folder,
{stamp} this invocation's time, and {ref:STEP.KEY.SUBKEY} a value from STEP's (first) result file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, same_code  # noqa: E402


@dataclass(frozen=True)
class Step:
    script: str  # benchmarks/<script>
    args: tuple[str, ...]
    results: tuple[str, ...]  # result files it writes: benchmarks/results/NAME.json
    needs: tuple[str, ...] = ()
    estimate_s: int = 600  # when no result file says how long it took
    resumes_run: bool = False  # a recipe benchmark: an unfinished run folder under {runs} is continued (--resume)
    requires: str | None = None  # a path that must exist, else the step is skipped (optional step)
    pending: str | None = None  # why the step cannot run yet


def crm(config: str, name: str, estimate_s: int) -> Step:
    return Step("train_crm.py", ("--config", config, "--name", name, "data.data_dir={data}", "run_dir={runs}"),
                (name,), estimate_s=estimate_s, resumes_run=True)


TEACHER = ("waits for a distillation preset whose teacher is chosen from e4srec_text_toys_cpu.json (the teacher "
           "comparison of the same budget)")
UPWARD_VARIANTS = ("--variant", "distill.upward_init=continue distill.upward_lr=0.0001 distill.t2=0.2",
                   "--variant", "distill.upward_init=continue distill.upward_lr=0.0001 distill.t2=1.0",
                   "--variant", "distill.upward_init=scratch distill.t2=0.2",
                   "--variant", "distill.upward_init=scratch distill.t2=1.0",
                   "--variant", "distill.upward_init=scratch distill.t2=1.0 distill.teacher=ensemble",
                   "--variant", "distill.upward_init=scratch distill.t2=1.0 distill.upward_loss=rank",
                   "--variant", "distill.upward_init=scratch distill.t2=1.0 distill.teacher=ensemble "
                                "distill.upward_loss=rank")

# the text-initialised student (configs/llmd4rec/beauty_text_cpu.yaml) under two teachers: itself (the control that
# has no LLM) and its product of experts with E4SRec reading text, each under a second seed (the noise a difference
# must beat). E4SRec alone is left out: it validates far below the student's start (e4srec_text_beauty_cpu.json)
TEXT_VARIANTS = ("--variant", "distill.teacher=self",
                 "--variant", "distill.teacher=ensemble",
                 "--variant", "distill.teacher=self seed=1 crm_train.seed=1",
                 "--variant", "distill.teacher=ensemble seed=1 crm_train.seed=1")


def teacher(dataset: str, sasrec_step: str | None, estimate_s: int, head: str = "linear") -> Step:
    """benchmarks/teacher_compare.py on a dataset: SASRec (the given step's run, else its own), text-initialised
    SASRec, ID-only E4SRec and E4SRec reading item text, with the paper's item head or the tied one."""
    name = f"e4srec_{'text' if head == 'linear' else head}_{dataset}_cpu"
    crm_run = ("--crm-run", f"{{ref:{sasrec_step}.run_dir}}") if sasrec_step else ()
    return Step("teacher_compare.py", ("--config", f"configs/e4srec/{dataset}_text_cpu.yaml", "--name", name,
                                       "--runs", "{runs}", *crm_run, "data.data_dir={data}",
                                       f"llm.item_head={head}"), (name,),
                needs=(sasrec_step,) if sasrec_step else (), estimate_s=estimate_s)


DEEP_VARIANTS = ("--variant", "distill.upward_init=scratch distill.t2=1.0 distill.teacher=llm",
                 "--variant", "distill.upward_init=scratch distill.t2=1.0 distill.teacher=ensemble",
                 "--variant", "distill.upward_init=scratch distill.t2=1.0 distill.teacher=llm distill.upward_loss=rank",
                 "--variant", "distill.upward_init=scratch distill.t2=1.0 distill.teacher=ensemble "
                              "distill.upward_loss=rank")
"""The deep teacher's sweep: the fresh student at T2 = 1 of the earlier sweep, teacher LLM or ensemble, KL or rank."""
TIED_VARIANTS = ("--variant", "distill.teacher=llm", "--variant", "distill.teacher=ensemble",
                 "--variant", "distill.teacher=self")
"""The text-initialised student under the tied-head E4SRec reading text: alone, in the product of experts, and the
control without it."""

STEPS: dict[str, Step] = {
    "precision_probe": Step("precision_probe.py", ("--data-dir", "{data}"), ("precision_probe",), estimate_s=60),
    "mostpop": Step("mostpop.py", ("--dataset", "beauty", "--data-dir", "{data}"), ("mostpop_beauty",),
                    estimate_s=60),
    "sasrec_beauty": crm("configs/sasrec/beauty.yaml", "sasrec_beauty", 1700),
    "sasrec_beauty_bce": crm("configs/sasrec/beauty_bce.yaml", "sasrec_beauty_bce", 1000),
    "sasrec_toys": crm("configs/sasrec/toys.yaml", "sasrec_toys", 1200),
    "sasrec_lastfm": crm("configs/sasrec/lastfm.yaml", "sasrec_lastfm", 1000),
    **{f"sasrec_{d}_seeds": Step("train_crm.py", ("--config", f"configs/sasrec/{d}.yaml", "--name", f"sasrec_{d}_seeds",
                                                  "--seeds", "3", "data.data_dir={data}", "run_dir={runs}"),
                                 (f"sasrec_{d}_seeds",), estimate_s=1800) for d in ("beauty", "toys")},
    "sasrec_beauty_bf16": Step("sasrec_precision.py", ("--config", "configs/sasrec/beauty.yaml", "--name",
                                                       "sasrec_beauty_bf16", "data.data_dir={data}", "run_dir={runs}"),
                               ("sasrec_beauty_bf16",), estimate_s=2400),
    "text_embeddings_ml100k": Step("text_embeddings.py", ("--dataset", "ml-100k", "--data-dir", "{data}", "--name",
                                                          "text_embeddings_ml100k"), ("text_embeddings_ml100k",),
                                   estimate_s=500),
    "text_embeddings_beauty": Step("text_embeddings.py", ("--dataset", "beauty", "--data-dir", "{data}", "--name",
                                                          "text_embeddings_beauty", "--field-sets", "all"),
                                   ("text_embeddings_beauty",), estimate_s=3600),
    "sasrec_beauty_text_init": Step("train_crm.py", ("--config", "configs/sasrec/beauty.yaml", "--name",
                                                     "sasrec_beauty_text_init", "data.data_dir={data}", "run_dir={runs}",
                                                     "crm.text_init=true"), ("sasrec_beauty_text_init",),
                                    needs=("text_embeddings_beauty",), estimate_s=1700, resumes_run=True),
    "llmd4rec_ml100k_cpu": Step("distill_suite.py", (
        "--config", "configs/llmd4rec/ml100k_cpu.yaml", "--name", "llmd4rec_ml100k_cpu", "--runs", "{runs}",
        "--seeds", "3", "data.data_dir={data}", "--only", "full", "control_beta0", "control_self",
        "control_text_init", "control_text_self", "upward_only"), ("llmd4rec_ml100k_cpu",),
        needs=("text_embeddings_ml100k",), estimate_s=3600),
    "upward_sweep_ml100k_deep": Step("upward_sweep.py", (
        "--config", "configs/llmd4rec/ml100k_deep_cpu.yaml", "--name", "upward_sweep_ml100k_deep", "--runs", "{runs}",
        "--crm-run", "{ref:e4srec_text_ml100k_cpu.runs.SASRec}",
        "--llm-run", "{ref:e4srec_text_ml100k_cpu.runs.E4SRec}", *DEEP_VARIANTS, "data.data_dir={data}"),
        ("upward_sweep_ml100k_deep",), needs=("e4srec_text_ml100k_cpu",), estimate_s=1800),
    "llmd4rec_ml100k_deep_cpu": Step("distill_suite.py", (
        "--config", "configs/llmd4rec/ml100k_deep_cpu.yaml", "--name", "llmd4rec_ml100k_deep_cpu", "--runs", "{runs}",
        "--crm-run", "{ref:e4srec_text_ml100k_cpu.runs.SASRec}",
        "--llm-run", "{ref:e4srec_text_ml100k_cpu.runs.E4SRec}", "--seeds", "3", "data.data_dir={data}",
        "--only", "full", "control_beta0", "control_self", "control_text_init", "control_text_self", "upward_only"),
        ("llmd4rec_ml100k_deep_cpu",), needs=("e4srec_text_ml100k_cpu",), estimate_s=2400),
    "upward_sweep_ml100k": Step("upward_sweep.py", (
        "--config", "configs/llmd4rec/ml100k_cpu.yaml", "--name", "upward_sweep_ml100k", "--runs", "{runs}",
        "--crm-run", "{ref:llmd4rec_ml100k_cpu.crm_run}", "--llm-run", "{ref:llmd4rec_ml100k_cpu.llm_run}",
        *UPWARD_VARIANTS, "data.data_dir={data}"), ("upward_sweep_ml100k",), needs=("llmd4rec_ml100k_cpu",),
        estimate_s=1800),
    "e4srec_beauty_cpu": Step("train_llm.py", ("--config", "configs/e4srec/beauty_cpu.yaml", "--name",
                                               "e4srec_beauty_cpu", "crm_run={ref:sasrec_beauty.run_dir}",
                                               "data.data_dir={data}", "run_dir={runs}"),
                              ("e4srec_beauty_cpu",), needs=("sasrec_beauty",), estimate_s=400, resumes_run=True),
    "e4srec_text_ml100k_cpu": teacher("ml100k", None, 3000),
    "e4srec_text_beauty_cpu": teacher("beauty", "sasrec_beauty", 14400),
    "e4srec_text_toys_cpu": teacher("toys", "sasrec_toys", 14400),
    "e4srec_tied_beauty_cpu": teacher("beauty", "sasrec_beauty", 3600, head="tied"),
    "upward_sweep_beauty_text": Step("upward_sweep.py", (
        "--config", "configs/llmd4rec/beauty_text_cpu.yaml", "--name", "upward_sweep_beauty_text", "--runs", "{runs}",
        "--crm-run", "{ref:e4srec_text_beauty_cpu.runs.SASRec_text_init}",
        "--llm-run", "{ref:e4srec_text_beauty_cpu.runs.E4SRec_text}", *TEXT_VARIANTS, "data.data_dir={data}"),
        ("upward_sweep_beauty_text",), needs=("e4srec_text_beauty_cpu",), estimate_s=3600),
    "upward_sweep_beauty_tied": Step("upward_sweep.py", (
        "--config", "configs/llmd4rec/beauty_text_cpu.yaml", "--name", "upward_sweep_beauty_tied", "--runs", "{runs}",
        "--crm-run", "{ref:e4srec_tied_beauty_cpu.runs.SASRec_text_init}",
        "--llm-run", "{ref:e4srec_tied_beauty_cpu.runs.E4SRec_text}", *TIED_VARIANTS, "data.data_dir={data}",
        "llm.item_head=tied"), ("upward_sweep_beauty_tied",), needs=("e4srec_tied_beauty_cpu",), estimate_s=3600),
    "llmd4rec_beauty_cpu": Step("distill_suite.py", (
        "--config", "configs/llmd4rec/beauty_cpu.yaml", "--name", "llmd4rec_beauty_cpu", "--runs", "{runs}",
        "--crm-run", "{ref:sasrec_beauty.run_dir}", "--llm-run", "{ref:e4srec_beauty_cpu.run_dir}",
        "data.data_dir={data}", "--only", "full", "no_loop", "no_weights", "no_embedding_update", "upward_only"),
        ("llmd4rec_beauty_cpu",), needs=("sasrec_beauty", "e4srec_beauty_cpu"), estimate_s=9000),
    "llmd4rec_toys_cpu": Step("distill_suite.py", (), ("llmd4rec_toys_cpu",), needs=("sasrec_toys",),
                              estimate_s=9000, pending=TEACHER),
    "llmd4rec_lastfm_cpu": Step("distill_suite.py", (
        "--config", "configs/llmd4rec/lastfm_cpu.yaml", "--name", "llmd4rec_lastfm_cpu", "--runs", "{runs}",
        "--crm-run", "{ref:sasrec_lastfm.run_dir}", "data.data_dir={data}", "--only", "full", "no_loop",
        "upward_only"), ("llmd4rec_lastfm_cpu",), needs=("sasrec_lastfm",), estimate_s=1300),
    "eval_speed": Step("eval_speed.py", ("--dataset", "beauty", "--data-dir", "{data}"), ("eval_speed_beauty",),
                       estimate_s=120),
    "upward_cache_speed": Step("upward_cache_speed.py", (
        "--crm-run", "{ref:llmd4rec_lastfm_cpu.crm_run}", "--llm-run", "{ref:llmd4rec_lastfm_cpu.llm_run}"),
        ("upward_cache_speed",), needs=("llmd4rec_lastfm_cpu",), estimate_s=300),
    "serve_latency": Step("serve_latency.py", (
        "--from-run", "beauty-sasrec={ref:sasrec_beauty.run_dir}",
        "--from-run", "lastfm-sasrec={ref:sasrec_lastfm.run_dir}",
        "--from-run", "lastfm-llmd4rec_c={ref:llmd4rec_lastfm_cpu.runs.full}:crm",
        "--from-run", "beauty-e4srec={ref:e4srec_beauty_cpu.run_dir}",
        "--bundle-dir", "{runs}/bundles-{stamp}", "--concurrency", "1", "8", "32", "--requests", "600",
        "--duration-limit", "30", "--data-dir", "{data}"),
        ("serve_latency",), needs=("sasrec_beauty", "sasrec_lastfm", "llmd4rec_lastfm_cpu", "e4srec_beauty_cpu"),
        estimate_s=600),
    "e4srec_speed": Step("e4srec_speed.py", ("--data-dir", "{data}", "--layers", "30", "--batch", "16",
                                             "--users", "64"), ("e4srec_speed",), estimate_s=300),
    "fault_injection": Step("fault_injection.py", ("--faults", "20", "--seed", "0", "--data-dir", "{data}"),
                            ("fault_injection",), estimate_s=1200),
    "sharded_llm_cpu": Step("sharded_llm.py", (
        "--nproc", "2", "--hidden", "128", "--layers", "4", "--heads", "4", "--kv-heads", "2", "--intermediate",
        "256", "--dtype", "float32", "--users", "300", "--items", "200", "--epochs", "2", "--batch-size", "64",
        "--work-dir", "{runs}", "--name", "sharded_llm_cpu"), ("sharded_llm_cpu",), estimate_s=400),
    "sharded_llm_cpu_bf16": Step("sharded_llm.py", (
        "--nproc", "2", "--hidden", "128", "--layers", "4", "--heads", "4", "--kv-heads", "2", "--intermediate",
        "256", "--dtype", "bfloat16", "--users", "300", "--items", "200", "--epochs", "2", "--batch-size", "64",
        "--work-dir", "{runs}", "--name", "sharded_llm_cpu_bf16"), ("sharded_llm_cpu_bf16",), estimate_s=400),
    "chunked_ce_memory": Step("chunked_ce_memory.py", (), ("chunked_ce_memory",), estimate_s=300),
    "recbole": Step("recbole_compare.py", ("--data-dir", "{data}", "--dataset", "beauty", "--epochs", "40",
                                           "--target-ndcg", "0.05", "--stop-at-target"),
                    ("sasrec_vs_recbole",), estimate_s=7200, requires=".venv-recbole/bin/python"),
}
"""Every CPU benchmark, in the order run_all runs them (each after the steps it needs)."""


def load_result(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def seconds_of(result: dict) -> float | None:
    """How long a result took: the larger of its own wall time and the run time it reports (a suite that read
    back runs finished by an earlier invocation reports theirs in total_seconds)."""
    parts = result.get("seconds")
    times = [result.get("wall_seconds"), result.get("total_seconds"),
             sum(parts.values()) if isinstance(parts, dict) else None]
    times = [t for t in times if isinstance(t, (int, float))]
    return max(times) if times else None


def estimate(name: str) -> tuple[float, bool]:
    """(seconds, measured): the step's result files' times where they all say, else the table's estimate."""
    times = [seconds_of(r) if (r := load_result(res)) else None for res in STEPS[name].results]
    if times and all(t is not None for t in times):
        return sum(times), True
    return STEPS[name].estimate_s, False


def _date(result: dict) -> datetime | None:
    try:
        return datetime.strptime(result["date"], "%Y-%m-%dT%H:%M:%S%z")
    except (KeyError, TypeError, ValueError):
        return None


def stale_reason(name: str) -> str | None:
    """None when the step is up to date, else why it is not."""
    newest_need = [_date(r) for need in STEPS[name].needs for res in STEPS[need].results if (r := load_result(res))]
    for res in STEPS[name].results:
        r = load_result(res)
        if r is None:
            return f"no {res}.json"
        if r.get("commit") is None:
            return f"{res}.json records no commit"
        if r.get("dirty") is not False:
            return f"{res}.json was not written from a clean tree"
        if not same_code(r.get("commit")):
            return f"{res}.json was written by other code ({str(r.get('commit'))[:10]})"
        when = _date(r)
        if when is None or any(d is None or d > when for d in newest_need):
            return f"{res}.json is older than a result it builds on"
    return None


def _lookup(ref: str) -> str:
    step, *keys = ref.split(".")
    if step not in STEPS:
        raise SystemExit(f"unknown step '{step}' in {{ref:{ref}}}")
    value = load_result(STEPS[step].results[0])
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        raise SystemExit(f"{{ref:{ref}}}: {STEPS[step].results[0]}.json has no such value; run step '{step}' first")
    return str(value)


def command(name: str, data: str, runs: Path, stamp: str, dry: bool = False, to_run: set[str] = frozenset()
            ) -> list[str]:
    """The step's command line. In a dry run a reference to a step that runs first (`to_run`), or to a value not
    there yet, prints as <STEP.KEY>."""
    def fill(arg: str) -> str:
        arg = arg.replace("{data}", data).replace("{runs}", os.path.relpath(runs / name, ROOT))
        arg = arg.replace("{stamp}", stamp)

        def ref(m: re.Match) -> str:
            if dry and m.group(1).split(".")[0] in to_run:
                return f"<{m.group(1)}>"
            try:
                return _lookup(m.group(1))
            except SystemExit:
                if dry:
                    return f"<{m.group(1)}>"
                raise
        return re.sub(r"\{ref:([\w.]+)\}", ref, arg)

    step = STEPS[name]
    cmd = ["python", f"benchmarks/{step.script}", *(fill(a) for a in step.args)]
    unfinished = unfinished_run(runs / name) if step.resumes_run else None
    return cmd + (["--resume", os.path.relpath(unfinished, ROOT)] if unfinished else [])


def unfinished_run(folder: Path) -> Path | None:
    """The newest run folder under `folder` that began (config.yaml) but never finished (results.json)."""
    runs = sorted((p for p in folder.glob("*/config.yaml") if not (p.parent / "results.json").exists()),
                  key=lambda p: p.stat().st_mtime)
    return runs[-1].parent if runs else None


def order(selected: list[str]) -> list[str]:
    """The selected steps in STEPS order (which lists every step after the steps it needs)."""
    return [name for name in STEPS if name in selected]


def fmt_seconds(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def total_estimate() -> tuple[float, int]:
    """Seconds for every runnable step, and how many of them have no measured time yet."""
    runnable = [n for n, s in STEPS.items() if s.pending is None]
    times = [estimate(n) for n in runnable]
    return sum(t for t, _ in times), sum(not measured for _, measured in times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--runs", default="runs/all", help="run folders: <runs>/<step>")
    p.add_argument("--only", nargs="+", metavar="STEP", help="these steps only (their needs must have results)")
    p.add_argument("--force", action="store_true", help="run the selected steps even if up to date")
    p.add_argument("--list", action="store_true", help="list the steps with their status and estimated duration")
    p.add_argument("--dry-run", action="store_true", help="print the commands that would run")
    p.add_argument("--keep-going", action="store_true", help="after a failed step, go on with the others")
    p.add_argument("--readme", action="store_true", help="rewrite the README tables at the end")
    args = p.parse_args()
    if unknown := [n for n in args.only or [] if n not in STEPS]:
        p.error(f"unknown steps {unknown}; the steps are: {', '.join(STEPS)}")
    selected = order(args.only or list(STEPS))
    data, runs = (os.path.relpath(Path(x).resolve(), ROOT) for x in (args.data_dir, args.runs))
    runs, stamp = ROOT / runs, time.strftime("%Y%m%d-%H%M%S")

    if args.list:
        for name in selected:
            step = STEPS[name]
            seconds, measured = estimate(name)
            status = (f"pending: {step.pending}" if step.pending else
                      f"optional, needs {step.requires}" if step.requires and not (ROOT / step.requires).exists()
                      else f"stale: {reason}" if (reason := stale_reason(name)) else "up to date")
            print(f"{name:24s} {fmt_seconds(seconds):>8s}{'' if measured else ' (guess)':8s} {status}")
        total, guessed = total_estimate()
        print(f"all runnable steps: about {fmt_seconds(total)}" + (f" ({guessed} guessed)" if guessed else ""))
        return

    failed, will_run = [], set()
    for name in selected:
        step = STEPS[name]
        if step.pending:
            print(f"== {name}: skipped ({step.pending})", flush=True)
            continue
        if step.requires and not (ROOT / step.requires).exists():
            print(f"== {name}: skipped (needs {step.requires})", flush=True)
            continue
        reason = stale_reason(name)
        if reason is None and not args.force:
            print(f"== {name}: up to date", flush=True)
            continue
        if args.force and (runs / name).exists() and not args.dry_run:
            aside = runs / ".superseded" / f"{name}-{stamp}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(runs / name), str(aside))
        cmd = command(name, data, runs, stamp, dry=args.dry_run, to_run=will_run)
        will_run.add(name)
        print(f"== {name} ({'forced' if reason is None else reason}; about {fmt_seconds(estimate(name)[0])})\n"
              f"{shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        (runs / name).mkdir(parents=True, exist_ok=True)
        code = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT).returncode
        if code != 0:
            failed.append(name)
            print(f"== {name} failed (exit code {code})", flush=True)
            if not args.keep_going:
                break
    if args.readme and not args.dry_run:
        subprocess.run([sys.executable, "benchmarks/readme_tables.py"], cwd=ROOT, check=True)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
