"""The benchmark tooling: the runner (parallel, resumable, skips finished runs), the report (CSV and curves), the
speed benchmark and the W&B sweep configuration, each run on the real scripts at tiny sizes."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, SCRIPT_ENV, read_metrics, run_dirs, run_ok, tiny

from benchmarks import report, run, speed, trace_updates

RUNNER = [sys.executable, str(REPO / "benchmarks" / "run.py")]


def runner(results: Path, *args: str) -> list[str]:
    return [*RUNNER, "--results", str(results), *args]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_keys_name_the_script_env_flags_and_seed_and_seeds_come_outermost():
    assert run.run_key("happo_mpe.py", "simple_spread_v3", ["--num-envs", "8", "--no-sequential"], 2) == (
        "happo_mpe__simple_spread_v3__num-envs=8,no-sequential__s2"
    )
    assert run.run_key("matrpo_admm.py", None, [], 1) == "matrpo_admm__default__default__s1"
    assert run.run_key("happo_mamujoco.py", "Humanoid-9|8", [], 1) == "happo_mamujoco__Humanoid-9_8__default__s1"
    args = run.parse_args(["--scripts", "happo_mpe.py", "hatrpo_mpe.py", "--env-ids", "a", "b", "--seeds", "1", "2"])
    order = [(r["seed"], r["script"], r["env_id"]) for r in run.plan(args)]
    assert order == [(s, p, e) for s in (1, 2) for p in ("happo_mpe.py", "hatrpo_mpe.py") for e in ("a", "b")]


def test_runner_stops_on_sigterm_resumes_from_the_checkpoint_and_skips_finished_runs(tmp_path):
    results = tmp_path / "results"
    command = runner(results, "--scripts", "happo_mpe.py", "--seeds", "3", "--", *tiny(4000))
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=SCRIPT_ENV)
    folder = results / run.run_key("happo_mpe.py", None, [*tiny(4000)], 3)

    def saved_step() -> int:  # the step of the run's checkpoint, which it writes at the start and after each iteration
        path = run.latest_checkpoint(folder)
        return torch.load(path, weights_only=False)["global_step"] if path else 0

    deadline = time.time() + 120
    while saved_step() == 0 and time.time() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 128 + signal.SIGTERM, first.stdout.read()
    (stopped,) = read_jsonl(folder / "segments.jsonl")
    assert stopped["returncode"] == 128 + signal.SIGTERM and stopped["resumed_from_step"] is None
    assert not (folder / "done").exists() and not (folder / "failed").exists()
    stopped_at = saved_step()
    assert 0 < stopped_at < 4000

    second = subprocess.run(command, capture_output=True, text=True, env=SCRIPT_ENV)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming" in second.stdout
    segments = read_jsonl(folder / "segments.jsonl")
    assert [s["returncode"] for s in segments] == [128 + signal.SIGTERM, 0]
    assert segments[1]["resumed_from_step"] == stopped_at  # resumed from the checkpoint the stop left
    assert (folder / "done").exists() and run.state(folder) == "done"
    os.close(run.lock_run(folder))  # the runner and the script let go of the lock
    (run_dir,) = folder.glob("runs/*")  # the resumed process continued the same run
    lines = read_jsonl(run_dir / "metrics.jsonl")
    steps = [m["global_step"] for m in lines if "charts/SPS" in m]
    assert steps == list(range(50, 4001, 50))  # every iteration once, none lost or repeated
    assert "eval/episodic_return" in lines[-1]
    assert json.loads((folder / "run.json").read_text())["seed"] == 3

    third = subprocess.run(command, capture_output=True, text=True, env=SCRIPT_ENV)
    assert third.returncode == 0 and f"skip {folder.name}: done" in third.stdout
    assert len(read_jsonl(folder / "segments.jsonl")) == 2

    # the report reads the same folder: one configuration, one finished seed, every step counted
    out = tmp_path / "report"
    report.main(["--results", str(results), "--out", str(out), "--anchors", str(tmp_path / "none")])
    (row,) = list(csv.DictReader(open(out / "summary.csv")))
    assert (row["script"], row["seeds"], row["finished"], float(row["steps_mean"])) == (
        "happo_mpe.py",
        "3",
        "1",
        4000.0,
    )
    metrics = [m for m in lines if "charts/SPS" in m]
    wall = report.training_seconds(
        [m["global_step"] for m in metrics], [m["charts/SPS"] for m in metrics], [stopped_at]
    )
    assert float(row["wall_seconds_mean"]) == pytest.approx(wall[-1], rel=1e-5)
    assert float(row["env_steps_per_second_mean"]) == pytest.approx(4000 / wall[-1], rel=1e-5)
    assert sum(s["ended"] - s["started"] for s in segments) > wall[-1]  # the processes also started up and evaluated
    assert (out / "curves" / "happo_mpe.png").stat().st_size > 10_000  # no --env-id: named after the script


def test_runner_marks_failed_runs_and_retries_them_only_when_asked(tmp_path):
    command = runner(tmp_path, "--scripts", "hatrpo_mpe.py", "--seeds", "1", "--", "--num-envs", "0")
    first = subprocess.run(command, capture_output=True, text=True, env=SCRIPT_ENV)
    assert first.returncode == 1 and "failed (exit code 2" in first.stdout
    (folder,) = tmp_path.iterdir()
    assert (folder / "failed").exists() and "--num-envs must be positive" in (folder / "output.log").read_text()
    again = subprocess.run(command, capture_output=True, text=True, env=SCRIPT_ENV)
    assert again.returncode == 0 and "skip" in again.stdout and ": failed" in again.stdout
    retried = subprocess.run([*command[:-3], "--retry-failed", *command[-3:]], capture_output=True, text=True)
    assert retried.returncode == 1 and len(read_jsonl(folder / "segments.jsonl")) == 2


def test_two_runners_sharing_a_results_folder_never_start_the_same_run(tmp_path):
    command = runner(tmp_path, "--scripts", "happo_mpe.py", "--seeds", "1", "2", "--workers", "1", "--", *tiny(200))
    runners = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=SCRIPT_ENV) for _ in range(2)]
    outputs = [r.communicate(timeout=300)[0] for r in runners]
    assert [r.returncode for r in runners] == [0, 0], outputs
    folders = sorted(tmp_path.iterdir())
    assert len(folders) == 2 and all((f / "done").exists() for f in folders)
    assert [len(read_jsonl(f / "segments.jsonl")) for f in folders] == [1, 1], outputs


CLAIM_AND_HOLD = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from benchmarks import run
go = Path(sys.argv[3])
while not go.exists():  # start together, to race for the claim
    time.sleep(0.001)
lock = run.claim(Path(sys.argv[2]), retry_failed=False)
print("claimed" if lock is not None else "refused", flush=True)
time.sleep(float(sys.argv[4]))
"""


def claimers(folder: Path, go: Path, count: int, hold_seconds: float) -> list[subprocess.Popen]:
    command = [sys.executable, "-c", CLAIM_AND_HOLD, str(REPO), str(folder), str(go), str(hold_seconds)]
    return [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(count)]


def test_processes_racing_for_a_run_claim_it_exactly_once(tmp_path):
    """Six processes released at once claim each of five runs: one wins each run, also on a loaded machine, where the
    old pid-file lock let a runner remove a lock that another had just created."""
    go = tmp_path / "go"
    racers = {n: claimers(tmp_path / f"run{n}", go, count=6, hold_seconds=1.0) for n in range(5)}
    time.sleep(1.0)  # let the interpreters start and wait for the signal
    go.write_text("")
    for n, processes in racers.items():
        outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in processes)
        assert outcomes == ["claimed"] + ["refused"] * 5, (n, outcomes)


def test_a_run_is_claimed_once_unlocked_when_its_holder_dies_and_never_claimed_after_it_finished(tmp_path):
    folder = tmp_path / "run"
    assert run.state(folder) == "todo"
    lock = run.claim(folder, retry_failed=False)
    assert lock is not None and run.state(folder) == "running"
    assert run.claim(folder, retry_failed=False) is None  # held (by this process, through another descriptor)
    os.close(lock)
    assert run.state(folder) == "todo"
    (holder,) = claimers(folder, go=tmp_path, count=1, hold_seconds=600)  # go exists: claims at once, then holds
    assert holder.stdout.readline().strip() == "claimed" and run.state(folder) == "running"
    holder.kill()  # a runner killed while its run runs: the kernel releases the lock
    holder.wait()
    assert run.state(folder) == "todo"
    (folder / "failed").write_text("")  # finished by another runner between its planning and its claim
    assert run.claim(folder, retry_failed=False) is None
    lock = run.claim(folder, retry_failed=True)
    assert lock is not None
    os.close(lock)
    (folder / "done").write_text("")
    assert run.claim(folder, retry_failed=True) is None and run.state(folder) == "done"


def test_the_run_holds_its_lock_even_when_its_runner_is_killed(tmp_path):
    command = runner(tmp_path, "--scripts", "happo_mpe.py", "--seeds", "1", "--", *tiny(100_000))
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=SCRIPT_ENV)
    assert first.stdout.readline().startswith("starting")
    first.kill()  # SIGKILL: the runner cannot stop its run, which goes on in a session of its own
    first.wait()
    (folder,) = tmp_path.iterdir()
    assert run.state(folder) == "running"
    second = subprocess.run(command, capture_output=True, text=True, env=SCRIPT_ENV, timeout=120)
    assert second.returncode == 0 and f"skip {folder.name}: running" in second.stdout
    script_pid = int((folder / "running").read_text().split("script ")[1].split()[0])
    os.kill(script_pid, signal.SIGKILL)
    deadline = time.time() + 60
    while run.state(folder) == "running" and time.time() < deadline:
        time.sleep(0.1)
    assert run.state(folder) == "todo"


def test_runner_rejects_an_unknown_script_in_one_line(tmp_path):
    result = subprocess.run(runner(tmp_path, "--scripts", "mappo_mpe.py"), capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "mappo_mpe.py" in result.stderr and "happo_mpe.py" in result.stderr


def test_training_seconds_restart_each_process_at_the_step_it_resumed_from():
    steps, sps = [100, 200, 300, 400], [100, 100, 50, 50]
    assert report.training_seconds(steps, sps, []).tolist() == [1.0, 2.0, 6.0, 8.0]
    # resumed at step 200: the second process's SPS counts from there, after the 2 s the first took to reach it
    assert report.training_seconds(steps, sps, [200]).tolist() == [1.0, 2.0, 4.0, 6.0]


def write_run(results: Path, seed: int, returns: list[float], flags=("--total-timesteps", "40000")):
    """A results folder as the runner leaves it, with one return logged every 10k steps at 1000 steps/s."""
    folder = results / f"happo_mpe__x__s{seed}"
    (folder / "runs" / "r").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(dict(script="happo_mpe.py", env_id="x", flags=list(flags), seed=seed)))
    lines = [{"global_step": 10_000 * (i + 1), "charts/SPS": 1000, report.RETURN: r} for i, r in enumerate(returns)]
    lines.append({"global_step": 10_000 * len(returns), "eval/episodic_return": returns[-1] + 1})
    (folder / "runs" / "r" / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines))
    (folder / "done").write_text("")


def test_report_averages_the_last_window_of_each_seed_then_over_seeds(tmp_path):
    write_run(tmp_path, 1, [-80.0, -70.0, -60.0, -50.0])
    write_run(tmp_path, 2, [-90.0, -80.0, -40.0, -30.0])
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    rows = ["algo,seed,kind,step,return", "happo,1,train,10000,-75", "happo,1,train,20000,-65", "happo,1,eval,20000,0"]
    (anchors / "harl_x_discrete.csv").write_text("\n".join(rows))
    out = tmp_path / "out"
    report.main(["--results", str(tmp_path), "--out", str(out), "--anchors", str(anchors), "--window", "20000"])
    (row,) = list(csv.DictReader(open(out / "summary.csv")))
    # window (20k, 40k]: seed 1 (-60 - 50) / 2 = -55, seed 2 (-40 - 30) / 2 = -35
    assert float(row["final_return_mean"]) == pytest.approx(-45.0)
    assert float(row["final_return_std"]) == pytest.approx(10.0)
    assert float(row["eval_return_mean"]) == pytest.approx(-39.0)
    assert float(row["wall_seconds_mean"]) == pytest.approx(40.0)
    assert float(row["env_steps_per_second_mean"]) == pytest.approx(1000.0)
    assert (row["seeds"], row["finished"]) == ("1 2", "2")
    assert list(csv.DictReader(open(out / "milestones.csv"))) == []  # neither reached 100k steps
    assert list(out.glob("curves/*.png")) == [out / "curves" / "x.png"]


def test_report_final_return_is_taken_at_the_last_logged_step_even_when_no_episode_ended_there(tmp_path):
    """Seed 1 logs returns up to 40k and one more iteration at 50k with none: its final window is (30k, 50k]."""
    write_run(tmp_path, 1, [-80.0, -70.0, -60.0, -50.0])
    metrics = tmp_path / "happo_mpe__x__s1" / "runs" / "r" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + "\n" + json.dumps({"global_step": 50_000, "charts/SPS": 1000}))
    out = tmp_path / "out"
    report.main(
        ["--results", str(tmp_path), "--out", str(out), "--anchors", str(tmp_path / "none"), "--window", "20000"]
    )
    (row,) = list(csv.DictReader(open(out / "summary.csv")))
    assert float(row["final_return_mean"]) == -50.0  # the value at 40k alone, not the mean of 30k and 40k
    assert float(row["steps_mean"]) == 50_000


def test_report_milestones_average_the_seeds_that_reached_each_step_and_include_the_anchors(tmp_path):
    write_run(tmp_path, 1, [-80.0 + i for i in range(30)])  # 300k steps
    write_run(tmp_path, 2, [-90.0 + i for i in range(26)])  # 260k steps
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    rows = ["algo,seed,kind,step,return"] + [f"hatrpo,1,train,{10_000 * i},{-100 + i}" for i in range(1, 60)]
    (anchors / "harl_x_discrete.csv").write_text("\n".join(rows))
    out = tmp_path / "out"
    report.main(["--results", str(tmp_path), "--out", str(out), "--anchors", str(anchors), "--window", "20000"])
    rows = list(csv.DictReader(open(out / "milestones.csv")))
    got = {(m["script"], int(m["step"])): float(m["return_mean"]) for m in rows}
    # ours at 100k: seeds' (90k, 100k] values (-72, -71) and (-82, -81); at 250k (-57, -56) and (-67, -66)
    assert [m["seeds"] for m in rows if m["script"] == "happo_mpe.py"] == ["2", "2"]
    assert got == {
        ("happo_mpe.py", 100_000): pytest.approx(-76.5),
        ("happo_mpe.py", 250_000): pytest.approx(-61.5),
        ("HARL hatrpo", 100_000): pytest.approx(-90.5),
        ("HARL hatrpo", 250_000): pytest.approx(-75.5),
        ("HARL hatrpo", 500_000): pytest.approx(-50.5),
    }


def milestone_rows(results: Path) -> list[tuple]:
    """(seeds, step, training return) of each row of milestones.csv for the runs in results, without anchors."""
    out = results / "out"
    report.main(["--results", str(results), "--out", str(out), "--anchors", str(results / "none"), "--window", "20000"])
    return [(m["seeds"], int(m["step"]), float(m["return_mean"])) for m in csv.DictReader(open(out / "milestones.csv"))]


def test_report_milestone_counts_a_seed_under_way_only_once_it_reached_the_step(tmp_path):
    write_run(tmp_path, 1, [-80.0 + i for i in range(30)])  # 300k steps, done
    write_run(tmp_path, 3, [-90.0 + i for i in range(15)])  # 150k steps, still running
    (tmp_path / "happo_mpe__x__s3" / "done").unlink()
    rows = milestone_rows(tmp_path)
    # 100k: seed 1 (-72, -71) and seed 3 (-82, -81); 250k: seed 1 alone (-57, -56)
    assert rows == [("2", 100_000, pytest.approx(-76.5)), ("1", 250_000, pytest.approx(-56.5))]


def test_report_milestone_counts_a_seed_whose_last_lines_end_no_episode(tmp_path):
    """A run at 250k steps whose last logged return is at 240k (no episode ended after it) reached 250k."""
    write_run(tmp_path, 1, [-80.0 + i for i in range(24)])  # returns up to 240k steps
    metrics = tmp_path / "happo_mpe__x__s1" / "runs" / "r" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + "\n" + json.dumps({"global_step": 250_000, "charts/SPS": 1000}))
    rows = milestone_rows(tmp_path)
    # 250k: the returns in (230k, 250k], -58 at 230k excluded: -57 at 240k
    assert rows == [("1", 100_000, pytest.approx(-71.5)), ("1", 250_000, pytest.approx(-57.0))]


def test_report_rejects_a_window_that_is_not_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.parse_args(["--window", "0"])
    assert exit_info.value.code == 2 and "--window must be a positive" in capsys.readouterr().err


def test_window_mean_is_nan_without_points():
    assert math.isnan(report.window_mean(np.array([5.0]), np.array([1.0]), at=100.0, window=10.0))


def test_speed_benchmark_writes_training_env_only_and_their_ratio(tmp_path):
    """With --against, the script as of a git revision (here HEAD) trains too, and the speedup is the ratio of both."""
    out = tmp_path / "speed.csv"
    speed.main(["--only", "happo_mpe.py", "--iterations", "1", "--env-steps", "800", "--against", "HEAD",
                "--out", str(out)])  # fmt: skip
    (row,) = list(csv.DictReader(open(out)))
    training, before, after, then = (
        float(row[k]) for k in ("training_env_steps_per_second", "env_only_before", "env_only_after", "training_then")
    )
    assert training > 0 and before > 0 and after > 0 and then > 0 and row["against"] == "HEAD"
    assert float(row["ratio"]) == pytest.approx(training / ((before + after) / 2), abs=2e-3)
    assert float(row["speedup"]) == pytest.approx(training / then, abs=6e-3)
    with pytest.raises(SystemExit):
        speed.parse_args(["--only", "mappo_mpe.py"])


def test_sweep_configuration_runs_the_script_as_the_wandb_agent_would(tmp_path):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load((REPO / "benchmarks" / "sweep.yaml").read_text())
    assert (REPO / sweep["program"]).is_file() and sweep["method"] == "grid"
    first = {
        name: {"value": p["values"][0] if "values" in p else p["value"]} for name, p in sweep["parameters"].items()
    }
    # the agent's substitution of the command's macros (wandb_agent.py), from the repository root
    macros = create_sweep_command_args({"args": first}) | {
        "env": [], "interpreter": [sys.executable], "program": [str(REPO / sweep["program"])]
    }  # fmt: skip
    command = [part for c in sweep["command"] for part in (macros[c[2:-1]] if c.startswith("${") else [c])]
    assert "--track" in command and "--save-model" in command and "--seed=1" in command
    result = subprocess.run([*command, *tiny(100)], cwd=tmp_path, capture_output=True, text=True, env=SCRIPT_ENV)
    assert result.returncode == 0, result.stderr  # the tiny sizes after the sweep's flags override its budget
    (run_dir,) = (tmp_path / "runs").iterdir()
    args = json.loads((run_dir / "args.json").read_text())
    assert (args["env_id"], args["seed"], args["track"], args["total_timesteps"]) == ("simple_spread_v3", 1, True, 100)


def test_report_evaluation_milestones_sit_beside_the_published_points(tmp_path):
    """Evaluation lines every 50k steps (value = step / 1000); the milestone at s averages those in (s - 20k, s + 20k]
    over seeds; the published evaluation returns join milestones.csv at their own steps."""
    for seed, offset in ((1, 0.0), (2, 10.0)):
        write_run(tmp_path, seed, [-80.0 + i for i in range(30)])
        metrics = tmp_path / f"happo_mpe__x__s{seed}" / "runs" / "r" / "metrics.jsonl"
        evals = [{"global_step": s, "eval/episodic_return": s / 1000 + offset} for s in range(50_000, 300_001, 50_000)]
        metrics.write_text(metrics.read_text() + "\n" + "\n".join(json.dumps(m) for m in evals))
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    (anchors / "published_eval.csv").write_text("source,algo,env_id,step,eval_return\npaper,happo,x,250000,7000\n")
    out = tmp_path / "out"
    report.main(["--results", str(tmp_path), "--out", str(out), "--anchors", str(anchors), "--window", "20000"])
    got = {
        (m["script"], int(m["step"])): (m["eval_mean"], m["eval_std"])
        for m in csv.DictReader(open(out / "milestones.csv"))
    }
    assert got == {
        ("happo_mpe.py", 100_000): ("105", "5"),  # seeds 100 and 110
        ("happo_mpe.py", 250_000): ("255", "5"),
        ("paper: happo", 250_000): ("7000", "nan"),
    }
    assert list(out.glob("curves/*.png")) == [out / "curves" / "x.png"]


def write_10m_run(results: Path, script: str, env_id: str, seed: int, evaluations: list):
    """A finished 10M-step MaMuJoCo run whose evaluations are (step, [per-episode returns] or a logged mean alone)."""
    folder = results / f"{Path(script).stem}__{env_id}__s{seed}"
    (folder / "runs" / "r").mkdir(parents=True)
    run = dict(script=script, env_id=env_id, flags=["--total-timesteps", "10000000"], seed=seed)
    (folder / "run.json").write_text(json.dumps(run))
    lines = [{"global_step": 10_000_000, "charts/SPS": 1000, report.RETURN: 1.0}]
    for step, returns in evaluations:
        line = {"global_step": step, "eval/episodic_return": float(np.mean(returns))}
        if isinstance(returns, list):  # else a run from before the scripts logged each episode's return
            line["eval/episodic_returns"] = returns
        lines.append(line)
    (folder / "runs" / "r" / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines))
    (folder / "done").write_text("")


def test_report_interquartile_means_intervals_and_probability_of_improvement_against_brute_force(tmp_path):
    finals = {  # final evaluation returns of seeds 1-4 (HAPPO, 4 seeds) and 1-3 (HATRPO) on two tasks
        ("happo_mamujoco.py", "Ant-4x2"): [5000.0, 6200.0, 5400.0, 7000.0],
        ("happo_mamujoco.py", "Hopper-3x1"): [3000.0, 3600.0, 2500.0, 3300.0],
        ("hatrpo_mamujoco.py", "Ant-4x2"): [4000.0, 6000.0, 5200.0],
        ("hatrpo_mamujoco.py", "Hopper-3x1"): [3500.0, 3100.0, 2900.0],
    }
    for (script, env_id), values in finals.items():
        for seed, value in enumerate(values, 1):
            write_10m_run(tmp_path, script, env_id, seed, [(10_000_000, [value - 10.0, value, value + 10.0])])
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    harl = {("happo", "Ant-4x2"): 6000.0, ("happo", "Hopper-3x1"): 3500.0, ("hatrpo", "Ant-4x2"): 5000.0,
            ("hatrpo", "Hopper-3x1"): 3500.0}  # fmt: skip
    rows = ["source,algo,env_id,step,eval_return"] + [f"HARL x,{a},{e},10000000,{v}" for (a, e), v in harl.items()]
    (anchors / "published_eval.csv").write_text("\n".join(rows))
    out = tmp_path / "out"
    report.main(["--results", str(tmp_path), "--out", str(out), "--anchors", str(anchors)])

    def brute_iqm(values) -> float:  # the mean of the values left after dropping floor(n / 4) from each end
        values, cut = sorted(values), len(values) // 4
        return float(np.mean(values[cut : len(values) - cut]))

    summary = {(r["script"], r["env_id"]): r for r in csv.DictReader(open(out / "summary.csv"))}
    for key, values in finals.items():
        row = summary[key]
        iqm, low, high = (float(row[k]) for k in ("eval_return_iqm", "eval_return_iqm_low", "eval_return_iqm_high"))
        assert iqm == pytest.approx(brute_iqm(values), rel=1e-5)  # the CSV keeps 6 significant digits
        assert min(values) <= low < iqm < high <= max(values)  # a real interval within the seeds' range
    aggregate = {r["statistic"][:3] + r["script"]: r for r in csv.DictReader(open(out / "aggregate.csv"))}
    for script in ("happo_mamujoco.py", "hatrpo_mamujoco.py"):  # the first 3 seeds of each task, normalised
        normalised = [v / harl[script.split("_")[0], e] for (s, e), vs in finals.items() if s == script for v in vs[:3]]
        row = aggregate["IQM" + script]
        assert row["tasks"] == "Ant-4x2 Hopper-3x1"
        assert float(row["value"]) == pytest.approx(brute_iqm(normalised), rel=1e-5)
        assert float(row["low"]) < float(row["value"]) < float(row["high"])
    # P(X > Y) + P(X = Y) / 2 over all pairs of seeds, per task, averaged over the tasks
    pairs = [[float(x > y) + 0.5 * float(x == y) for x in finals["happo_mamujoco.py", e][:3]
              for y in finals["hatrpo_mamujoco.py", e]] for e in ("Ant-4x2", "Hopper-3x1")]  # fmt: skip
    row = aggregate["pro" + "happo_mamujoco.py vs hatrpo_mamujoco.py"]
    assert float(row["value"]) == pytest.approx(np.mean([np.mean(p) for p in pairs]), rel=1e-5)
    assert 0 <= float(row["low"]) < float(row["value"]) < float(row["high"]) <= 1
    assert (out / "curves" / "performance_profile.png").stat().st_size > 10_000


