"""Summarise the runs of a results folder (benchmarks/run.py) into CSV tables and learning-curve PNGs.

    python benchmarks/report.py                         # benchmarks/results -> benchmarks/report
    python benchmarks/report.py --results R --out O

Runs with the same script, env id and flags are one configuration; its seeds are averaged. Writes
    summary.csv     per configuration: seeds, final return (mean, std over seeds), evaluation return (mean, std and
                    the interquartile mean with its 95 % stratified-bootstrap interval over seeds, by rliable),
                    steps, training wall time, env-steps/s
    aggregate.csv   per script, over the tasks where it has 3 finished seeds or more and HARL a published value: the
                    interquartile mean of the final evaluation return normalised by HARL's published value of the
                    script's algorithm on the task, with its interval; and the probability that HAPPO improves on
                    HATRPO (per task, over seeds, averaged over tasks), with its interval
    eval_returns.json  every evaluation in marl-eval's layout: env -> task -> algorithm -> seed_N -> step_K ->
                    {step_count, return: [one return per episode]}, absolute_metrics holding the last evaluation's
                    (evaluations logged before the scripts logged each episode's return hold their mean alone)
    curves/performance_profile.png  the fraction of (seed, task) scores above each normalised score tau
    curves/mamujoco_overview.png  every MaMuJoCo task's 10M-step evaluation curves and the published values
    mamujoco_table.md  the 10M-step MaMuJoCo runs: evaluation at 1M, 2M, 5M, 10M, the final IQM and interval, HARL's
                    published value, hours per run (the table of docs/mamujoco.md)
    milestones.csv  per configuration (and the HARL anchors in --anchors): the training return and the
                    deterministic evaluation return at 100k, 250k, 500k, 1M, 2M, 5M, 10M steps, mean and std over
                    seeds; the published evaluation returns (published_eval.csv) at the steps they were read
    curves/{task}.png  mean return and a band of +-1 std over seeds, against env steps and against wall time, and the
                    evaluation return against env steps with the published points

"Return at step s" is the mean of the logged `charts/episodic_return` values at steps in (s - window, s];
"evaluation return at step s" the mean of the `eval/episodic_return` values at steps in (s - window, s + window]. The
final return is the return at the last logged step (a run still under way counts at its last step; `finished` in
summary.csv says how many seeds are done). Wall time counts training and the periodic evaluations, not the final
evaluation nor work lost to a stop: the scripts log `charts/SPS` since their process started, and the runner records
the step each process resumed from.
"""

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from rliable import library as rly
from rliable import metrics as rly_metrics

REPO = Path(__file__).resolve().parents[1]
MILESTONES = (100_000, 250_000, 500_000, 1_000_000, 2_000_000, 5_000_000, 10_000_000)
RETURN = "charts/episodic_return"
BOOTSTRAP_REPS = 2000  # rliable's stratified bootstrap; its intervals move by about 1 % of their width across seeds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "report"))
    parser.add_argument("--anchors", default=str(REPO / "benchmarks" / "anchors"), help="HARL curves, CSV files")
    parser.add_argument("--window", type=int, default=25_000, help="env steps averaged into one return value")
    args = parser.parse_args(argv)
    if args.window <= 0:
        parser.exit(2, f"error: --window must be a positive number of env steps, got {args.window}\n")
    return args


def training_seconds(steps, sps, resumed_from_steps) -> np.ndarray:
    """Training wall time at each logged step. Within one process, elapsed = (step - start step) / SPS; a resumed
    process starts at the time its checkpoint's step was reached, so work done after that checkpoint and lost to the
    stop is not counted."""
    starts = sorted(resumed_from_steps)
    seconds, base_step, base_time, last_time = [], 0, 0.0, 0.0
    for step, rate in zip(steps, sps):
        while starts and step > starts[0]:
            base_step, base_time = starts.pop(0), last_time
        last_time = base_time + (step - base_step) / rate
        seconds.append(last_time)
    return np.array(seconds)


def window_mean(steps: np.ndarray, values: np.ndarray, at: float, window: float) -> float:
    inside = (steps > at - window) & (steps <= at)
    return float(values[inside].mean()) if inside.any() else math.nan


def load_run(folder: Path) -> dict | None:
    """One run of the runner: what it is, its return curve with wall times, its final evaluation, whether it is done."""
    metrics_files = sorted((folder / "runs").glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime)
    if not (folder / "run.json").exists() or not metrics_files:
        return None
    run = json.loads((folder / "run.json").read_text())
    lines = [json.loads(line) for line in metrics_files[-1].read_text().splitlines() if line.strip()]
    timed = [m for m in lines if "charts/SPS" in m and m["charts/SPS"] > 0]
    if not timed:
        return None
    segments = (
        [json.loads(s) for s in (folder / "segments.jsonl").read_text().splitlines()]
        if (folder / "segments.jsonl").exists()
        else []
    )
    resumed = [s["resumed_from_step"] for s in segments if s.get("resumed_from_step") is not None]
    steps = np.array([m["global_step"] for m in timed], dtype=float)
    seconds = training_seconds(steps, [m["charts/SPS"] for m in timed], resumed)
    with_return = [i for i, m in enumerate(timed) if RETURN in m]
    evals = [m for m in lines if "eval/episodic_return" in m]
    return dict(
        **run,
        config=(run["script"], run["env_id"] or "default", " ".join(run["flags"])),
        steps=steps[with_return],
        seconds=seconds[with_return],
        returns=np.array([timed[i][RETURN] for i in with_return], dtype=float),
        last_step=int(steps[-1]),
        wall_seconds=float(seconds[-1]),
        eval_steps=np.array([m["global_step"] for m in evals], dtype=float),
        eval_returns=np.array([m["eval/episodic_return"] for m in evals], dtype=float),
        eval_episode_returns=[m.get("eval/episodic_returns", [m["eval/episodic_return"]]) for m in evals],
        eval_return=evals[-1]["eval/episodic_return"] if evals else math.nan,
        done=(folder / "done").exists(),
    )


def load_anchors(folder: Path) -> dict:
    """HARL's training curves (benchmarks/anchors/harl_{env}_{discrete|continuous}.csv) as configurations."""
    anchors = {}
    for path in sorted(folder.glob("harl_*.csv")):
        env_id = path.stem.removeprefix("harl_").rsplit("_", 1)[0]
        flavour = path.stem.rsplit("_", 1)[1]
        curves = defaultdict(lambda: ([], []))
        with open(path) as f:
            for row in csv.DictReader(f):
                if row["kind"] == "train":
                    steps, returns = curves[(row["algo"], row["seed"])]
                    steps.append(float(row["step"]))
                    returns.append(float(row["return"]))
        for (algo, seed), (steps, returns) in curves.items():
            config = (f"HARL {algo}", env_id, flavour)
            anchors.setdefault(config, []).append(
                dict(seed=int(seed), steps=np.array(steps), returns=np.array(returns))
            )
    return anchors


def load_published(path: Path) -> list[dict]:
    """The published evaluation returns read off the papers' figures: source, algo, env_id, step, eval_return."""
    if not path.exists():
        return []
    with open(path) as f:
        return [row | dict(step=int(row["step"]), eval_return=float(row["eval_return"])) for row in csv.DictReader(f)]


def eval_at(run: dict, at: float, window: float) -> float:
    inside = (run.get("eval_steps", np.array([])) > at - window) & (run.get("eval_steps", np.array([])) <= at + window)
    return float(run["eval_returns"][inside].mean()) if inside.any() else math.nan


def mean_std(values) -> tuple[float, float]:
    values = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std())


def bootstrap_interval(scores, statistic) -> tuple[float, float, float]:
    """rliable's point estimate of statistic(scores) and its 95 % stratified-bootstrap interval. rliable 1.2 draws the
    resamples from numpy's global generator whatever random_state it is given, so that generator is seeded here: the
    same scores give the same interval, whatever else the report has computed before."""
    np.random.seed(0)
    point, interval = rly.get_interval_estimates({"x": scores}, statistic, reps=BOOTSTRAP_REPS)
    return float(np.squeeze(point["x"])), float(interval["x"][0, 0]), float(interval["x"][1, 0])


def iqm_interval(scores: np.ndarray) -> tuple[float, float, float]:
    """rliable's interquartile mean of a (seeds x tasks) score matrix and its 95 % stratified-bootstrap interval."""
    return bootstrap_interval(scores, lambda x: np.array([rly_metrics.aggregate_iqm(x)]))


