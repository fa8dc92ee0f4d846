"""Markdown for a bench run: the tables (stdout), the targets of issue 9 with PASS/FAIL, the
before/after table and bench/RESULTS.md as a whole. Pure functions of the results dict that
bench/run.py builds (var/bench/results.json holds it), so a report can be rendered again:

    .venv/bin/python -m bench.report var/bench/results.json --baseline bench/baseline.json > /tmp/RESULTS.md
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
from typing import Any

# The figures bench/RESULTS.md held before issue 9 (moto 5.2.5, 300 tasks per run, 100 counted,
# backlog 100, concurrency 4, prefetch 1, polling_interval 0.05 s), kept as the oldest "before".
MOTO_ERA = {
    "label": "bench/RESULTS.md before issue 9 (moto 5.2.5, 300 tasks a run, a backlog of 100, Postgres)",
    "e2e_ratio": 0.37, "drain_ratio": 1.28, "ceiling": None,
    "e2e_plain": 88.6, "e2e_product": 33.2, "drain_plain": 55.0, "drain_product": 70.4,
    "req_submit_many": 1.56, "req_single": None, "req_plain": 3.00,
    "pg_worker": 8.08, "pg_single_submit": 8.05,
    "idle_product": None, "idle_plain": None,
    "lat_done_diff_median_s": None, "lat_done_diff_p95_s": None,
}
MOTO_ERA_NOTES = (
    "End to end 33.2 vs 88.6 tasks/s (0.37x; SQLite 0.39x); a backlog of 100 drained at 70.4 vs 55.0 tasks/s "
    "(1.28x; SQLite 0.98x). SQS requests per task 1.56 with submit_many on Postgres (1.75 on SQLite; 1.35 in "
    "the run before at polling_interval 0.25 s), plain Celery 3.00 (2.84 in that earlier run). 8 Postgres round "
    "trips per task in the worker (ping, BEGIN, statement, COMMIT, twice) and 8.05 per single submit() "
    "(the same for mark_queued after the commit). Idle cost and task latency were not measured; caller-side "
    "submit() took 7.6 ms against 4.7 ms for .delay().")

TARGETS = {  # key: (text, comparison, threshold)
    "req_submit_many": ("SQS requests per task at steady load, Outbox.submit_many", "<=", 0.35),
    "req_single": ("SQS requests per task at steady load, single submit() coalesced (as .delay())", "<=", 1.2),
    "e2e_ratio": ("End-to-end throughput vs plain Celery", ">=", 2.0),
    "drain_ratio": ("Worker-only drain vs plain Celery", ">=", 2.0),
    "ceiling": ("One worker's ceiling (worker-only drain of the big backlog), tasks/s", ">=", 250.0),
    "pg_worker": ("Postgres round trips per task in the worker", "<=", 3.0),
    "pg_single_submit": ("Postgres round trips per single submit()", "<=", 4.0),
    "idle_product": ("Idle SQS requests per queue per worker-hour", "<=", 190.0),
    "lat_start_diff_median_s": ("Light load, submit -> task start, median: minus plain's (s)", "<=", 0.2),
    "lat_start_diff_p95_s": ("Light load, submit -> task start, p95: minus plain's (s)", "<=", 0.2),
    "lat_done_diff_median_s": ("Light load, submit -> done, median: minus plain's (s)", "<=", 0.2),
    "lat_done_diff_p95_s": ("Light load, submit -> done, p95: minus plain's (s)", "<=", 0.2),
}


# --- Figures ---------------------------------------------------------------------------------------

def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def product_case(results: dict) -> str | None:
    names = list(results.get("cases", {}))
    return "postgres" if "postgres" in names else next((n for n in names if n != "plain"), None)


def _rate(runs: list[dict]) -> float | None:
    return _median([r["tasks_per_s"] for r in runs]) if runs else None


def per_task(counted: dict, side: str, prefix_pg: bool) -> dict[str, float]:
    """{action: count per task} of one side of a counted run, SQS or Postgres ("pg ..." keys)."""
    n = counted["tasks"]
    return {k: v / n for k, v in counted.get(side, {}).items() if k.startswith("pg ") == prefix_pg}


def sqs_total(counted: dict) -> float:
    return sum(per_task(counted, "submit", False).values()) + sum(per_task(counted, "worker", False).values())


def idle_per_hour(idle: dict) -> float | None:
    """Requests per worker-hour: (n - 1) over first-to-last request (exact for a periodic poll,
    which a fixed window would count +-1), else n over the window."""
    if not idle:
        return None
    n, span = idle["requests"], idle.get("first_to_last_s")
    if n >= 3 and span:
        return (n - 1) / span * 3600
    return n / idle["window_s"] * 3600


def figures(results: dict) -> dict[str, Any]:
    """The headline figures of a run (what the targets and the before/after table read)."""
    p = product_case(results)
    out: dict[str, Any] = {}
    thr, drn = results.get("throughput", {}), results.get("drain", {})
    out["e2e_plain"], out["e2e_product"] = _rate(thr.get("plain", [])), _rate(thr.get(p, []))
    out["drain_plain"], out["drain_product"] = _rate(drn.get("plain", [])), _rate(drn.get(p, []))
    out["e2e_ratio"] = out["e2e_product"] / out["e2e_plain"] if out["e2e_plain"] and out["e2e_product"] else None
    out["drain_ratio"] = (out["drain_product"] / out["drain_plain"]
                          if out["drain_plain"] and out["drain_product"] else None)
    # The second baseline (plain Celery at the product's own prefetch multiplier): reported beside
    # the targets, which are measured against `plain` (see METHOD).
    out["e2e_plain_tuned"] = _rate(thr.get("plain_tuned", []))
    out["drain_plain_tuned"] = _rate(drn.get("plain_tuned", []))
    out["e2e_ratio_tuned"] = (out["e2e_product"] / out["e2e_plain_tuned"]
                              if out["e2e_plain_tuned"] and out["e2e_product"] else None)
    out["drain_ratio_tuned"] = (out["drain_product"] / out["drain_plain_tuned"]
                                if out["drain_plain_tuned"] and out["drain_product"] else None)
    ceiling = results.get("ceiling", {}).get(p)
    out["ceiling"] = ceiling["tasks_per_s"] if ceiling else None
    counted = results.get("counted", {})
    many, single, plain = counted.get(f"{p}: submit_many"), counted.get(f"{p}: submit"), counted.get("plain: delay")
    # The target is for single submits coalesced where the caller allows it (issue 9): the
    # submit_coalesced run (DELAY_LINGER, as .delay() does); the uncoalesced run is in the table.
    coalesced = counted.get(f"{p}: submit_coalesced")
    out["req_submit_many"] = sqs_total(many) if many else None
    out["req_single"] = sqs_total(coalesced or single) if (coalesced or single) else None
    out["req_single_uncoalesced"] = sqs_total(single) if single else None
    out["req_plain"] = sqs_total(plain) if plain else None
    reference = counted.get("reference: batch")
    out["receives_submit_many"] = per_task(many, "worker", False).get("ReceiveMessage") if many else None
    out["receives_reference"] = per_task(reference, "worker", False).get("ReceiveMessage") if reference else None
    # The least any consumer that starts each task as soon as it arrives can make on this traffic:
    # one send and one delete per batch, and the receives the emulator made the reference take.
    out["req_floor_submit_many"] = (2 / reference["chunk"] + out["receives_reference"]
                                    if reference and out["receives_reference"] is not None else None)
    has_pg = p == "postgres"
    out["pg_worker"] = sum(per_task(many, "worker", True).values()) if many and has_pg else None
    out["pg_single_submit"] = sum(per_task(single, "submit", True).values()) if single and has_pg else None
    idle = results.get("idle", {})
    out["idle_plain"] = idle_per_hour(idle.get("plain", {}))
    out["idle_product"] = idle_per_hour(idle.get(p, {})) if idle.get(p) else None
    if out["idle_product"] is not None:
        out["idle_product"] /= idle[p].get("queues", 1)
    if out["idle_plain"] is not None:
        out["idle_plain"] /= idle["plain"].get("queues", 1)
    lat = results.get("latency", {})
    for what in ("start", "done"):
        key = "started" if what == "start" else "done"
        for stat in ("median", "p95"):
            a, b = lat.get(p, {}).get(key), lat.get("plain", {}).get(key)
            out[f"lat_{what}_diff_{stat}_s"] = a[f"{stat}_s"] - b[f"{stat}_s"] if a and b else None
    return out


def baseline_figures(results: dict) -> dict:
    m = results["machine"]
    return {"label": run_label(results),
            "date": run_date(results), "emulator": m["emulator"], "runtime": m.get("runtime", {}),
            "tasks": results["parameters"]["tasks"], **figures(results)}


def targets(results: dict) -> list[tuple[str, str, Any, str]]:
    """(what, target, measured, PASS/FAIL/n/a)."""
    f = figures(results)
    rows = []
    for key, (text, op, threshold) in TARGETS.items():
        value = f.get(key)
        if value is None:
            verdict = "n/a"
        else:
            ok = value <= threshold if op == "<=" else value >= threshold
            verdict = "PASS" if ok else "FAIL"
        if key in ("e2e_ratio", "drain_ratio") and results["parameters"]["tasks"] < 1000 and verdict != "n/a":
            verdict += " (fewer than 1,000 tasks: not the target's size)"
        rows.append((text, f"{op} {threshold:g}", value, verdict))
    return rows


# --- Formatting ------------------------------------------------------------------------------------

def _f(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _fig(key: str, value: float | None) -> str:
    """A headline figure: latency differences in seconds to the ms, rates to 0.1, the rest to 0.01."""
    if key.startswith("lat_"):
        return _f(value, 3)
    if key in ("ceiling", "idle_product", "idle_plain") or key.startswith(("e2e_p", "drain_p")):
        return _f(value, 1)
    return _f(value)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f}"


def _by_action(c: dict[str, float]) -> str:
    """"total (action n, ...)"; actions below 0.005 per task (a pool child's first connection...)
    are summed as "other"."""
    if not c:
        return "0"
    shown = sorted(((k, v) for k, v in c.items() if v >= 0.005), key=lambda kv: -kv[1])
    rest = sum(v for v in c.values() if v < 0.005)
    parts = [f"{k.removeprefix('pg ')} {v:.2f}" for k, v in shown] + ([f"other {rest:.3f}"] if rest else [])
    return f"{sum(c.values()):.2f} ({', '.join(parts)})"


def _all_rates(runs: list[dict]) -> str:
    return ", ".join(f"{r['tasks_per_s']:.1f}" for r in runs)


def _label(results: dict, name: str) -> str:
    return results.get("cases", {}).get(name, name)


def machine_line(results: dict) -> str:
    m = results["machine"]
    runtime = m.get("runtime", {})
    where = runtime.get("pcelery_path", "?")
    if runtime.get("commit"):
        where += f" (git {runtime['commit']}{', with uncommitted changes' if runtime.get('runtime_modified') else ''})"
    load = ", ".join(f"{x:.2f}" for x in m["load_average_at_start"])
    return (f"{m['nproc']} CPUs, Python {m['python']}, celery {m['celery']}, kombu {m['kombu']}, boto3 {m['boto3']}, "
            f"SQS emulator {m['emulator']}, SQLAlchemy {m['sqlalchemy']}, psycopg {m['psycopg']}, "
            f"SQLite {m['sqlite']}, Postgres {m['postgres']}; load average at start {load}; runtime measured: "
            f"pcelery from {where}")


def settings_line(results: dict) -> str:
    s, p = results["settings"], results["parameters"]
    own = ", ".join(f"{k} {v}" for k, v in s.get("product_only_options", {}).items())
    plain = p.get("plain_prefetch_multiplier") or s["prefetch_multiplier"]
    return (f"both apps: concurrency {p['concurrency']}, prefetch multiplier {s['prefetch_multiplier']} (the product) "
            f"and {plain} (plain Celery: see --plain-prefetch-multiplier"
            + (f"; {s['prefetch_multiplier']} for the second plain baseline"
               if "plain_tuned" in results.get("cases", {}) else "") + f"), acks_late {s['acks_late']}, "
            f"long poll {s['wait_time_seconds']} s, polling_interval "
            f"{s['polling_interval']} s (read from pcelery.celeryconfig's app_settings and worker_settings as "
            "the product's worker computes them)" + (f"; the product's own channel also reads {own}" if own else ""))


def kombu_cap(results: dict) -> float | None:
    """Plain Celery's refill cap: kombu refills a full worker's free slots only every
    polling_interval, at most prefetch messages per interval (FIELD-NOTES). The product's channel
    looks for a batch's worth of free slots every PersistentChannel.REFILL_RECHECK instead."""
    s, p = results["settings"], results["parameters"]
    plain_multiplier = p.get("plain_prefetch_multiplier") or s.get("prefetch_multiplier")
    if not s.get("polling_interval") or not plain_multiplier:
        return None
    return p["concurrency"] * plain_multiplier / s["polling_interval"]


def tables(results: dict, baseline: dict | None = None, *, header: bool = True) -> str:
    p = results["parameters"]
    prod = product_case(results)
    out: list[str] = []
    add = out.append
    if header:
        add(f"machine: {machine_line(results)}")
        add(f"settings: {settings_line(results)}")
        add("")
    add("### Targets (issue 9)")
    add("")
    add("| target | wanted | measured | verdict |")
    add("|---|---|---|---|")
    for (text, wanted, value, verdict), key in zip(targets(results), TARGETS, strict=True):
        add(f"| {text} | {wanted} | {_fig(key, value)} | {verdict} |")
    add("")
    f = figures(results)
    if f.get("req_floor_submit_many") is not None and f.get("req_submit_many") is not None:
        reference = results["counted"]["reference: batch"]
        add(f"The floor under the first line on this emulator, measured in this run: "
            f"{f['req_floor_submit_many']:.3f} requests per task (one SendMessageBatch and one DeleteMessageBatch "
            f"per {reference['chunk']} tasks, and the {f['receives_reference']:.3f} ReceiveMessage per task that a "
            f"reference consumer, bare boto3 with no product, needed on the same traffic; its receives returned "
            f"{_sizes(reference)} messages). The product's worker made {_f(f.get('receives_submit_many'), 3)} "
            f"ReceiveMessage per task. See \"Where the time goes\".")
        add("")
    if f.get("drain_ratio_tuned") is not None:
        add(f"Against the second baseline, {_label(results, 'plain_tuned')}, in this run: end to end "
            f"{_f(f.get('e2e_ratio_tuned'))}x ({_f(f.get('e2e_plain_tuned'), 1)} tasks/s), worker-only drain "
            f"{_f(f.get('drain_ratio_tuned'))}x ({_f(f.get('drain_plain_tuned'), 1)} tasks/s). The targets are "
            f"measured against {_label(results, 'plain')}: see Method.")
        add("")
    add("### Before / after")
    add("")
    columns = [("moto era", MOTO_ERA)] + ([("before (bench/baseline.json)", baseline)] if baseline else []) + [
        ("this run", figures(results))]
    add("| figure | target | " + " | ".join(name for name, _ in columns) + " |")
    add("|---|---|" + "---|" * len(columns))
    for key, (text, op, threshold) in TARGETS.items():
        add(f"| {text} | {op} {threshold:g} | " + " | ".join(_fig(key, c.get(key)) for _, c in columns) + " |")
    for key, text in (("e2e_plain", "End to end, tasks/s: plain Celery"),
                      ("e2e_product", "End to end, tasks/s: pcelery"),
                      ("drain_plain", "Worker-only drain, tasks/s: plain Celery"),
                      ("drain_product", "Worker-only drain, tasks/s: pcelery"),
                      ("e2e_ratio_tuned", "End to end vs plain Celery at the product's prefetch multiplier"),
                      ("drain_ratio_tuned", "Worker-only drain vs plain Celery at the product's prefetch multiplier"),
                      ("req_plain", "SQS requests per task, plain Celery .delay()"),
                      ("idle_plain", "Idle SQS requests per queue per worker-hour, plain Celery")):
        add(f"| {text} | | " + " | ".join(_fig(key, c.get(key)) for _, c in columns) + " |")
    add("")
    add(f"moto era: {MOTO_ERA['label']}, see the last section."
        + (f" before: {baseline.get('label')} ({baseline.get('emulator')}, {baseline.get('tasks')} tasks, "
           f"{baseline.get('date')})." if baseline else ""))
    add("")

    add(f"### Throughput end to end: {p['tasks']} tasks submitted while the worker runs, first submit to queue "
        f"empty (median of {p['repeats']})")
    add("")
    add("| case | tasks/s | vs plain | submit phase s | drain phase s | total s | in-task ms median (p95) "
        "| all runs tasks/s |")
    add("|---|---|---|---|---|---|---|---|")
    base = _rate(results["throughput"].get("plain", []))
    for name, runs in results["throughput"].items():
        rate = _rate(runs)
        add(f"| {_label(results, name)} | {_f(rate, 1)} | {_f(rate / base if base else None)}x "
            f"| {_f(_median([r['submit_s'] for r in runs]))} | {_f(_median([r['drain_s'] for r in runs]))} "
            f"| {_f(_median([r['total_s'] for r in runs]))} | {_f(_median([r['in_task_median_ms'] for r in runs]), 1)} "
            f"({_f(_median([r['in_task_p95_ms'] for r in runs]), 1)}) "
            f"| {_all_rates(runs)} |")
    add("")
    add(f"### Worker-only drain: {p['tasks']} tasks queued before the worker starts, its ready line to queue empty "
        f"(median of {p['repeats']})")
    add("")
    add("| case | tasks/s | vs plain | drain s | steady tasks/s (middle 80 %) | in-task ms median | all runs tasks/s |")
    add("|---|---|---|---|---|---|---|")
    base = _rate(results["drain"].get("plain", []))
    for name, runs in results["drain"].items():
        rate = _rate(runs)
        add(f"| {_label(results, name)} | {_f(rate, 1)} | {_f(rate / base if base else None)}x "
            f"| {_f(_median([r['drain_s'] for r in runs]))} "
            f"| {_f(_median([r['steady_tasks_per_s'] for r in runs]), 1)} "
            f"| {_f(_median([r['in_task_median_ms'] for r in runs]), 1)} "
            f"| {_all_rates(runs)} |")
    add("")
    if results.get("ceiling"):
        add(f"### Ceiling: one worker drains a backlog of {p['ceiling_tasks']} (one run)")
        add("")
        add("| case | tasks/s (ready to empty) | steady tasks/s (middle 80 %) | drain s | in-task ms median (p95) |")
        add("|---|---|---|---|---|")
        for name, c in results["ceiling"].items():
            add(f"| {_label(results, name)} | {_f(c['tasks_per_s'], 1)} | {_f(c['steady_tasks_per_s'], 1)} "
                f"| {_f(c['drain_s'])} | {_f(c['in_task_median_ms'], 1)} ({_f(c['in_task_p95_ms'], 1)}) |")
        add("")

    add(f"### SQS requests per task at steady load: {p['counted_tasks']} tasks at {p['rate']:g} tasks/s with the "
        "worker running, counted through bench/counting_proxy.py")
    add("")
    add("| run | producer, per task (by action) | worker, per task (by action) | total per task "
        "| tasks/s through the proxy |")
    add("|---|---|---|---|---|")
    for key, c in results.get("counted", {}).items():
        add(f"| {_counted_label(results, key, c)} | {_by_action(per_task(c, 'submit', False))} "
            f"| {_by_action(per_task(c, 'worker', False))} | {sqs_total(c):.2f} | {c['tasks_per_s']:.1f} |")
    add("")
    if prod == "postgres":
        add("### Postgres round trips per task (the same counted runs; each simple Query and each Sync is one "
            "round trip)")
        add("")
        add("| run | worker, per task (by kind) | producer, per task (by kind) |")
        add("|---|---|---|")
        for key, c in results.get("counted", {}).items():
            if key.startswith("postgres"):
                add(f"| {_counted_label(results, key, c)} | {_by_action(per_task(c, 'worker', True))} "
                    f"| {_by_action(per_task(c, 'submit', True))} |")
        add("")

    if results.get("idle"):
        add("### Idle cost: one worker, no tasks, every request counted through the proxy, scaled to an hour")
        add("")
        add("| case | counted for s | requests (by action) | per worker-hour | queues consumed | per queue-hour "
            "| Postgres round trips while idle |")
        add("|---|---|---|---|---|---|---|")
        for name, i in results["idle"].items():
            hourly = idle_per_hour(i)
            actions = ", ".join(f"{k} {v}" for k, v in sorted(i["by_action"].items())) or "none"
            pg = sum(i.get("postgres", {}).values()) if name != "plain" else None
            add(f"| {_label(results, name)} | {i['window_s']:.0f} | {i['requests']} ({actions}) | {_f(hourly, 0)} "
                f"| {i['queues']} | {_f(hourly / i['queues'] if hourly is not None else None, 0)} "
                f"| {'n/a' if pg is None else pg} |")
        add("")

    add(f"### Light-load latency: one task at a time, {p['latency_samples']} samples, ms (median / p95)")
    add("")
    add("| case | submit call returns | submit -> received by the worker | submit -> task starts "
        "| submit -> done | done: median / p95 minus plain's |")
    add("|---|---|---|---|---|---|")
    lat = results.get("latency", {})
    for name, one in lat.items():
        cells = [f"{_ms(one[k]['median_s'])} / {_ms(one[k]['p95_s'])}" if k in one else "n/a"
                 for k in ("call", "received", "started", "done")]
        plain = lat.get("plain", {}).get("done")
        diff = (f"{_ms(one['done']['median_s'] - plain['median_s'])} / {_ms(one['done']['p95_s'] - plain['p95_s'])}"
                if plain and name != "plain" else "")
        add(f"| {_label(results, name)} | " + " | ".join(cells) + f" | {diff} |")
    add("")
    add(where_time_goes(results))
    return "\n".join(out)


def _sizes(counted: dict) -> str:
    """"1 (34 times), 9 (34), 10 (16)": the messages each receive of the reference consumer returned."""
    sizes = sorted(counted.get("messages_per_receive", {}).items(), key=lambda kv: int(kv[0]))
    return ", ".join(f"{k} ({v}{' times' if i == 0 else ''})" for i, (k, v) in enumerate(sizes)) or "none"


def _counted_label(results: dict, key: str, c: dict) -> str:
    name, _, mode = key.partition(": ")
    if name == "reference":
        return (f"reference consumer, not the product (bare boto3): SendMessageBatch of {c['chunk']}; long-poll "
                "ReceiveMessage of up to 10, DeleteMessageBatch of what each returned")
    how = {"delay": ".delay() per task", "submit_many": f"Outbox.submit_many, {c['chunk']} per transaction",
           "submit": "single submit(), each in its own transaction"
           + (f" (publish linger {c['publish_linger']:g} s)" if c.get("publish_linger") else ""),
           "submit_coalesced": "single submit(), each in its own transaction, coalesced (publish linger "
           f"{c.get('publish_linger') or 0:g} s, as .delay() does)"}.get(mode, mode)
    return f"{_label(results, name)}: {how}"


_CPU_PARTS = ["worker main", "worker pool", "emulator", "postgres"]  # the submitter only counts end to end


def _cpu_keys(part: str) -> list[str]:
    return (["submitter"] if part == "throughput" else []) + _CPU_PARTS


def _cpu_table(results: dict, part: str) -> list[str]:
    keys = _cpu_keys(part)
    lines = ["| case | wall ms/task | " + " | ".join(f"CPU ms/task: {k}" for k in keys) + " | CPU total "
             "| CPU busy (of all cores) |", "|---|---|" + "---|" * (len(keys) + 2)]
    nproc = results["machine"]["nproc"] or 1
    for name, runs in results.get(part, {}).items():
        cpu = _cpu_per_task(runs, keys)
        wall = _median([r["wall_s"] for r in runs]) * 1000 / runs[0]["tasks"]
        lines.append(f"| {_label(results, name)} | {wall:.2f} | " + " | ".join(_f(cpu.get(k)) for k in keys)
                     + f" | {cpu['total']:.2f} | {100 * cpu['total'] / (wall * nproc):.0f} % |")
    return lines


def _cpu_per_task(runs: list[dict], keys: list[str]) -> dict[str, float]:
    """Median CPU ms per task over the runs of each process group in `keys` that was measured,
    and their "total"."""
    if not runs:
        return {}
    n = runs[0]["tasks"]
    out = {}
    for key in keys:
        found = [r["cpu_s"][key] for r in runs if key in r["cpu_s"]]
        if found:
            out[key] = _median(found) * 1000 / n
    out["total"] = sum(out.values())
    return out


def where_time_goes(results: dict) -> str:
    """Tables of CPU by process and sentences computed from the run's own figures."""
    out = ["### Where the time goes", ""]
    out.append("CPU per task by process, from /proc (utime + stime, threads and reaped children included), median "
               "of the repeats; the emulator and Postgres share the same cores. End to end (the submitter is the "
               "bench process itself):")
    out.append("")
    out += _cpu_table(results, "throughput")
    out.append("")
    out.append("Worker-only drain (the submitter is not running):")
    out.append("")
    out += _cpu_table(results, "drain")
    out.append("")
    f = figures(results)
    prod = product_case(results)
    cap = kombu_cap(results)
    bullets = []
    thr = results.get("throughput", {})
    if thr.get("plain") and thr.get(prod):
        ps, pd, pt = (_median([r[k] for r in thr["plain"]]) for k in ("submit_s", "drain_s", "total_s"))
        qs, qd, qt = (_median([r[k] for r in thr[prod]]) for k in ("submit_s", "drain_s", "total_s"))
        plain_worker = ("its worker keeps up with that trickle" if pd < 0.2 * pt else
                        f"its worker is slower than that and drains for {pd:.2f} s more")
        product_worker = ("its worker keeps up" if qd < 0.2 * qt else
                          f"its worker drains for {qd:.2f} s more, so its end-to-end rate is its worker's rate")
        bullets.append(
            f"End to end, plain Celery spends {ps:.2f} of its {pt:.2f} s submitting (one SendMessage per "
            f".delay(), one after the other) and {plain_worker}; the product submits in {qs:.2f} s "
            f"(SendMessageBatch of 10 per request, one INSERT per {results['parameters']['chunk']} tasks) and "
            f"{product_worker}.")
    if cap and f.get("drain_plain") and f.get("drain_product"):
        plain_at = ("at" if f["drain_plain"] >= 0.8 * cap else "below")
        bullets.append(
            f"Plain Celery's worker drained at {f['drain_plain']:.0f} tasks/s, {plain_at} kombu's refill cap of "
            f"{cap:.0f} tasks/s (prefetch {results['parameters']['concurrency']} x "
            f"{results['parameters'].get('plain_prefetch_multiplier') or results['settings']['prefetch_multiplier']}"
            f" / polling_interval {results['settings']['polling_interval']} s: with every pool slot busy, kombu polls "
            f"again only after polling_interval). The product's channel receives 10 at a time as soon as 10 slots "
            f"are free, looking every 5 ms (pcelery.celery_internals.PersistentChannel.REFILL_RECHECK), so no such "
            f"cap binds it: it drained at {f['drain_product']:.0f} tasks/s, limited by CPU and round trips (see the "
            f"CPU tables).")
    drn = results.get("drain", {})
    tuned = _cpu_per_task(drn.get("plain_tuned", []), _CPU_PARTS)
    mine = _cpu_per_task(drn.get(prod, []), _CPU_PARTS)
    if tuned and mine and f.get("drain_ratio_tuned"):
        bullets.append(
            f"Against {_label(results, 'plain_tuned')} the worker-only drain is {f['drain_ratio_tuned']:.2f}x. That "
            f"plain worker is not capped by its refill; it acks with one blocking DeleteMessage per task on its event "
            f"loop, and the emulator spends {tuned['emulator']:.2f} ms of CPU per task answering it (the product's "
            f"{mine['emulator']:.2f}). The product spends {mine['total']:.2f} ms of CPU per task against plain's "
            f"{tuned['total']:.2f}, but {mine['worker pool']:.2f} ms of it in the pool children against "
            f"{tuned['worker pool']:.2f} (claim, body and finish, with two Postgres round trips waited for in the "
            f"child) and {mine.get('postgres', 0):.2f} ms in Postgres: the claim-check's own work is what this ratio "
            f"pays for.")
    if drn.get(prod):
        in_task = _median([r["in_task_median_ms"] for r in drn[prod]])
        plain_in = _median([r["in_task_median_ms"] for r in drn.get("plain", [])])
        concurrency = results["parameters"]["concurrency"]
        pool_bound = (f"; {concurrency} pool children busy that long allow at most "
                      f"{concurrency / in_task * 1000:.0f} tasks/s" if in_task else "")
        bullets.append(f"Inside the pool child, a product task takes {_f(in_task, 1)} ms (claim, body, finish: "
                       f"{_f(f.get('pg_worker'))} Postgres round trips) against {_f(plain_in, 2)} ms for the "
                       f"plain task body{pool_bound}.")
    counted = results.get("counted", {})
    many = counted.get(f"{prod}: submit_many")
    if many:
        worker = per_task(many, "worker", False)
        top = sorted(worker.items(), key=lambda kv: -kv[1])
        bullets.append("At steady load the worker's SQS requests per task are " +
                       ", ".join(f"{k} {v:.2f}" for k, v in top) +
                       "; the producer's " + (", ".join(f"{k} {v:.2f}" for k, v in
                                                         per_task(many, "submit", False).items()) or "none") + ".")
    reference = counted.get("reference: batch")
    if many and reference and f.get("receives_reference") is not None:
        bullets.append(
            f"Receives are the only requests above their floor at steady load, and the emulator sets their floor: a "
            f"long poll waiting when a SendMessageBatch arrives is handed the first message alone, and the rest "
            f"of the batch goes to the next receive. The reference consumer's receives returned {_sizes(reference)} "
            f"messages, {f['receives_reference']:.3f} receives per task where one per batch would be "
            f"{1 / reference['chunk']:.3f}; the product's worker made {f['receives_submit_many']:.3f}. Only holding "
            f"arrived messages back (waiting before each receive) would merge the split batches, and it would add "
            f"that wait to every task's latency to save a fraction of a request.")
    if f.get("idle_product") is not None:
        settings = results["settings"]
        period = settings["wait_time_seconds"] + (settings["polling_interval"] or 0)
        bullets.append(f"Idle, the product's worker makes {f['idle_product']:.0f} requests per queue-hour and plain "
                       f"Celery's {_f(f.get('idle_plain'), 0)}: one long poll of {settings['wait_time_seconds']} s "
                       f"plus polling_interval is {3600 / period:.0f} an hour.")
    out += [f"- {b}" for b in bullets]
    return "\n".join(out)


def run_date(results: dict) -> str:
    return results.get("finished_at", "")[:10] or dt.date.today().isoformat()


def run_label(results: dict) -> str:
    """--label, else the runtime it measured (pcelery's git commit, and whether it was modified)."""
    label = results.get("parameters", {}).get("label")
    if label:
        return label
    runtime = results["machine"].get("runtime", {})
    if runtime.get("commit"):
        return f"runtime at git {runtime['commit']}" + (" with uncommitted changes" if runtime.get("runtime_modified")
                                                       else "")
    return f"runtime from {runtime.get('pcelery_path', '?')}"


def render(results: dict, *, baseline: dict | None = None, is_baseline: bool = False) -> str:
    p = results["parameters"]
    m = results["machine"]
    label = run_label(results)
    emulator = m["emulator"]
    lines = [
        "# Plain Celery against persistent Celery on SQS: a side-by-side benchmark",
        "",
        (f"**This run is the \"before\" baseline:** {label}. Its figures are also in bench/baseline.json, the "
         "\"before\" column of the runs after it."
         if is_baseline else f"**This run:** {label}. ")
        + ("" if is_baseline else
           (f"The \"before\" column is bench/baseline.json ({baseline.get('label')}, {baseline.get('date')})."
            if baseline else "")),
        "",
        "One command, everything on 127.0.0.1, every process it starts stopped and its Postgres database dropped "
        "at the end (also on Ctrl-C):",
        "",
        "    make bench        # = .venv/bin/python -m bench.run; --help for the sizes, --sqs moto for moto",
        "",
        f"This report came from `{results.get('command', 'python -m bench.run')}` in "
        f"{results['elapsed_s'] / 60:.1f} minutes on {run_date(results)}. It printed the tables below; "
        "raw numbers are in var/bench/results.json, worker, emulator and proxy logs in var/bench/. The machine is "
        "shared and noisy: read the ratios and the counts, which were measured side by side in one run, not the "
        "absolute rates (an emulator's, not AWS's).",
        "",
        "## Machine",
        "",
        machine_line(results) + ".",
        "",
        "## Method",
        "",
        METHOD.format(warm_up=results.get("warm_up_tasks", 8), emulator=emulator, tasks=p["tasks"],
                      repeats=p["repeats"], ceiling=p["ceiling_tasks"],
                      counted=p["counted_tasks"], rate=p["rate"], chunk=p["chunk"],
                      counted_chunk=p.get("counted_chunk", p["chunk"]), idle=p["idle_seconds"],
                      samples=p["latency_samples"], settings=settings_line(results)),
        "",
    ]
    if emulator.startswith("moto"):
        lines += [MOTO_NOTE, ""]
    lines += ["## Results", "", tables(results, baseline, header=False), "",
              "## Before: the figures this file held before issue 9", "", MOTO_ERA_NOTES, "",
              "## Emulator notes", "", EMULATOR_NOTES, ""]
    return "\n".join(lines)


METHOD = """\
**Cases.** *Plain Celery*: bench/plain_app.py, a Celery app whose settings are the product's own (pcelery.celeryconfig's
`app_settings`, and `worker_settings` applied when its worker starts) minus the product's transport, consumer and
router; tasks submitted with bare `.delay()`; its worker is `celery worker` with the flags `pcelery-worker` passes
(`--without-gossip --without-mingle --without-heartbeat`). *pcelery, Postgres* (the product): `Outbox.from_settings`
(rows in the caller's transaction, ids sent after COMMIT), and the worker is the `pcelery-worker` console script
(devstack.stack.start_worker) running `demo.add` from devstack/tasks.py through the real PersistentTask wrapper
(claim, run, finish), on a fresh Postgres database. *pcelery, SQLite* is optional (`--cases plain,postgres,sqlite`).

**Two plain baselines.** The targets are measured against *plain Celery at prefetch multiplier 1*, the baseline
issue 9's own figures were measured against: the product's setting before the issue, and Celery's advice with late
acks and long tasks, because a plain worker never extends a prefetched message's visibility and one that waits in
its prefetch past the visibility timeout is delivered, and run, again. Its refill then caps it at concurrency /
polling_interval tasks/s. *Plain Celery at the product's own prefetch multiplier* (`plain_tuned`) runs in the same
repeats as a second baseline: for the short tasks measured here it is the fastest plain configuration, and the
ratios against it are printed next to the targets.
Every worker consumes the real catalog's `default` queue (visibility 120 s, redrive policy) on {emulator}; {settings}.
The relay is not running: every submit publishes after its own commit.

**Parts of one run.**
1. *Throughput*, {repeats} repeats; each repeat runs every case once, so drift on the machine hits every case alike;
   medians reported. *End to end*: the worker is started and warmed up ({warm_up} tasks), then {tasks} tasks are
   submitted as fast as the caller can (`.delay()` one by one; `submit_many` of {chunk} per transaction), timed from
   the first submit until the queue is empty. *Worker-only drain*: {tasks} tasks are queued first, then the worker
   starts; timed from its `ready.` log line to the queue being empty. The queue is deleted and recreated before each
   worker starts (see the emulator notes).
2. *Ceiling*: one worker-only drain of {ceiling} tasks for the product. "Steady" is the rate between the 10th and the
   90th percentile of the success times in the worker's log.
3. *Idle*: one idle worker per kind (plain, product) on queues of their own (`pcelery-dev-*`), started after the
   ceiling run, every SQS request counted through the proxy for {idle:g} s while parts 4 and 5 run. Scaled to an hour
   as (n - 1) requests over the time from the first to the last (a periodic long poll counted in a fixed window
   would be off by one poll, 30 an hour), then divided by the queues the worker consumes (one).
4. *Counted runs at steady load*: the worker and the submitter reach SQS and Postgres through bench/counting_proxy.py
   (its own process, one loopback port per side). SQS requests are counted by `X-Amz-Target`; Postgres round trips
   by parsing the frontend wire protocol (each simple Query, e.g. BEGIN/COMMIT/ping, and each Sync ending a
   parameterized statement is one round trip). With the worker running and warmed up ({warm_up} tasks), {counted}
   tasks are submitted at {rate:g} tasks/s on a fixed schedule: plain `.delay()`, `submit_many` of {counted_chunk} per
   transaction, and single `submit()` calls each in its own `outbox.transaction()`. Counts cover the submits until
   the queue is empty and the rows are `succeeded`, plus 1 s, divided by the tasks. Last, a *reference consumer*
   (bench/harness.py: bare boto3, no product, no Celery) takes the same traffic as `submit_many` (SendMessageBatch
   of {counted_chunk} at {rate:g} tasks/s) through the same proxy: its receives are the emulator's floor. Not timed
   as throughput: the proxy costs CPU (about 0.6 ms a request).
5. *Light-load latency*: one task at a time ({samples} samples after 5 warm-up tasks, 0.1 s apart); submit -> the
   worker's `received` line, -> task start (its `succeeded` line minus Celery's `succeeded in` time, which for the
   product includes the claim) and -> done (the `succeeded` line), from the workers' own log time stamps (ms).

**Done** means the emulator reports no visible, in-flight or delayed message (the last delete has happened), asked
directly every 0.05 s, for every case alike; the product's rows are also checked to be `succeeded`.
**CPU** is read from /proc before and after each timed run: the bench process (the submitter), the worker's main
process, its pool children, the emulator's process tree and the Postgres backends serving the bench's database."""

MOTO_NOTE = """\
**This run used moto.** moto's cost grows with queue depth: it scans every message on each receive and send
(FIELD-NOTES: ReceiveMessage 11 ms at depth 10, 141 ms at 1,000, 266 ms at 2,000). The worker-only drain and ceiling
runs build a backlog of the full size, so their rates, and every end-to-end run where a backlog forms, measure moto
rather than the worker. LocalStack (the default) does not slow down this way."""

EMULATOR_NOTES = """\
- **A stopped worker's long poll steals the next message** on LocalStack as on moto: the emulator keeps the
  dead connection's ReceiveMessage waiting (up to 19 s) and hands it the next message sent, which then stays
  invisible for the queue's visibility timeout (120 s). The bench deletes and recreates the queue before every worker
  start; LocalStack allows that at once (no 60 s wait) and keeps the URL.
- **LocalStack builds queue URLs from LOCALSTACK_HOST**, not from the request's Host header (moto uses the Host
  header), with `SQS_ENDPOINT_STRATEGY=path` as `http://host:port/queue/<region>/<account>/<name>`. boto3 and kombu
  send JSON-protocol calls to their endpoint whatever the URL says, so the proxy sees them either way; it also
  rewrites the URLs in answers to its own port.
- **Long polling and batches** behave as on SQS here: a waiting ReceiveMessage returns as soon as a message is sent,
  before the rest of a SendMessageBatch has landed (LocalStack: its receive blocks for one message, then takes only
  what is already there, so a waiting poll is usually handed the batch's first message alone),
  SendMessageBatch/DeleteMessageBatch take 10 entries, and ApproximateNumberOfMessages(-NotVisible) are exact right
  after each call, which the bench's "done" relies on.
- **The SDKs must be pointed at the proxy** for the counts: the product's worker reads AWS_ENDPOINT_URL_SQS (its
  settings pass it to kombu, whose curl client and boto3 client both use it), the product's submitter the same
  setting through Outbox.from_settings, the plain app its broker URL's host."""


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description="Render a bench run's report again.")
    parser.add_argument("results", help="a run's raw results (var/bench/results.json)")
    parser.add_argument("--baseline", help="an earlier run's figures (bench/baseline.json) for the before column")
    parser.add_argument("--is-baseline", action="store_true", help="the run is itself the baseline")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    baseline = None
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)
    sys.stdout.write(render(results, baseline=baseline, is_baseline=args.is_baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
