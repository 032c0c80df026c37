"""`make ablations`: the paper's Tables 3, 4, B, C and D as DVC experiments, and `reports/ablations.md`.

    python -m pipeline.ablations run      # queue what is missing (`dvc exp run --queue`), run the queue, report
    python -m pipeline.ablations report   # only rewrite reports/ablations.md from `dvc exp show --json`
    python -m pipeline.ablations list     # the planned experiments and their `-S` overrides

Every experiment is the default pipeline with a few params changed (`EXPERIMENTS`), named
`<table>-<row>-s<seed>`, on top of the current commit. A seed changes `sfo.seed`, `cdns.seed` and
`evaluate.seed` together (training and sampling; the data, the judges and the SFT base stay): seed 0 is the
default run. DVC reruns only the stages an experiment's params reach and restores the others from its run cache,
so the SFT base, the judges and every stage two experiments share are computed once. Experiments that already
exist on this commit with metrics are not run again; `--force` reruns them.

The SFT base and the SFT-additional control are stages of every experiment (`evaluate@sft`, `control`), so
Table 3's first two rows come with the seeds of its CDNS rows at no extra cost.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import stage
from .config import ConfigError

OUT = Path("reports/ablations.md")
SEEDS = (0, 1, 2)
MEASURES = ("dino", "clip_i", "clip_t", "id_acc", "ctx_acc")


@dataclass(frozen=True)
class Row:
    key: str                      # a short name: part of the experiment's name
    label: str                    # the paper's row
    overrides: dict               # params.yaml keys -> values; {} is the default run
    paper: tuple | None = None    # the paper's (DINO, CLIP-I, CLIP-T) where METHOD.md has them
    model: str = "sfo"            # which model of the experiment the row reads: sfo, sft or control


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    rows: tuple[Row, ...]
    seeds: tuple[int, ...]
    paper_finding: str            # what the paper reports (METHOD.md), checked by `finding`
    finding: object = field(default=None, compare=False)   # (table results) -> (reproduced?, sentence)


def defaults() -> dict:
    """params.yaml as flat dotted keys (the values every experiment starts from)."""
    path = Path("params.yaml").resolve()
    return dict(_flat_params(str(path), path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _flat_params(path: str, mtime_ns: int) -> tuple:
    params = yaml.safe_load(Path(path).read_text())
    return tuple((f"{s}.{k}", v) for s, section in params.items() for k, v in section.items())


def blur(k: float) -> dict:
    """The paper's blur radii (2.5, 5, 10, 20 at 512 px) as multiples of the default radius (the paper's 5)."""
    return {"cdns.blur_radius": round(defaults()["cdns.blur_radius"] * k, 3)}


def _means(res, row, m):
    return res[row.key][m][0]


def _beats(res, a, b, m):
    return _means(res, a, m) > _means(res, b, m)


def order_by_dino(t: Table, res) -> list[Row]:
    return sorted(t.rows, key=lambda r: -_means(res, r, "dino"))


def finding_t3(t: Table, res):
    """Reproduced: CDNS > self-play > each of the three the paper finds equal, on dino. Headline (issue): CDNS beats
    self-play and SFT-additional on dino and id_acc."""
    sft, add, dpo, sp, cdns = t.rows
    reproduced = _beats(res, cdns, sp, "dino") and all(_beats(res, sp, x, "dino") for x in (sft, add, dpo))
    headline = all(_beats(res, cdns, x, m) for x in (sp, add) for m in ("dino", "id_acc"))
    return reproduced, ("CDNS beats self-play and SFT-additional on dino and id_acc: " + ("yes" if headline else "no")
                        + " (paired over seeds, CDNS minus self-play: dino " + paired(res, cdns, sp, "dino")
                        + ", id_acc " + paired(res, cdns, sp, "id_acc") + "; minus SFT-additional: dino "
                        + paired(res, cdns, add, "dino") + ", id_acc " + paired(res, cdns, add, "id_acc")
                        + "). Dino order here: " + " > ".join(r.label for r in order_by_dino(t, res))
                        + "; the paper's: CDNS > self-play > SFT base ≈ judge DPO ≈ SFT-additional.")


def paired(res, a: Row, b: Row, m: str) -> str:
    """a minus b per seed (same seeds: the same negatives and bench samples), as mean ± SD over seeds."""
    d = [x - y for x, y in zip(res[a.key]["values"][m], res[b.key]["values"][m])]
    mean, sd, n = mean_sd(d)
    return f"{mean:+.4f} ± {sd:.4f}" if n > 1 else f"{mean:+.4f}"


def finding_tc(t: Table, res):
    """Reproduced: the paper's whole dino order. Headline (issue): N(0, 1) beats U[0, 1] on dino."""
    order, paper = order_by_dino(t, res), sorted(t.rows, key=lambda r: -r.paper[0])
    uniform, normal = t.rows[0], t.rows[1]
    return order == paper, (f"N(0, 1) beats U[0, 1] on dino: {'yes' if _beats(res, normal, uniform, 'dino') else 'no'} "
                            f"(paired over seeds: {paired(res, normal, uniform, 'dino')})."
                            " Dino order here: " + " > ".join(r.label for r in order)
                            + "; the paper's: " + " > ".join(r.label for r in paper) + ".")


