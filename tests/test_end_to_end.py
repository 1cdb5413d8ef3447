"""Every script run as a user runs it: tasks, outputs, checkpoints, resume, evaluation, errors, determinism."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    MPE_SCRIPTS,
    REPO,
    SCRIPT_ENV,
    SCRIPTS,
    TINY,
    family,
    load_script,
    read_metrics,
    run_dirs,
    run_ok,
    run_script,
    script_command,
    tiny,
    train_metrics,
)

TASKS = ["simple_spread_v3", "simple_reference_v3", "simple_speaker_listener_v4"]
NUM_AGENTS = {"simple_spread_v3": 3, "simple_reference_v3": 2, "simple_speaker_listener_v4": 2}
SHARED_METRICS = {
    "global_step", "charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
    "losses/value_loss", "losses/explained_variance",
}  # fmt: skip
AGENT_METRICS = {
    "happo": {"policy_loss", "entropy", "approx_kl", "clipfrac"},
    "hatrpo": {"policy_loss", "entropy", "approx_kl", "kl", "improvement", "expected_improvement", "line_search_steps"},
}


def expected_metrics(script: str, num_agents: int) -> set[str]:
    per_agent = AGENT_METRICS[script.split("_")[0]]
    return SHARED_METRICS | {f"agent{i}/{name}" for i in range(num_agents) for name in per_agent}


# What the harness tests below need to know about each family of scripts: a task whose random-policy episodes end
# within a few steps, a checkpoint made with some flags that the other flags refuse (and the words of the refusal), and
# bad arguments of that family with words the error line must contain.

MINIBATCHES = (
    ["--num-envs", "2", "--num-steps", "25", "--num-minibatches", "3"],
    ["50", "--num-minibatches 3", "divisible"],
)
FAMILIES = {
    "mpe": {
        "task": ["--env-id", "simple_speaker_listener_v4", "--continuous-actions"],
        "other_task": (["--env-id", "simple_spread_v3"], ["--env-id", "simple_reference_v3"],
                       ["env_id='simple_spread_v3'", "not 'simple_reference_v3'"]),
        "bad_args": [MINIBATCHES, (["--env-id", "simple_tag_v3"], ["simple_tag_v3", *TASKS])],
    },
    "mamujoco": {
        "task": ["--env-id", "Hopper-3x1"],  # a random Hopper falls over in about 20-40 steps
        "other_task": (["--env-id", "Hopper-3x1"], ["--env-id", "Walker2d-2x3"],
                       ["env_id='Hopper-3x1'", "not 'Walker2d-2x3'"]),
        "bad_args": [MINIBATCHES] + [
            (["--env-id", env_id], [repr(env_id), "HalfCheetah-2x3", "Ant-2x4", "Humanoid-9|8", "ManySegmentAnt-NxK"])
            for env_id in ["Foo-2x3", "HalfCheetah-5x5", "ManySegmentAnt-0x3", "ManySegmentAnt-NxK", "HalfCheetah2x3"]
        ],
    },
    "admm": {
        "task": ["--max-cycles", "25", "--critic-minibatch-size", "25"],  # episodes and minibatches that fit TINY
        "other_task": (["--max-cycles", "25", "--critic-minibatch-size", "25"], ["--num-agents", "4"],
                       ["num_agents=3", "not 4"]),
        "bad_args": [
            (["--mode", "decentralized"], ["--mode", "'decentralized'", "admm, independent, centralized"]),
            (["--edge-order", "sorted"], ["--edge-order", "'sorted'", "random, round-robin"]),
            (["--x-update", "exact"], ["--x-update", "'exact'", "linearized, prox"]),
            (["--advantage-norm", "none"], ["--advantage-norm", "'none'", "pooled, local"]),
            (["--num-agents", "1"], ["--num-agents", ">= 2"]),
            (["--admm-rho", "0"], ["--admm-rho", "positive"]),
            (["--num-envs", "2", "--num-steps", "25"], ["--critic-minibatch-size 64", "50"]),
        ],
    },
}  # fmt: skip


def task(script: str) -> list[str]:
    return FAMILIES[family(script)]["task"]


@pytest.mark.parametrize("continuous", [False, True], ids=["discrete", "continuous"])
@pytest.mark.parametrize("env_id", TASKS)
@pytest.mark.parametrize("script", MPE_SCRIPTS)
def test_task_runs_two_iterations(script, env_id, continuous, tmp_path):
    flags = ["--continuous-actions"] if continuous else []
    run_ok(script, "--env-id", env_id, *flags, *TINY, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    metrics = read_metrics(run_dir)
    assert [m["global_step"] for m in metrics] == [50, 100]
    for line in metrics:
        assert set(line) == expected_metrics(script, NUM_AGENTS[env_id])
        assert all(math.isfinite(value) for value in line.values())
        assert line["charts/episodic_length"] == 25
    args = json.loads((run_dir / "args.json").read_text())
    assert args["env_id"] == env_id and args["batch_size"] == 50 and args["num_iterations"] == 2


@pytest.mark.parametrize("script", [s for s in SCRIPTS if hasattr(load_script(s).Args, "fixed_order")])
def test_ablation_flags_and_learning_rate_annealing(script, tmp_path):
    run_ok(script, *task(script), *TINY, "--fixed-order", "--no-sequential", "--anneal-lr", cwd=tmp_path)
    metrics = read_metrics(run_dirs(tmp_path)[0])
    # linear decay of the default 5e-4 over the 2 iterations (the actors' rate in HAPPO, the critic's in HATRPO)
    assert [m["charts/learning_rate"] for m in metrics] == [5e-4, 2.5e-4]
    assert all(math.isfinite(value) for line in metrics for value in line.values())


@pytest.mark.parametrize("script", SCRIPTS)
def test_save_resume_and_evaluate(script, tmp_path):
    result = run_ok(script, *task(script), *TINY, "--save-model", "--eval-episodes", "3", cwd=tmp_path)
    assert "eval/episodic_return=" in result.stdout
    (run_dir,) = run_dirs(tmp_path)
    checkpoint_path = run_dir / f"{script[:-3]}.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert checkpoint["global_step"] == 100 and checkpoint["iteration"] == 2

    # resume to 200 steps: the step count and the metrics file continue
    run_ok(script, *task(script), *tiny(200), "--save-model", "--resume", str(checkpoint_path), cwd=tmp_path)
    assert run_dirs(tmp_path) == [run_dir]
    metrics = read_metrics(run_dir)
    assert [m["global_step"] for m in train_metrics(metrics)] == [50, 100, 150, 200]
    assert [m["global_step"] for m in metrics if "eval/episodic_return" in m] == [100, 200]
    assert torch.load(checkpoint_path, weights_only=False)["global_step"] == 200

    # evaluation only, with a video of the first episode
    result = run_ok(script, *task(script), "--eval-checkpoint", str(checkpoint_path), "--eval-episodes", "2",
                    "--hidden-sizes", "16", "16", "--capture-video", cwd=tmp_path)  # fmt: skip
    assert "eval/episodic_return=" in result.stdout
    eval_dir = next(d for d in run_dirs(tmp_path) if d != run_dir)
    (eval_line,) = read_metrics(eval_dir)
    assert eval_line["global_step"] == 200 and math.isfinite(eval_line["eval/episodic_return"])
    assert list((eval_dir / "videos").glob("*.mp4"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_interrupt_saves_a_checkpoint_that_resumes(script, tmp_path):
    cmd = script_command(script, *task(script), *tiny(1_000_000), "--save-model")
    process = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=SCRIPT_ENV)  # fmt: skip
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/metrics.jsonl")) or not read_metrics(run_dirs(tmp_path)[0]):
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    (run_dir,) = run_dirs(tmp_path)
    checkpoint_path = run_dir / f"{script[:-3]}.pt"
    last_step = train_metrics(read_metrics(run_dir))[-1]["global_step"]
    saved_step = torch.load(checkpoint_path, weights_only=False)["global_step"]
    # the checkpoint follows each metrics line: a signal in between leaves it one iteration behind
    assert saved_step in (last_step, last_step - 50) and f"global_step={saved_step}" in stdout and "--resume" in stdout

    run_ok(script, *task(script), *tiny(last_step + 50), "--resume", str(checkpoint_path), cwd=tmp_path)
    steps = [m["global_step"] for m in train_metrics(read_metrics(run_dir))]
    assert steps == list(range(50, last_step + 100, 50))  # each step once: the lines after the checkpoint were redone


@pytest.mark.parametrize("script", SCRIPTS)
def test_track_logs_the_metrics_to_wandb_offline(script, tmp_path):
    run_ok(script, *task(script), *TINY, "--track", cwd=tmp_path)  # run_script sets WANDB_MODE=offline
    (record,) = tmp_path.glob("runs/*/wandb/offline-run-*/run-*.wandb")
    data = record.read_bytes()  # protobuf records: metric names are stored as plain strings
    assert b"charts/SPS" in data and b"agent0/policy_loss" in data  # logged every iteration


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_gives_identical_metrics(script, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run_ok(script, *task(script), *TINY, "--seed", "7", cwd=tmp_path / name)
    first, second = (train_metrics(read_metrics(run_dirs(tmp_path / name)[0])) for name in ("a", "b"))
    for line in first + second:
        for name in ("charts/SPS", "charts/update_seconds"):  # wall-clock times
            line.pop(name, None)
    assert first == second


BAD_ARGUMENTS = [
    (["--num-envs", "0"], ["--num-envs", "positive"]),
    (["--num-steps", "-5"], ["--num-steps", "positive"]),
    (["--hidden-sizes", "16", "0"], ["--hidden-sizes", "positive"]),
    (["--gamma", "1.5"], ["--gamma", "(0, 1]"]),
    (["--num-envs", "2", "--num-steps", "25", "--total-timesteps", "10"], ["--total-timesteps 10", "50"]),
    (["--resume", "missing.pt"], ["missing.pt", "No such file"]),
    (["--eval-checkpoint", "missing.pt"], ["missing.pt", "No such file"]),
    (["--num-envs", "1", "--num-steps", "1"], ["--num-envs x --num-steps", "2 or more", "got 1"]),  # std of 1 sample
]  # fmt: skip


BAD_ARGUMENTS_OF_SCRIPT = [
    (script, args, words) for script in SCRIPTS for args, words in BAD_ARGUMENTS + FAMILIES[family(script)]["bad_args"]
]


@pytest.mark.parametrize(
    ("script", "args", "words"), BAD_ARGUMENTS_OF_SCRIPT, ids=lambda v: " ".join(v) if isinstance(v, list) else v
)
def test_bad_argument_exits_2_with_one_line(script, args, words, tmp_path):
    result = run_script(script, *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_of_another_task_is_refused(script, tmp_path):
    flags, other_flags, words = FAMILIES[family(script)]["other_task"]
    run_ok(script, *flags, *TINY, "--save-model", "--eval-episodes", "1", cwd=tmp_path)
    (checkpoint_path,) = tmp_path.glob("runs/*/*.pt")
    result = run_script(script, "--eval-checkpoint", str(checkpoint_path), *other_flags, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert all(word in line for word in words), line


# A learning rate of 1e20 makes the first update's parameters NaN/inf; the error names what went wrong. HATRPO's actors
# have no learning rate (their step is bounded by the KL threshold), so only the critic can diverge there.
NON_FINITE_TRIGGERS = [
    (script, flag, named)
    for script in SCRIPTS
    for flag, named in [("--critic-learning-rate", "losses/value_loss"), ("--learning-rate", "agent")]
    if hasattr(load_script(script).Args, flag[2:].replace("-", "_"))
]


@pytest.mark.parametrize(("script", "flag", "named"), NON_FINITE_TRIGGERS)
def test_non_finite_update_stops_and_keeps_the_last_good_checkpoint(script, flag, named, tmp_path):
    result = run_script(script, *task(script), *TINY, flag, "1e20", "--save-model", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {named}") and "nan" in line.lower(), line
    (checkpoint_path,) = tmp_path.glob("runs/*/*.pt")
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert checkpoint["global_step"] == 0  # the last good state, from before the update
    states = [*checkpoint["actors"], *checkpoint.get("critics", [checkpoint.get("critic")])]
    assert all(torch.isfinite(p).all() for state in states for p in state.values())


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_of_another_script_is_refused(script, tmp_path):
    """A HATRPO checkpoint given to HAPPO (and the reverse; MATRPO gets HAPPO's): one line naming the script
    that made it, exit code 2."""
    others = [s for s in SCRIPTS if s != script]
    other = next((s for s in others if family(s) == family(script)), others[0])
    run_ok(other, *task(other), *TINY, "--save-model", "--eval-episodes", "1", cwd=tmp_path)
    (checkpoint_path,) = tmp_path.glob("runs/*/*.pt")
    result = run_script(script, *task(script), *tiny(200), "--resume", str(checkpoint_path), cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "another script" in line and str(checkpoint_path.name) in line and other in line, line


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: "), line
    return line


@pytest.mark.parametrize("script", MPE_SCRIPTS[:1])
def test_unwritable_run_folder_is_one_error_line(script, tmp_path):
    (tmp_path / "runs").write_text("a file where the runs folder goes")
    line = one_error_line(run_script(script, *TINY, cwd=tmp_path))
    assert "cannot write the run folder" in line, line


@pytest.mark.parametrize("script", MPE_SCRIPTS[:1])
def test_track_without_a_wandb_login_outside_a_terminal_names_both_fixes(script, tmp_path):
    env = {k: v for k, v in SCRIPT_ENV.items() if not k.startswith("WANDB_")} | {"HOME": str(tmp_path)}
    result = subprocess.run(script_command(script, *TINY, "--track"), cwd=tmp_path, capture_output=True, text=True,
                            env=env, stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
    line = one_error_line(result)
    assert "wandb login" in line and "WANDB_MODE=offline" in line, line
    assert not (tmp_path / "runs").exists()  # no empty run folder left behind


@pytest.mark.parametrize("script", MPE_SCRIPTS[:1])
def test_run_folder_names_paste_into_a_shell_and_a_cut_metrics_line_is_dropped_on_resume(script, tmp_path):
    run_ok(script, *TINY, "--exp-name", "a|b c", "--save-model", "--eval-interval", "0", cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    assert "|" not in run_dir.name and " " not in run_dir.name and "a_b_c" in run_dir.name
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"global_step": 1')  # a crash cut the last line
    (checkpoint_path,) = run_dir.glob("*.pt")
    result = run_ok(script, *tiny(150), "--exp-name", "a|b c", "--resume", str(checkpoint_path), cwd=tmp_path)
    assert "warning: dropped line" in result.stderr
    assert [m["global_step"] for m in train_metrics(read_metrics(run_dir))] == [50, 100, 150]


@pytest.mark.parametrize("script", SCRIPTS)
def test_import_has_no_side_effects(script, tmp_path):
    code = f"import {script[:-3]}"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": ""})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []
