"""Run scripts x env ids x seeds as parallel processes, under one results folder, resumably.

    python benchmarks/run.py --scripts happo_mpe.py hatrpo_mpe.py --env-ids simple_spread_v3 --seeds 1 2 3 \
        --workers 2 -- --num-envs 8 --total-timesteps 2000000

Everything after `--` is passed to every run. Each run (script, env id, flags, seed) has its own folder
{results}/{key}/, which is the script's working directory:

    run.json          what the run is: script, env id, flags, seed
    runs/{run_name}/  the script's own outputs: args.json, metrics.jsonl, the checkpoint
    output.log        the script's stdout and stderr, appended over restarts
    segments.jsonl    one line per process: start and end time, the step it resumed from, exit code
    done / failed     written when the script exits 0 after its final evaluation / with an error
    running           the run's lock (an flock, held by the runner and the script while the run runs)

Runs are started with --save-model. Ctrl-C or SIGTERM asks every run to save the state after its last completed
iteration and stop (a second signal kills them); the same command later resumes each unfinished run from its
checkpoint and skips finished ones.
The runner imports nothing from the scripts: it runs them as programs.
"""

import argparse
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scripts", nargs="+", required=True, help="scripts to run, e.g. happo_mpe.py")
    parser.add_argument("--env-ids", nargs="*", default=[], help="values of --env-id; none: the script's default")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="runs at a time")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="results folder")
    parser.add_argument("--retry-failed", action="store_true", help="run again the runs that failed")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then flags passed to every run")
    args = parser.parse_args(argv)
    args.flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    for script in args.scripts:
        if not (REPO / script).is_file():
            valid = sorted(p.name for p in REPO.glob("*.py"))
            parser.exit(2, f"error: script {script!r} not found in {REPO}; valid: {', '.join(valid)}\n")
    if args.workers < 1:
        parser.exit(2, f"error: --workers must be >= 1, got {args.workers}\n")
    return args


def run_key(script: str, env_id: str | None, flags: list[str], seed: int) -> str:
    """A readable folder name: script stem, env id, flags, seed (e.g. happo_mpe__simple_spread_v3__num-envs=8__s1)."""
    tag = re.sub(r"\s+(?!--)", "=", " ".join(flags)).replace("--", "").strip().replace(" ", ",") or "default"
    name = f"{Path(script).stem}__{env_id or 'default'}__{tag}__s{seed}"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def plan(args) -> list[dict]:
    """One entry per run, seeds outermost so that every configuration gets its first seed early."""
    runs = []
    for seed in args.seeds:
        for script in args.scripts:
            for env_id in args.env_ids or [None]:
                key = run_key(script, env_id, args.flags, seed)
                runs.append(dict(key=key, script=script, env_id=env_id, flags=args.flags, seed=seed))
    return runs


def latest_checkpoint(run_folder: Path) -> str | None:
    checkpoints = list(run_folder.glob("runs/*/*.pt"))  # the scripts write {exp_name}.pt atomically
    return str(max(checkpoints, key=os.path.getmtime)) if checkpoints else None