def test_report_intervals_depend_only_on_the_scores():
    scores = np.array([[5000.0, 3000.0], [6200.0, 3600.0], [5400.0, 2500.0], [7000.0, 3300.0], [5800.0, 3100.0]])
    first = report.iqm_interval(scores)
    np.random.rand(7)  # whatever else drew from numpy's global generator in between (rliable 1.2 resamples from it)
    assert report.iqm_interval(scores) == first
    assert report.iqm_interval(scores[:, :1]) != first  # other scores, another interval


def test_report_writes_every_evaluation_in_marl_evals_layout(tmp_path):
    early = [(250_000, 100.0), (500_000, [210.0, 190.0, 200.0])]  # a mean alone, then the episodes' returns
    write_10m_run(tmp_path, "happo_mamujoco.py", "Hopper-3x1", 2, early)
    out = tmp_path / "out"
    report.main(["--results", str(tmp_path), "--out", str(out), "--anchors", str(tmp_path / "none")])
    data = json.loads((out / "eval_returns.json").read_text())
    assert data == {"mamujoco": {"Hopper-3x1": {"happo --total-timesteps 10000000": {"seed_2": {
        "step_0": {"step_count": 250_000, "return": [100.0]},
        "step_1": {"step_count": 500_000, "return": [210.0, 190.0, 200.0]},
        "absolute_metrics": {"return": [210.0, 190.0, 200.0]},
    }}}}}  # fmt: skip


def test_report_mamujoco_table_has_each_milestone_the_final_interval_and_the_published_value(tmp_path):
    for seed, final in ((1, 3000.0), (2, 3400.0), (3, 3200.0)):
        milestones = [(1_000_000, [1000.0 + seed]), (2_000_000, [2000.0]), (5_000_000, [2500.0])]
        write_10m_run(tmp_path, "happo_mamujoco.py", "Hopper-3x1", seed, [*milestones, (10_000_000, [final])])
    write_10m_run(tmp_path, "hatrpo_mamujoco.py", "Ant-2x4", 1, [(10_000_000, [4000.0])])
    (tmp_path / "hatrpo_mamujoco__Ant-2x4__s1" / "done").unlink()  # still training: no final value, no hours yet
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    rows = ["source,algo,env_id,step,eval_return", "HARL published figure (gym v2),happo,Hopper-3x1,10000000,3450",
            "Kuba et al. ICLR 2022 figure (gym v2),hatrpo,Ant-2x4,10000000,4500"]  # fmt: skip
    (anchors / "published_eval.csv").write_text("\n".join(rows))
    out = tmp_path / "out"
    report.main(["--results", str(tmp_path), "--out", str(out), "--anchors", str(anchors)])
    header, rule, ant, hopper = (out / "mamujoco_table.md").read_text().splitlines()
    assert header.count("|") == rule.count("|") == ant.count("|") == hopper.count("|") == 11
    # 1M: 1001, 1002, 1003 (mean 1002, std 0.816); 10M: 3000, 3400, 3200; 10,000 s of training each at 1000 steps/s
    cells = [cell.strip() for cell in hopper.split("|")[1:-1]]
    assert cells[:3] == ["Hopper-3x1", "`happo_mamujoco.py`", "3 (3)"]
    assert cells[3:7] == ["1002 +- 1", "2000 +- 0", "2500 +- 0", "3200 +- 163"]
    iqm, low, high = (float(x) for x in cells[7].replace("[", "").replace("]", "").replace(",", "").split())
    assert iqm == 3200 and 3000 <= low < iqm < high <= 3400
    assert cells[8:] == ["3450 (HARL published)", "2.8"]
    ant_cells = [cell.strip() for cell in ant.split("|")[1:-1]]
    assert ant_cells[2:] == ["1 (0)", "", "", "", "4000 +- 0", "", "4500 (Kuba et al. ICLR 2022)", ""]
    assert (out / "curves" / "mamujoco_overview.png").stat().st_size > 10_000  # Hopper's curve (Ant has one point)


