"""Training speed of each script against its environment stepped with random actions, measured in one run.

    python benchmarks/speed.py                          # all cases -> benchmarks/report/speed.csv
    python benchmarks/speed.py --only happo_mpe.py --iterations 5
    python benchmarks/speed.py --against 7d39617        # also each script as of that git revision, side by side

For each script and task: env-steps/s of the environment alone, then of training (the script run as a program for a
few iterations; its `charts/SPS` at the end), then of the environment alone again. The ratio is training / mean of the
two env-only figures. With --against REV, the script as of REV (`git show REV:SCRIPT`) trains right before the
current one, and `speedup` is current / REV. Run it on an otherwise idle machine: one process at a time, one torch
thread (the scripts' default).

"Environment alone" is the simulation work the script's env adapter needs, without the adapter: `num_envs` instances
stepped in turn in one process with uniform random actions, resetting finished episodes. MPE: pettingzoo's
parallel_env of mpe2; MaMuJoCo: gymnasium's MuJoCo v5 robot, the env mamujoco_v1 wraps (its `single_agent_env`) and
the scripts step in their default full-state mode.
"""

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# script, its task and rollout size (as in benchmarks/commands.sh), the env-only stepper, training iterations
MPE_SPREAD = dict(kind="mpe", env_id="simple_spread_v3", kwargs=dict(N=3, max_cycles=25))
CASES = [
    dict(
        script="happo_mpe.py",
        flags="--env-id simple_spread_v3 --num-envs 8 --num-steps 200",
        env=MPE_SPREAD,
        iterations=20,
    ),
    dict(
        script="hatrpo_mpe.py",
        flags="--env-id simple_spread_v3 --num-envs 8 --num-steps 200",
        env=MPE_SPREAD,
        iterations=20,
    ),
    *[
        dict(
            script=script,
            flags=f"--env-id {env_id} --num-envs 20 --num-steps 200",
            iterations=iterations,
            env=dict(kind="mamujoco", env_id=env_id, kwargs={}),
        )
        for env_id, scripts, iterations in (  # then the many-agent tasks
            ("HalfCheetah-2x3", ("happo_mamujoco.py", "hatrpo_mamujoco.py"), 8),
            ("Humanoid-17x1", ("happo_mamujoco.py", "hatrpo_mamujoco.py"), 2),
            ("HalfCheetah-6x1", ("hatrpo_mamujoco.py",), 3),
            ("Walker2d-6x1", ("hatrpo_mamujoco.py",), 3),
            ("Ant-4x2", ("hatrpo_mamujoco.py",), 3),
        )
        for script in scripts
    ],
    *[
        dict(
            script="matrpo_admm.py",
            flags=f"--mode {mode} --num-envs 10 --num-steps 1000",
            iterations=iterations,
            env=dict(kind="mpe", env_id="simple_spread_v3", kwargs=dict(N=3, local_ratio=1.0, max_cycles=100)),
        )
        for mode, iterations in (("admm", 2), ("independent", 4), ("centralized", 4))
    ],
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="scripts to measure (default: all five)")
    parser.add_argument("--iterations", type=int, default=0, help="training iterations (default: per case)")
    parser.add_argument("--env-steps", type=int, default=40_000, help="env steps of each env-only measurement")
    parser.add_argument("--against", default=None, help="a git revision: also train each script as of it")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "report" / "speed.csv"))
    args = parser.parse_args(argv)
    valid = sorted({case["script"] for case in CASES})
    unknown = sorted(set(args.only) - set(valid))
    if unknown:
        parser.exit(2, f"error: unknown script(s) {', '.join(unknown)}; valid: {', '.join(valid)}\n")
    return args


def flag_value(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


def env_steps_per_second(kind: str, env_id: str, kwargs: dict, num_envs: int, env_steps: int, seed: int = 0) -> float:
    """Env steps per second of num_envs instances stepped in turn with uniform random actions."""
    rng = np.random.default_rng(seed)
    if kind == "mpe":
        import importlib

        envs = [importlib.import_module(f"mpe2.{env_id}").parallel_env(**kwargs) for _ in range(num_envs)]
        sizes = {a: envs[0].action_space(a).n for a in envs[0].possible_agents}  # discrete actions

        def step(env):
            _, _, terminations, truncations, _ = env.step({a: int(rng.integers(n)) for a, n in sizes.items()})
            return any(terminations.values()) or any(truncations.values())

    else:
        import gymnasium as gym

        # the robot mamujoco_v1 wraps (its single_agent_env), whatever the partition: gymnasium's MuJoCo v5 env
        envs = [gym.make(f"{env_id.rpartition('-')[0]}-v5") for _ in range(num_envs)]
        low, high = envs[0].action_space.low, envs[0].action_space.high

        def step(env):
            _, _, terminated, truncated, _ = env.step(rng.uniform(low, high))
            return terminated or truncated

    for i, env in enumerate(envs):
        env.reset(seed=seed + i)
    vector_steps = max(1, env_steps // num_envs)
    start = time.perf_counter()
    for _ in range(vector_steps):
        for env in envs:
            if step(env):
                env.reset()
    return vector_steps * num_envs / (time.perf_counter() - start)


def script_at(revision: str, script: str, folder: str) -> Path:
    """The script as of a git revision, written under folder with its own file name (so its exp_name is unchanged)."""
    source = subprocess.run(["git", "show", f"{revision}:{script}"], cwd=REPO, capture_output=True, text=True)
    if source.returncode != 0:
        raise SystemExit(f"error: git show {revision}:{script} failed: {source.stderr.strip()}")
    path = Path(folder, script)
    path.write_text(source.stdout)
    return path


def training_steps_per_second(script: Path, flags: list[str], iterations: int) -> float:
    """The script's own charts/SPS (env steps per second since its loop started) after `iterations` iterations."""
    batch = int(flag_value(flags, "--num-envs")) * int(flag_value(flags, "--num-steps"))
    command = [sys.executable, str(script), *flags, "--total-timesteps", str(iterations * batch)]
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"error: {' '.join(command)} failed:\n{result.stderr[-2000:]}")
        (metrics,) = Path(cwd, "runs").glob("*/metrics.jsonl")
        return float(json.loads(metrics.read_text().splitlines()[-1])["charts/SPS"])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for case in [c for c in CASES if not args.only or c["script"] in args.only]:
        flags, env = case["flags"].split(), case["env"]
        num_envs, iterations = int(flag_value(flags, "--num-envs")), args.iterations or case["iterations"]
        before = env_steps_per_second(env["kind"], env["env_id"], env["kwargs"], num_envs, args.env_steps)
        if args.against:
            with tempfile.TemporaryDirectory() as folder:
                earlier = training_steps_per_second(script_at(args.against, case["script"], folder), flags, iterations)
        training = training_steps_per_second(REPO / case["script"], flags, iterations)
        after = env_steps_per_second(env["kind"], env["env_id"], env["kwargs"], num_envs, args.env_steps)
        env_only = (before + after) / 2
        row = dict(
            script=case["script"],
            flags=case["flags"],
            iterations=iterations,
            training_env_steps_per_second=round(training),
            env_only_before=round(before),
            env_only_after=round(after),
            ratio=round(training / env_only, 3),
        )
        if args.against:
            row |= dict(against=args.against, training_then=round(earlier), speedup=round(training / earlier, 2))
        row |= dict(torch_threads=1, cpu=f"{cpu_name()} ({os.cpu_count()} cores)")
        print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