def lock_run(run_folder: Path) -> int | None:
    """Take the run's lock, an flock on {run_folder}/running: the kernel releases it when the last process holding it
    exits, however it exits, so a lock is never stale and never removed from under its holder. Returns the open
    descriptor that holds it, or None when another process holds it."""
    run_folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(run_folder / "running", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def state(run_folder: Path) -> str:
    """done, failed, running (by this or another runner), or todo."""
    if (run_folder / "done").exists():
        return "done"
    if (run_folder / "failed").exists():
        return "failed"
    if not (run_folder / "running").exists():
        return "todo"
    lock = lock_run(run_folder)
    if lock is None:
        return "running"
    os.close(lock)
    return "todo"


def claim(run_folder: Path, retry_failed: bool) -> int | None:
    """Lock a run that is still to do, so that runners sharing a results folder never start it twice. Returns the
    lock's descriptor (held until the run ends), or None if another runner holds the run or has finished it."""
    lock = lock_run(run_folder)
    # another runner may have finished the run since it was planned (it writes done or failed before it unlocks)
    if lock is not None and ((run_folder / "done").exists() or ((run_folder / "failed").exists() and not retry_failed)):
        os.close(lock)
        return None
    return lock


def start(run: dict, results: Path, lock: int) -> subprocess.Popen:
    folder = results / run["key"]
    (folder / "failed").unlink(missing_ok=True)
    command = [sys.executable, str(REPO / run["script"]), "--seed", str(run["seed"]), "--save-model"]
    command += ["--env-id", run["env_id"]] if run["env_id"] else []
    command += run["flags"]
    checkpoint = latest_checkpoint(folder)
    if checkpoint:
        command += ["--resume", checkpoint]
    (folder / "run.json").write_text(json.dumps({k: run[k] for k in ("script", "env_id", "flags", "seed")}, indent=1))
    log = open(folder / "output.log", "a")
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    # a session of its own: a Ctrl-C in the terminal reaches the runner only, which then stops each run once. The run
    # inherits the lock, so the run stays locked while the script lives, even if this runner is killed
    process = subprocess.Popen(
        command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(lock,)
    )
    os.ftruncate(lock, 0)
    os.write(lock, f"runner {os.getpid()}, script {process.pid}\n".encode())  # for a person who looks
    process.run, process.folder, process.log, process.lock, process.started = run, folder, log, lock, time.time()
    process.resumed_from = checkpoint
    return process


def finish(process: subprocess.Popen, stopping: bool) -> str:
    """Record the process's segment and mark its run done or failed; returns what happened."""
    process.log.close()
    folder, returncode = process.folder, process.returncode
    output = (folder / "output.log").read_text()
    resumed = re.findall(r"resumed from .* at global_step=(\d+)", output.split("\n$ ")[-1])
    segment = dict(
        started=process.started,
        ended=time.time(),
        resumed_from_step=int(resumed[0]) if resumed else None,
        returncode=returncode,
    )
    with open(folder / "segments.jsonl", "a") as f:
        f.write(json.dumps(segment) + "\n")
    if returncode == 0:
        (folder / "done").write_text("")
        outcome = "done"
    elif stopping:  # asked to stop (exit code 143), or killed by a second Ctrl-C: resumable, not failed
        outcome = "stopped"
    else:
        (folder / "failed").write_text(f"exit code {returncode}; see output.log\n")
        outcome = f"failed (exit code {returncode}, see {folder / 'output.log'})"
    os.close(process.lock)  # unlock after done or failed is written (the lock file stays: see lock_run)
    return outcome


def main(argv=None) -> int:
    args = parse_args(argv)
    results = Path(args.results).resolve()
    queue = []
    for run in plan(args):
        status = state(results / run["key"])
        if status == "todo" or (status == "failed" and args.retry_failed):
            queue.append(run)
        else:
            print(f"skip {run['key']}: {status}")

    active, failures, signals = [], 0, []

    def request_stop(signum, frame):
        signals.append(signum)
        print(f"runner: stopping {len(active)} run(s)" + (" now" if len(signals) > 1 else ", each saving"))
        for process in active:
            process.send_signal(signal.SIGKILL if len(signals) > 1 else signal.SIGTERM)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    while queue or active:
        while queue and len(active) < args.workers and not signals:
            run = queue.pop(0)
            lock = claim(results / run["key"], args.retry_failed)
            if lock is None:  # another runner took it meanwhile
                print(f"skip {run['key']}: {state(results / run['key'])}")
                continue
            process = start(run, results, lock)
            active.append(process)
            how = f"resuming {process.resumed_from}" if process.resumed_from else "starting"
            print(f"{how}: {process.run['key']}", flush=True)
        if signals and not active:
            break
        time.sleep(0.5)
        for process in [p for p in active if p.poll() is not None]:
            active.remove(process)
            outcome = finish(process, stopping=bool(signals))
            failures += outcome.startswith("failed")
            print(f"{outcome}: {process.run['key']}", flush=True)
    if signals:
        print(f"runner: stopped; {len(queue)} run(s) not started. Run the same command again to resume.")
        return 128 + signals[0]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