def finding_best(t: Table, res, best_key: str):
    """Reproduced: the row the paper finds best is best on dino here too."""
    order = order_by_dino(t, res)
    best = next(r for r in t.rows if r.key == best_key)
    ok = order[0] == best
    return ok, (f"the paper's best row ({best.label}) is {'also' if ok else 'not'} best on dino here; dino order "
                "here: " + " > ".join(r.label for r in order) + ".")


DEFAULT = Row("cdns", "CDNS", {})
TABLES = (
    Table("t3", "Table 3: how the pairs are made", (
        Row("sft", "SFT base (no further training)", {}, (0.652, 0.795, 0.329), model="sft"),
        Row("sftadd", "SFT-additional (extra LoRA, SFT loss on positives)", {}, (0.650, 0.794, 0.330),
            model="control"),
        Row("dpo", "DPO with a judge (DINO picks the positive of two samples)", {"sfo.pairs": "judge_dpo"},
            (0.651, 0.795, 0.329)),
        Row("selfplay", "Self-play (negative: SFT sample, undegraded conditions)", {"sfo.pairs": "self_play"},
            (0.685, 0.799, 0.326)),
        Row("cdns", "CDNS", {}, (0.767, 0.834, 0.324)),
    ), SEEDS, "CDNS > self-play > SFT base ≈ judge DPO ≈ SFT-additional on DINO", finding_t3),
    Table("tc", "Table C: SFO timestep distribution", (
        Row("uniform", "U[0, 1]", {"sfo.timesteps": "uniform"}, (0.713, None, None)),
        Row("n01", "N(0, 1)", {}, (0.767, None, None)),
        Row("nm2", "N(-2, 1)", {"sfo.timestep_mu": -2.0}, (0.730, None, None)),
        Row("np2", "N(2, 1)", {"sfo.timestep_mu": 2.0}, (0.664, None, None)),
        Row("n0s05", "N(0, 0.5)", {"sfo.timestep_sigma": 0.5}, (0.750, None, None)),
    ), SEEDS, "N(0, 1) > N(0, 0.5) > N(-2, 1) > U[0, 1] > N(2, 1) on DINO", finding_tc),
    Table("t4", "Table 4: which conditions CDNS degrades", (
        Row("blur-generic", "blur + generic prompt", {"cdns.image": "blur", "cdns.text": "generic"}),
        Row("blur-perturbed", "blur + hallucinated prompt", {"cdns.image": "blur", "cdns.text": "perturbed"}),
        Row("noise-generic", "noise + generic prompt", {"cdns.image": "noise", "cdns.text": "generic"}),
        Row("semantic-generic", "semantic + generic prompt", {"cdns.image": "semantic", "cdns.text": "generic"}),
        Row("blur-none", "blur only", {"cdns.image": "blur", "cdns.text": "none"}),
        Row("none-generic", "generic prompt only", {"cdns.image": "none", "cdns.text": "generic"}),
    ), (0,), "blur + generic prompt is best", lambda t, res: finding_best(t, res, "blur-generic")),
    Table("tb", "Table B: blur radius (the paper's 2.5, 5, 10, 20 px at 512 px)", (
        Row("r0.5", "2.5 (x0.5)", {"_blur": 0.5}),
        Row("r1", "5 (x1, default)", {}),
        Row("r2", "10 (x2)", {"_blur": 2.0}),
        Row("r4", "20 (x4)", {"_blur": 4.0}),
    ), (0,), "radius 5 is best", lambda t, res: finding_best(t, res, "r1")),
    Table("td", "Table D: beta", (
        Row("b500", "500", {"loss.beta": 500.0}),
        Row("b1000", "1000 (default)", {}),
        Row("b2000", "2000", {"loss.beta": 2000.0}),
    ), (0,), "beta 1000 is best", lambda t, res: finding_best(t, res, "b1000")),
)