def trace_beside_the_resumed_script(script: str, flags: list[str], tmp_path) -> tuple[list[dict], list[dict]]:
    """Trace 2 iterations from a tiny 3-agent run's checkpoint at 100 steps, then resume the script itself from that
    checkpoint for the same 2 iterations (the reference). Returns the traced updates and the resumed iterations'
    metrics, after checking what every trace must hold: the checkpoint untouched, the positions in update order, and
    M = 1 (its effective sample size the whole batch) for the first agent, which no agent was updated before."""
    tiny_run = [*tiny(100), *flags, "--save-model"]
    run_ok(script, *tiny_run, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    checkpoint = run_dir / script.replace(".py", ".pt")
    saved = checkpoint.read_bytes()
    updates = trace_updates.main([str(checkpoint), "--iterations", "2"])
    assert checkpoint.read_bytes() == saved  # the checkpoint is untouched
    run_ok(script, *tiny_run, "--total-timesteps", "200", "--resume", str(checkpoint), cwd=tmp_path)
    resumed = [m for m in read_metrics(run_dir) if "charts/SPS" in m and m["global_step"] > 100]
    assert [u["position"] for u in updates] == [0, 1, 2, 0, 1, 2] and len(resumed) == 2
    for u in updates:
        assert u["m_max"] >= u["m_mean"] > 0 and 0 < u["m_ess"] <= 1 + 1e-12
        if u["position"] == 0:
            assert (u["m_max"], u["m_mean"], u["m_ess"]) == pytest.approx((1, 1, 1), abs=1e-12)
    return updates, resumed


def assert_traced_as_logged(updates: list[dict], resumed: list[dict], traced_values, logged_keys: tuple[str, ...]):
    """Each iteration's traced updates (in update order) carry the values its metrics log per agent."""
    for iteration, metrics in enumerate(resumed):
        traced = sorted(traced_values(u) for u in updates[3 * iteration : 3 * iteration + 3])
        logged = sorted(tuple(metrics[f"agent{i}/{k}"] for k in logged_keys) for i in range(3))
        assert traced == logged


def test_hatrpo_trace_continues_the_run_as_its_script_does_and_gives_the_first_agent_m_one(tmp_path, capsys):
    # some steps fail the improvement ratio of 1
    updates, resumed = trace_beside_the_resumed_script("hatrpo_mpe.py", ["--accept-ratio", "1"], tmp_path)
    keys = ("line_search_steps", "kl", "improvement")
    assert_traced_as_logged(updates, resumed, lambda u: (u["steps"], u["kl"], u["improvement"]), keys)
    assert {trace_updates.rejected(u) for u in updates} == {True, False}  # both outcomes occur
    for u in updates:
        assert trace_updates.rejected(u) == (u["steps"] == 10)  # ls_steps 10: no fraction accepted
    assert "per position" in capsys.readouterr().out
    torch.save(dict(script="matrpo_admm.py", args={}, global_step=0, actors=[]), tmp_path / "matrpo.pt")
    with pytest.raises(SystemExit):
        trace_updates.main([str(tmp_path / "matrpo.pt")])
    valid = "valid: hatrpo_mamujoco.py, hatrpo_mpe.py, happo_mamujoco.py, happo_mpe.py"
    assert f"made by matrpo_admm.py; {valid}" in capsys.readouterr().err


def test_happo_trace_continues_the_run_as_its_script_does_and_gives_the_first_agent_m_one(tmp_path, capsys):
    updates, resumed = trace_beside_the_resumed_script("happo_mpe.py", [], tmp_path)
    epochs = 5  # ppo_epochs, with 1 minibatch: happo_update's means are its totals over 5
    keys = ("policy_loss", "approx_kl")
    assert_traced_as_logged(updates, resumed, lambda u: tuple(u["totals"][k] / epochs for k in keys), keys)
    for u in [u for u in updates if u["position"] > 0]:  # the agents updated before these moved: M differs from 1
        assert u["m_max"] > 1 and u["m_ess"] < 1
    out = capsys.readouterr().out
    assert "per position" in out and "rejected" not in out