def summarise(configs: dict, window: int) -> list[dict]:
    rows = []
    for (script, env_id, flags), runs in sorted(configs.items()):
        final = [window_mean(r["steps"], r["returns"], r["last_step"], window) for r in runs]  # at the last logged step
        final_mean, final_std = mean_std(final)
        eval_mean, eval_std = mean_std([r["eval_return"] for r in runs])
        evaluated = np.array([[r["eval_return"]] for r in runs if not math.isnan(r["eval_return"])])
        iqm, iqm_low, iqm_high = iqm_interval(evaluated) if len(evaluated) else (math.nan,) * 3
        rows.append(
            dict(
                script=script,
                env_id=env_id,
                flags=flags,
                seeds=" ".join(str(r["seed"]) for r in runs),
                finished=sum(r["done"] for r in runs),
                final_return_mean=final_mean,
                final_return_std=final_std,
                eval_return_mean=eval_mean,
                eval_return_std=eval_std,
                eval_return_iqm=iqm,
                eval_return_iqm_low=iqm_low,
                eval_return_iqm_high=iqm_high,
                steps_mean=float(np.mean([r["last_step"] for r in runs])),
                wall_seconds_mean=float(np.mean([r["wall_seconds"] for r in runs])),
                env_steps_per_second_mean=float(np.mean([r["last_step"] / r["wall_seconds"] for r in runs])),
            )
        )
    return rows


def milestones(configs: dict, window: int) -> list[dict]:
    rows = []
    for (script, env_id, flags), runs in sorted(configs.items()):
        for at in MILESTONES:  # over the seeds that reached the step (a run still under way joins as it gets there)
            reached = [r for r in runs if r.get("last_step", max(r["steps"], default=0)) >= at]  # anchors: no last_step
            if not reached:
                break
            mean, std = mean_std([window_mean(r["steps"], r["returns"], at, window) for r in reached])
            eval_mean, eval_std = mean_std([eval_at(r, at, window) for r in reached])
            row = dict(script=script, env_id=env_id, flags=flags, seeds=len(reached), step=at)
            rows.append(row | dict(return_mean=mean, return_std=std, eval_mean=eval_mean, eval_std=eval_std))
    return rows


def published_milestones(published: list[dict]) -> list[dict]:
    return [dict(script=f"{p['source']}: {p['algo']}", env_id=p["env_id"], flags="", seeds="", step=p["step"],
                 return_mean=math.nan, return_std=math.nan, eval_mean=p["eval_return"], eval_std=math.nan)
            for p in published]  # fmt: skip


def algorithm(script: str) -> str:
    return Path(script).stem.split("_")[0]  # happo_mamujoco.py -> happo, the name HARL's figures use


def aggregate(configs: dict, published: list[dict], min_seeds: int = 3) -> tuple[list[dict], dict]:
    """The rows of aggregate.csv, and the normalised (seeds x tasks) scores of each MaMuJoCo script over the tasks
    where it has min_seeds finished seeds at 10M steps (the first min_seeds by seed) and HARL a published value."""
    harl = {(p["algo"], p["env_id"]): p["eval_return"] for p in published
            if p["source"].startswith("HARL") and p["step"] == MILESTONES[-1]}  # fmt: skip
    finished = {}  # (script, task) -> the final evaluation returns of its finished 10M-step seeds
    for (script, env_id, _), runs in configs.items():
        done = [r["eval_return"] for r in sorted(runs, key=lambda r: r["seed"])
                if r["done"] and r["last_step"] >= MILESTONES[-1] and not math.isnan(r["eval_return"])]  # fmt: skip
        if "mamujoco" in script and len(done) >= min_seeds:
            finished[script, env_id] = np.array(done[:min_seeds])
    rows, normalised = [], {}
    for script in sorted({script for script, _ in finished}):
        tasks = sorted(task for s, task in finished if s == script and (algorithm(script), task) in harl)
        if tasks:
            normalised[script] = np.stack([finished[script, t] / harl[algorithm(script), t] for t in tasks], axis=1)
            iqm, low, high = iqm_interval(normalised[script])
            rows.append(dict(statistic="IQM of evaluation return / HARL's published", script=script,
                             tasks=" ".join(tasks), value=iqm, low=low, high=high))  # fmt: skip
    pair = ("happo_mamujoco.py", "hatrpo_mamujoco.py")
    tasks = sorted(task for s, task in finished if s == pair[0] and (pair[1], task) in finished)
    if tasks:
        x, y = (np.stack([finished[script, t] for t in tasks], axis=1) for script in pair)
        value, low, high = bootstrap_interval((x, y), rly_metrics.probability_of_improvement)
        rows.append(dict(statistic="probability that HAPPO improves on HATRPO", script=" vs ".join(pair),
                         tasks=" ".join(tasks), value=value, low=low, high=high))  # fmt: skip
    return rows, normalised


def mamujoco_table(configs: dict, published: list[dict], window: int) -> str:
    """The 10M-step MaMuJoCo runs as one markdown table: the evaluation return at 1M, 2M, 5M and 10M steps (mean +-
    std over the seeds that reached the step), the interquartile mean at the end with its 95 % interval (finished
    seeds; with 3 seeds it is their mean), the published value at 10M (HARL's, else the ICLR 2022 paper's) and the
    training hours per finished run."""
    source = {}  # (algo, task) -> "value (source)", HARL's first
    for p in sorted(published, key=lambda p: not p["source"].startswith("HARL")):
        if p["step"] == MILESTONES[-1]:
            source.setdefault((p["algo"], p["env_id"]), f"{p['eval_return']:.0f} ({p['source'].split(' figure')[0]})")
    steps = (1_000_000, 2_000_000, 5_000_000, 10_000_000)
    header = ["task", "script", "seeds (finished)", *(f"{s // 1_000_000}M" for s in steps),
              "IQM at 10M [95 % interval]", "published at 10M", "hours per run"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for (script, env_id, flags), runs in sorted(configs.items(), key=lambda item: (item[0][1], item[0][0])):
        if "mamujoco" not in script or flags != f"--total-timesteps {MILESTONES[-1]}":
            continue
        cells = []
        for at in steps:
            mean, std = mean_std([eval_at(r, at, window) for r in runs if r["last_step"] >= at])
            cells.append("" if math.isnan(mean) else f"{mean:.0f} +- {std:.0f}")
        finished = [r for r in runs if r["done"] and not math.isnan(r["eval_return"])]
        iqm = iqm_interval(np.array([[r["eval_return"]] for r in finished])) if finished else None
        hours = f"{np.mean([r['wall_seconds'] for r in finished]) / 3600:.1f}" if finished else ""
        lines.append(f"| {env_id} | `{script}` | {len(runs)} ({len(finished)}) | " + " | ".join(cells)
                     + (f" | {iqm[0]:.0f} [{iqm[1]:.0f}, {iqm[2]:.0f}]" if iqm else " | ")
                     + f" | {source.get((algorithm(script), env_id), '')} | {hours} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def marl_eval_json(configs: dict) -> dict:
    """Every evaluation in marl-eval's layout: env -> task -> algorithm -> seed_N -> step_K -> {step_count, return}."""
    data = {}
    for (script, env_id, flags), runs in sorted(configs.items()):
        env = "mamujoco" if "mamujoco" in script else "mpe"
        task = env_id if env_id != "default" else Path(script).stem
        seeds = data.setdefault(env, {}).setdefault(task, {}).setdefault(f"{algorithm(script)} {flags}".strip(), {})
        for run in [r for r in runs if len(r["eval_steps"])]:
            evaluations = [dict(step_count=int(step), **{"return": [float(x) for x in episodes]})
                           for step, episodes in zip(run["eval_steps"], run["eval_episode_returns"])]  # fmt: skip
            seeds[f"seed_{run['seed']}"] = {f"step_{k}": e for k, e in enumerate(evaluations)} | {
                "absolute_metrics": {"return": evaluations[-1]["return"]}
            }
    return data


def plot_performance_profile(normalised: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    taus = np.linspace(0.0, 1.5, 61)
    profiles, intervals = rly.create_performance_profile(normalised, taus, reps=BOOTSTRAP_REPS)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=intervals, ax=ax,
                                         xlabel="evaluation return at 10M / HARL's published value (tau)")  # fmt: skip
    ax.legend([Path(script).stem for script in profiles], loc="upper right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(path: Path, rows: list[dict]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def band(runs: list[dict], x_key: str, window: int, points: int = 200):
    """Mean and std over seeds of each seed's smoothed curve, on a grid up to where every seed has data."""
    end = min(r[x_key][-1] for r in runs)
    grid = np.linspace(end / points, end, points)
    curves = []
    for r in runs:
        smoothed = np.array([window_mean(r["steps"], r["returns"], s, window) for s in r["steps"]])
        curves.append(np.interp(grid, r[x_key], smoothed))
    curves = np.array(curves)
    return grid, curves.mean(0), curves.std(0)


def figure_name(task: str, continuous: bool) -> str:
    """One figure per task and action kind: MPE's continuous actions get their own."""
    return task + "_continuous" if continuous else task


def eval_band(runs: list[dict]):
    """Mean and std over seeds of the evaluation returns, at the evaluation steps every seed has reached."""
    end = min(r["eval_steps"][-1] for r in runs)
    grid = runs[0]["eval_steps"][runs[0]["eval_steps"] <= end]
    curves = np.array([np.interp(grid, r["eval_steps"], r["eval_returns"]) for r in runs])
    return grid, curves.mean(0), curves.std(0)


def plot_mamujoco_overview(configs: dict, published: list[dict], path: Path):
    """The README's figure: per MaMuJoCo task, each script's evaluation return over its 10M-step runs (mean and +-1
    std over the finished seeds, else all) against env steps, with the published values at 10M."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = defaultdict(dict)  # task -> script -> runs
    for (script, env_id, flags), runs in configs.items():
        runs = [r for r in runs if r["done"]] or runs
        if "mamujoco" in script and flags == f"--total-timesteps {MILESTONES[-1]}":
            if all(len(r["eval_steps"]) > 1 for r in runs):
                tasks[env_id][script] = runs
    if not tasks:
        return
    columns = min(3, len(tasks))
    fig, axes = plt.subplots(math.ceil(len(tasks) / columns), columns, figsize=(4.6 * columns, 3.6 * math.ceil(
        len(tasks) / columns)), squeeze=False)  # fmt: skip
    colors = {"happo": "tab:blue", "hatrpo": "tab:orange"}
    for axis, (env_id, scripts) in zip(axes.flat, sorted(tasks.items())):
        for script, runs in sorted(scripts.items()):
            x, mean, std = eval_band(runs)
            color = colors[algorithm(script)]
            seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
            axis.plot(x / 1e6, mean, color=color, label=f"{algorithm(script).upper()}, ours ({seeds})")
            axis.fill_between(x / 1e6, mean - std, mean + std, color=color, alpha=0.2)
        for p in [p for p in published if p["env_id"] == env_id and p["step"] == MILESTONES[-1]]:
            harl = p["source"].startswith("HARL")
            axis.plot(10, p["eval_return"], "*" if harl else "P", ms=11, color=colors[p["algo"]], markeredgecolor="k",
                      label=f"{p['algo'].upper()}, {'HARL' if harl else 'ICLR 2022 paper'} (gym v2)")  # fmt: skip
        axis.set_title(env_id, fontsize=10)
        axis.set_xlabel("env steps (millions)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper left")  # the curves rise from the lower left, the markers sit at 10M
    for axis in axes.flat[len(tasks) :]:
        axis.axis("off")
    for axis in axes[:, 0]:
        axis.set_ylabel("evaluation return")
    fig.suptitle("MaMuJoCo (MuJoCo v5), deterministic evaluation, mean +- std over seeds; markers: published at 10M")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(env_id: str, configs: dict, anchors: dict, published: list[dict], window: int, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = {c: runs for c, runs in configs.items() if all(len(r["eval_steps"]) > 1 for r in runs)}
    legend_height = 0.2 * (len(configs) + len(anchors) + len(published)) + 0.2  # inches, one line per curve below
    panels = 3 if evaluated else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2 + legend_height))
    by_steps, by_time = axes[:2]
    colors = {}
    for (script, _, flags), runs in sorted(configs.items()):
        label = f"{Path(script).stem} {flags} ({len(runs)} seeds)"
        for axis, x_key in ((by_steps, "steps"), (by_time, "seconds")):
            x, mean, std = band(runs, x_key, window)
            x = x / 1e6 if x_key == "steps" else x / 60
            (line,) = axis.plot(x, mean, label=label if axis is by_steps else None)
            axis.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            colors[script, flags] = line.get_color()
    if evaluated:
        by_eval = axes[2]
        for (script, _, flags), runs in sorted(evaluated.items()):
            x, mean, std = eval_band(runs)
            by_eval.plot(x / 1e6, mean, "o-", ms=2, color=colors[script, flags])
            by_eval.fill_between(x / 1e6, mean - std, mean + std, color=colors[script, flags], alpha=0.2)
        for point in published:
            by_eval.plot(point["step"] / 1e6, point["eval_return"], "x" if point["algo"] == "happo" else "+", ms=9,
                         color="black", label=f"{point['source']}: {point['algo']} (published evaluation)")  # fmt: skip
        by_eval.set_xlabel("env steps (millions)")
        by_eval.set_title("deterministic evaluation", fontsize=9)
    for (name, _, flavour), runs in sorted(anchors.items()):
        x, mean, std = band(runs, "steps", window)
        (line,) = by_steps.plot(x / 1e6, mean, "--", label=f"{name} {flavour} ({len(runs)} seeds, anchor)")
        by_steps.fill_between(x / 1e6, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    by_steps.set_xlabel("env steps (millions)")
    by_time.set_xlabel("training wall time (minutes)")
    by_steps.set_title("training (stochastic policy)", fontsize=9)
    for axis in axes:
        axis.set_ylabel("team return")
        axis.grid(alpha=0.3)
    fig.suptitle(f"{env_id}: mean over seeds, band = +-1 std")
    handles, labels = by_steps.get_legend_handles_labels()
    if evaluated:  # one legend line per published source and algorithm
        for handle, label in zip(*axes[2].get_legend_handles_labels()):
            if label not in labels:
                handles, labels = handles + [handle], labels + [label]
    fig.legend(handles, labels, loc="lower center", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_height / (4.2 + legend_height), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    configs = defaultdict(list)
    for folder in sorted(Path(args.results).glob("*")):
        run = load_run(folder) if folder.is_dir() else None
        if run is not None:
            configs[run["config"]].append(run)
    if not configs:
        raise SystemExit(f"error: no runs with metrics under {args.results}")
    anchors = load_anchors(Path(args.anchors))
    published = load_published(Path(args.anchors) / "published_eval.csv")
    out = Path(args.out)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    write_csv(out / "summary.csv", summarise(configs, args.window))
    aggregate_rows, normalised = aggregate(configs, published)
    write_csv(out / "aggregate.csv", aggregate_rows)
    (out / "eval_returns.json").write_text(json.dumps(marl_eval_json(configs), indent=1) + "\n")
    (out / "mamujoco_table.md").write_text(mamujoco_table(configs, published, args.window))
    plot_mamujoco_overview(configs, published, out / "curves" / "mamujoco_overview.png")
    if normalised:
        plot_performance_profile(normalised, out / "curves" / "performance_profile.png")
    write_csv(
        out / "milestones.csv",
        milestones(configs, args.window) + milestones(anchors, args.window) + published_milestones(published),
    )
    # one figure per task (the script's name where it ran its default task, e.g. matrpo_admm); HARL's curves join
    # their task's figure
    figures = defaultdict(dict)
    for (script, env_id, flags), runs in configs.items():
        runs = [r for r in runs if len(r["steps"])]
        runs = [r for r in runs if r["done"]] or runs  # the curves of finished seeds, while others are under way
        task = env_id if env_id != "default" else Path(script).stem
        if runs:
            figures[figure_name(task, "--continuous-actions" in flags.split())][script, env_id, flags] = runs
    for task, task_configs in sorted(figures.items()):
        task_anchors = {c: runs for c, runs in anchors.items() if figure_name(c[1], c[2] == "continuous") == task}
        task_published = [p for p in published if p["env_id"] == task]
        plot(task, task_configs, task_anchors, task_published, args.window, out / "curves" / f"{task}.png")
    print(
        f"wrote {out / 'summary.csv'}, {out / 'milestones.csv'}, {out / 'aggregate.csv'}, {out / 'eval_returns.json'}"
        f" and {len(list((out / 'curves').glob('*.png')))} plots"
    )


if __name__ == "__main__":
    main()