def overrides(row: Row, seed: int) -> dict:
    """The `-S` overrides of `row` at `seed`, without those equal to params.yaml (so that a row that is the default
    run, e.g. Table 4's blur + generic, shares the default run's experiment)."""
    out = {}
    for k, v in row.overrides.items():
        out.update(blur(v) if k == "_blur" else {k: v})
    if seed:
        out.update({"sfo.seed": seed, "cdns.seed": seed, "evaluate.seed": seed})
    base = defaults()
    unknown = sorted(k for k in out if k not in base)
    if unknown:
        raise ConfigError(f"ablations: {unknown} are not keys of params.yaml")
    return {k: v for k, v in out.items() if base[k] != v}


def exp_name(table: Table, row: Row, seed: int) -> str:
    return f"{table.key}-{row.key}-s{seed}"


def selected(tables: tuple[str, ...] | None = None) -> tuple[Table, ...]:
    keys = [t.key for t in TABLES]
    if tables and set(tables) - set(keys):
        raise ConfigError(f"ablations: unknown tables {sorted(set(tables) - set(keys))}; choose from {keys}")
    return tuple(t for t in TABLES if not tables or t.key in tables)


def planned(tables: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Experiment name -> its overrides, for the rows of `tables` (default: all). Rows whose overrides are the same
    (the default run, the SFT base and the control rows, which read other models of the same run) share one
    experiment, `default-s<seed>` for the default run, otherwise named after the first row that needs it."""
    names, wanted = {}, set()
    for t in TABLES:
        for row in t.rows:
            for seed in t.seeds:
                ov = overrides(row, seed)
                key = json.dumps(ov, sort_keys=True)
                if key not in names:
                    default = not (set(ov) - {"sfo.seed", "cdns.seed", "evaluate.seed"})
                    names[key] = (f"default-s{seed}" if default else exp_name(t, row, seed), ov)
                if t in selected(tables):
                    wanted.add(key)
    return {name: ov for key, (name, ov) in names.items() if key in wanted}


def run_name(table: Table, row: Row, seed: int) -> str:
    """The experiment that holds `row` at `seed` (shared runs: see `planned`)."""
    key = json.dumps(overrides(row, seed), sort_keys=True)
    return next(n for n, ov in planned().items() if json.dumps(ov, sort_keys=True) == key)


# ---------------------------------------------------------------------------------------------------------
# DVC
# ---------------------------------------------------------------------------------------------------------
def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p


def head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def experiments_on_head() -> tuple[dict[str, dict], set[str]]:
    """The experiments on the current commit: those done, with `reports/metrics.json` (name -> {"params",
    "metrics"}), and the names of those queued or running."""
    head_rev = head()   # a sha: dvc 3.67 resolves `--rev HEAD` to the branch's first commit after a rebase
    rows = json.loads(dvc("exp", "show", "--json", "--no-fetch", "--rev", head_rev).stdout or "[]")
    done, in_flight = {}, set()
    for baseline in rows:
        if baseline.get("rev") != head_rev:
            continue
        for exp in baseline.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") in ("queued", "running"):
                in_flight.add(exp.get("name") or "")           # a running one shows the workspace's metrics
                continue
            for rev in exp.get("revs") or []:
                if rev.get("rev") == "workspace":
                    continue
                data = rev.get("data") or {}
                metrics = ((data.get("metrics") or {}).get("reports/metrics.json") or {}).get("data")
                name = rev.get("name") or data.get("name")
                if name and metrics and not rev.get("error"):
                    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                    done.setdefault(name, {"params": params, "metrics": metrics})
    return done, in_flight - {""}


def finished() -> dict[str, dict]:
    """Experiments on the current commit that have `reports/metrics.json`: name -> {"params", "metrics"}."""
    return experiments_on_head()[0]


def worker_env(jobs: int, environ: dict, cores: int | None) -> dict:
    """The environment of the queue's workers, which their experiments' stages inherit: the interpreter's bin
    directory first on PATH (dvc.yaml calls `python`), and with several workers the cores split between them
    (`SFO_THREADS`, pipeline/stage.py), unless the caller set it: two experiments at all cores each would
    oversubscribe the machine. One thread and two give the same bytes (docs/reliability.md, Determinism)."""
    env = {**environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])}
    if jobs > 1 and not environ.get("SFO_THREADS"):
        env["SFO_THREADS"] = str(max(1, (cores or 1) // jobs))
    return env


def start_workers(jobs: int):
    """`dvc queue start -j jobs`. Its worker is a daemon that inherits the caller's stdout/stderr: capturing them
    would wait for it. Workers already running are kept (dvc names them by number and starts only the missing)."""
    env = worker_env(jobs, dict(os.environ), os.cpu_count())
    subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


STATES = ("Queued", "Running", "Success", "Failed")


def queue_status() -> tuple[str, list[tuple[str, str, str]]]:
    """`dvc queue status`: its text and (task id, name, state) per task."""
    text = dvc("queue", "status", check=False).stdout
    return text, parse_queue_status(text)


def parse_queue_status(text: str) -> list[tuple[str, str, str]]:
    """(task id, name, state) per row of `dvc queue status`, cut at the header's column offsets: an unnamed
    task's Name cell is blank, and the Created cell is one to three words."""
    lines = text.splitlines()
    header = next((line for line in lines if line.split()[:1] == ["Task"] and line.rstrip().endswith("Status")), "")
    if not header:
        return []
    name_at, created_at, status_at = (header.index(col) for col in ("Name", "Created", "Status"))
    tasks = [(line[:name_at].strip(), line[name_at:created_at].strip(), line[status_at:].strip())
             for line in lines[lines.index(header) + 1:]]
    return [t for t in tasks if t[0] and t[2] in STATES]


def process_alive(record: Path) -> bool:
    """Whether the process a dvc-task record (`{"pid": ..., "returncode": ...}`, written when it starts) names is
    still running: no return code yet, and the pid exists."""
    try:
        info = json.loads(record.read_text())
        if info.get("returncode") is not None or not info.get("pid"):
            return False
        os.kill(info["pid"], 0)
        return True
    except PermissionError:                 # alive, another user's
        return True
    except (ValueError, OSError):           # gone, or a record half-written
        return False


def task_process_alive(task: str) -> bool:
    """Whether the experiment process DVC started for a queue task (its short id) is alive. dvc-task records it
    in `.dvc/tmp/exps/run/<task id>/<task id>.json` (an internal layout of dvc 3.x): a task with no record there
    has not started its process."""
    return any(process_alive(r) for r in Path(".dvc/tmp/exps/run").glob(f"{task}*/{task}*.json"))


def worker_alive() -> bool:
    """Whether a queue worker's process is alive (dvc-task's `.dvc/tmp/exps/celery/dvc-exp-worker-*.json`): a
    worker that does not answer `dvc queue status`'s inquiry in time still counts."""
    return any(process_alive(r) for r in Path(".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.json"))


def no_worker(status: str) -> bool:
    """No queue worker: none in `dvc queue status`'s text, and no live worker process."""
    return "Worker status: 0 active, 0 idle" in status and not worker_alive()


def orphaned(tasks: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(task id, name) of the tasks shown as Running with no experiment process; orphans when there is no worker
    either. Seen on dvc 3.67 when a worker is stopped (`dvc queue stop`) just as it takes the next task: the task
    then shows Running for ever, and `dvc exp show` fails on it."""
    return [(task, name) for task, name, state in tasks if state == "Running" and not task_process_alive(task)]


def kill_orphans(orphans: list[tuple[str, str]]) -> set[str]:
    """`dvc queue kill` each (it then shows as Failed, and `dvc exp show` works again); returns their task ids."""
    for task, name in orphans:
        stage.log.warning("ablations: %s (task %s) shows Running in the DVC queue but nothing runs it; killing it",
                          name or "an unnamed experiment", task)
        dvc("queue", "kill", task)          # raises if it cannot: the loop would otherwise wait on it for ever
    return {task for task, _ in orphans}


def queue_and_run(force: bool, jobs: int, tables: tuple[str, ...] | None = None) -> list[str]:
    """Queue the planned experiments not yet on this commit, run the queue with `jobs` workers until it is empty,
    and return the names (or task ids) of this run's experiments that failed."""
    status, tasks = queue_status()
    killed = kill_orphans(orphaned(tasks) if no_worker(status) else [])  # an earlier run's: they break `exp show`
    earlier = {task for task, *_ in tasks}                # their failures are not this run's to report
    (done, in_flight), plan = experiments_on_head(), planned(tables)
    todo = {n: ov for n, ov in plan.items() if force or n not in done}
    stage.log.info("ablations: %d experiments planned, %d already on this commit, %d to run", len(plan),
                   len(plan) - len(todo), len(todo))
    if not todo:
        return []
    stale = [n for n in todo if n in done]
    if stale:                                     # --force: drop the old ones (`dvc exp run -f` would instead
        dvc("exp", "remove", *stale)              # recompute every stage of the experiment, shared ones too)

    def enqueue(name: str, check: bool = True) -> bool:
        ov = todo[name]
        p = dvc("exp", "run", "--queue", "-n", name, *[a for k, v in ov.items() for a in ("-S", f"{k}={v}")],
                check=check)
        if p.returncode:
            stage.log.warning("ablations: could not queue %s again: %s", name, p.stderr.strip()[-500:])
        return p.returncode == 0

    if in_flight & set(todo):
        stage.log.info("ablations: already in the DVC queue on this commit, not queued again: %s",
                       sorted(in_flight & set(todo)))
    for name in todo:
        if name not in in_flight:
            enqueue(name)
    start = started = time.time()
    start_workers(jobs)
    bar = stage.progress(total=len(todo), desc="ablations")
    orphan_polls = 0
    while True:
        status, tasks = queue_status()
        queued = sum(state == "Queued" for *_, state in tasks)
        running = sum(state == "Running" for *_, state in tasks)
        bar.update(len(todo) - queued - running - bar.n)
        if not queued and not running:
            break
        idle = no_worker(status)
        orphans = orphaned(tasks) if idle else []
        orphan_polls = orphan_polls + 1 if orphans else 0
        if orphan_polls >= 3:                     # three polls in a row: not a worker that is about to start it
            killed |= kill_orphans(orphans)
            for _, name in orphans:               # ours are queued again (one queued by hand is only killed)
                queued += name in todo and enqueue(name, check=False)  # fails if the experiment exists already
            orphan_polls = 0
        if queued and idle and time.time() - started > 30:
            # seen on dvc 3.67: a worker can exit with experiments still queued (e.g. after `dvc queue stop`);
            # a new one takes about 15 s to show in the status
            stage.log.warning("ablations: no DVC queue worker is left and %d experiments wait; starting one", queued)
            start_workers(jobs)
            started = time.time()
        time.sleep(10)
    bar.close()
    dvc("queue", "stop", check=False)                 # the idle worker would otherwise stay behind
    failed = [name or task for task, name, state in queue_status()[1]
              if state == "Failed" and task not in killed | earlier]
    stage.log.info("ablations: queue finished in %.1f min%s", (time.time() - start) / 60,
                   f"; failed: {failed} (see `dvc queue logs <name>`)" if failed else "")
    return failed


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd, n


def results(done: dict, tables=None) -> dict:
    """table key -> row key -> measure -> (mean, sd, n) over the seeds that finished."""
    out = {}
    for t in selected(tables):
        out[t.key] = {}
        for row in t.rows:
            vals = {m: [] for m in MEASURES}
            for seed in t.seeds:
                exp = done.get(run_name(t, row, seed))
                if exp:
                    for m in MEASURES:
                        vals[m].append(exp["metrics"][row.model][m])
            if vals["dino"]:
                out[t.key][row.key] = {m: mean_sd(v) for m, v in vals.items()}
                out[t.key][row.key]["values"] = vals          # per seed, in seed order
    return out


# The bar for the default run: (measure, test of the mean difference sfo - sft, what it says).
HEADLINE = (("dino", lambda m, sd: m >= 0.03 and m > 2 * sd, ">= +0.03 and > 2 SD"),
            ("id_acc", lambda m, sd: m >= 0.05 and m > 2 * sd, ">= +0.05 and > 2 SD"),
            ("clip_t", lambda m, sd: m >= -0.01, ">= -0.01"),
            ("ctx_acc", lambda m, sd: m >= -0.02, ">= -0.02"),
            ("clip_i", lambda m, sd: m > 0, "> 0"),
            ("subject_mse", lambda m, sd: m < 0, "< 0"))


def headline(done: dict) -> list[str]:
    """SFO minus its SFT base in the default run, per seed and over seeds, against the issue's bar."""
    runs = [done.get(f"default-s{seed}") for seed in SEEDS]
    if not all(runs):
        return ["## The default run over seeds", "", "**Incomplete:** `default-s0..2` have not all finished.", ""]
    lines = ["## The default run over seeds: SFO minus its SFT base (and the SFT-additional control)", "",
             f"Seeds {', '.join(map(str, SEEDS))} (`default-s*`): the same data, judges and SFT base; each seed "
             "its own CDNS negatives, SFO and control training and bench sampling.", "",
             "| difference | measure | " + " | ".join(f"seed {s}" for s in SEEDS) + " | mean ± SD | bar | met |",
             "|---|---|" + "---|" * len(SEEDS) + "---|---|---|"]
    for diff in ("sfo_minus_sft", "control_minus_sft"):
        for m, test, bar in HEADLINE:
            vals = [r["metrics"][diff][m] for r in runs]
            mean, sd, _ = mean_sd(vals)
            met = ("yes" if test(mean, sd) else "**no**") if diff == "sfo_minus_sft" else ""
            lines.append(f"| {diff.replace('_minus_', ' − ')} | {m} | " + " | ".join(f"{v:+.4f}" for v in vals)
                         + f" | {mean:+.4f} ± {sd:.4f} | {bar if diff == 'sfo_minus_sft' else ''} | {met} |")
    return lines + [""] + headroom(runs)


def headroom(runs: list[dict]) -> list[str]:
    """How far the SFT base is from the ground-truth renders (`oracle`: the ceiling of each measure on these
    judges), and how much of that gap SFO closes: a gain can be no larger than the gap it closes."""
    if not all("oracle" in r["metrics"] for r in runs):
        return []
    parts = []
    for m in ("dino", "id_acc"):
        gap = mean_sd([r["metrics"]["oracle"][m] - r["metrics"]["sft"][m] for r in runs])[0]
        gain = mean_sd([r["metrics"]["sfo_minus_sft"][m] for r in runs])[0]
        parts.append(f"{m}: ground truth {runs[0]['metrics']['oracle'][m]:.4f}, the SFT base {gap:.4f} below it, "
                     f"SFO closes {100 * gain / gap:.0f} % of that gap" if gap > 0 else
                     f"{m}: the SFT base already scores at or above the ground truth ({gap:+.4f})")
    return ["Headroom (`oracle` of `reports/metrics.json`, the ground-truth renders scored by the same judges; "
            "mean over the seeds): " + "; ".join(parts) + ".", ""]


def fmt(x: tuple[float, float, int], seeds: int) -> str:
    mean, sd, n = x
    return (f"{mean:.4f}" if n == 1 else f"{mean:.4f} ± {sd:.4f}") + (f" (n={n})" if n < seeds else "")


def write_report(done: dict, tables: tuple[str, ...] | None = None) -> Path:
    res = results(done, tables)
    lines = ["# Ablations: the paper's tables at embedded scale", "",
             "Written by `make ablations` (`python -m pipeline.ablations run`) from `dvc exp show`; every number is "
             "an experiment you can inspect with `dvc exp show` and rerun with `dvc exp apply <name>`. ",
             "Ours: mean ± standard deviation over the seeds listed (a seed sets `sfo.seed`, `cdns.seed` and "
             "`evaluate.seed`; the SFT base, the judges and the data are shared). The paper's numbers are "
             "DreamBench DINO / CLIP-I / CLIP-T with FLUX.1-dev (METHOD.md); ours are the embedded world's "
             "stand-ins, so compare orderings, not values.", ""]
    if not tables:
        lines += headline(done)
    for t in selected(tables):
        r = res[t.key]
        lines += [f"## {t.title}", "", f"Seeds: {', '.join(map(str, t.seeds))}. Paper: {t.paper_finding}.", "",
                  "| row | experiment | paper DINO | paper CLIP-I | paper CLIP-T | " + " | ".join(MEASURES) + " |",
                  "|---|---|---|---|---|" + "---|" * len(MEASURES)]
        for row in t.rows:
            paper = [("" if v is None else f"{v:.3f}") for v in (row.paper or (None, None, None))]
            ours = [fmt(r[row.key][m], len(t.seeds)) if row.key in r else "not run" for m in MEASURES]
            names = [run_name(t, row, seed) for seed in t.seeds]
            stem = names[0][:-1]
            where = (f"`{names[0]}`" if len(names) == 1 else
                     f"`{stem}{{{','.join(n[-1] for n in names)}}}`" if all(n[:-1] == stem for n in names)
                     else ", ".join(f"`{n}`" for n in names)) + (f" ({row.model})" if row.model != "sfo" else "")
            lines.append(f"| {row.label} | {where} | " + " | ".join(paper + ours) + " |")
        complete = all(row.key in r and r[row.key]["dino"][2] == len(t.seeds) for row in t.rows)
        if complete:
            ok, sentence = t.finding(t, r)
            lines += ["", f"**Paper's ordering reproduced: {'yes' if ok else 'no'}.** {sentence}", ""]
        else:
            lines += ["", "**Incomplete:** some experiments of this table have not finished; run `make ablations`.", ""]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    stage.log.info("ablations: wrote %s (%d experiments found)", OUT, len(done))
    return OUT


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("run", "report", "list"))
    ap.add_argument("--force", action="store_true", help="rerun experiments that already exist on this commit")
    ap.add_argument("--jobs", type=int, default=1,
                    help="queue workers (`dvc queue start -j`); with more than one, each experiment's stages get "
                         "cores/jobs torch threads unless SFO_THREADS is set")
    ap.add_argument("--tables", nargs="+", help=f"only these tables (default: all of {[t.key for t in TABLES]})")
    args = ap.parse_args(argv)
    tables = tuple(args.tables) if args.tables else None
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    if args.command == "list":
        for name, ov in planned(tables).items():
            print(name, " ".join(f"-S {k}={v}" for k, v in ov.items()), flush=True)
        return []
    if args.command == "run":
        failed = queue_and_run(args.force, args.jobs, tables)
        if failed and args.jobs > 1:   # dvc's parallel workers can fail a task as it starts (treeverse/dvc#10673)
            stage.log.warning("ablations: %d experiments failed with %d queue workers; running what is missing "
                              "again with one", len(failed), args.jobs)
            queue_and_run(False, 1, tables)
    return [write_report(finished(), tables)]


if __name__ == "__main__":
    stage.run("ablations", main)
