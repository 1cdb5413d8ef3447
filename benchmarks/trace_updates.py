"""What each agent's update sees in a HAPPO or HATRPO run: continue a checkpoint for a few iterations and print,
for every agent in the order it was updated, the factor M it was given and, for HATRPO, what its line search did.

    python benchmarks/trace_updates.py benchmarks/results/RUN/runs/RUN_NAME/hatrpo_mamujoco.pt --iterations 3

M, the product of the ratios of the agents updated before, weights each sample of the agent's surrogate E[r M A].
When a few samples carry most of M's mass the surrogate rests on those few: the effective sample size
(sum M)^2 / sum M^2, given here as a fraction of the batch, measures it (1 when M = 1 everywhere).

The checkpoint's own script continues the run (the same random state and settings, evaluation off) in a temporary
folder, with a trace added to its hatrpo_update or happo_update (one to three lines); the checkpoint and its run
folder are left untouched. A finished run is continued past its budget.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("hatrpo_mamujoco.py", "hatrpo_mpe.py", "happo_mamujoco.py", "happo_mpe.py")
# the run's settings that the continuation does not take from the checkpoint: bookkeeping, evaluation, derived sizes
NOT_REPLAYED = {"exp_name", "track", "wandb_project_name", "wandb_entity", "capture_video", "save_model", "resume",
                "eval_checkpoint", "eval_episodes", "eval_interval", "total_timesteps", "batch_size",
                "num_iterations"}  # fmt: skip
M_STATS = ("m_max=factor.max().item(), m_mean=factor.mean().item(),"
           " m_ess=(factor.sum() ** 2 / (factor**2).sum() / factor.numel()).item()")  # fmt: skip
# per algorithm: (the start of a line of its update function, the line put before it)
TRACE_LINES = {
    "hatrpo": [
        ("    with torch.no_grad():  # backtracking line search", "    trials = []"),
        ("            if kl < args.kl_threshold and improvement > 0", "            trials.append((kl, improvement))"),
        ("        logp_new = dist.log_prob(actions)",
         f"        print('TRACE', __import__('json').dumps(dict({M_STATS}, predicted=predicted, steps=steps,"
         " kl=kl, improvement=improvement, trials=trials)), flush=True)"),
    ],
    "happo": [
        ("    return {name: total / (args.ppo_epochs",
         f"    print('TRACE', __import__('json').dumps(dict({M_STATS}, totals=totals)), flush=True)"),
    ],
}  # fmt: skip


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def traced_source(script: str) -> str:
    """The script's text with the trace in its update function."""
    lines = (REPO / script).read_text().splitlines()
    for anchor, line in TRACE_LINES[script.split("_")[0]]:
        found = [i for i, text in enumerate(lines) if text.startswith(anchor)]
        if len(found) != 1:
            fail(f"{script} has {len(found)} lines starting {anchor.strip()!r}, not 1: update TRACE_LINES")
        lines.insert(found[0], line)
    return "\n".join(lines) + "\n"


def flags(saved: dict) -> list[str]:
    """Command-line flags that reproduce the saved settings."""
    out = []
    for name, value in saved.items():
        flag = "--" + name.replace("_", "-")
        if name in NOT_REPLAYED or value is None:
            continue
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def trace(checkpoint_path: Path, iterations: int) -> tuple[list[dict], dict]:
    """One dict per agent update, in the order of the updates, and the run's saved settings."""
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        script, saved, step = checkpoint["script"], checkpoint["args"], checkpoint["global_step"]
        num_agents = len(checkpoint["actors"])
    except Exception as e:
        fail(f"cannot read checkpoint {str(checkpoint_path)!r}: {type(e).__name__}: {e}")
    if script not in SCRIPTS:
        fail(f"checkpoint {str(checkpoint_path)!r} was made by {script}; valid: {', '.join(SCRIPTS)}")
    batch = saved["num_envs"] * saved["num_steps"]
    total = max(saved["total_timesteps"], step + iterations * batch)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / script).write_text(traced_source(script))
        copy = shutil.copy(checkpoint_path, Path(folder) / checkpoint_path.name)
        command = [sys.executable, script, *flags(saved), "--total-timesteps", str(total), "--eval-interval", "0"]
        process = subprocess.Popen([*command, "--resume", copy], cwd=folder, stdout=subprocess.PIPE, text=True)
        updates = []
        for line in process.stdout:
            if line.startswith("TRACE "):
                updates.append(json.loads(line[len("TRACE ") :]) | dict(position=len(updates) % num_agents))
                if len(updates) == iterations * num_agents:
                    break
        process.terminate()
        process.wait()
    if len(updates) < iterations * num_agents:
        fail(f"{script} stopped after {len(updates)} of {iterations * num_agents} updates (exit {process.returncode})")
    return updates, saved


def rejected(update: dict) -> bool:
    """Whether no fraction passed: an accepted step at fraction backtrack_coef**steps made steps + 1 trials."""
    return len(update["trials"]) == update["steps"]


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint of a HAPPO or HATRPO script")
    parser.add_argument("--iterations", type=int, default=3, help="training iterations to trace")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        fail(f"--iterations must be >= 1, got {args.iterations}")
    updates, saved = trace(args.checkpoint, args.iterations)
    line_search = "backtrack_coef" in saved  # HATRPO; HAPPO's updates have no line search
    line_search_columns = " | g.s predicted | full step: KL, improvement | fraction taken: KL, improvement"
    print("position | M max | M mean | M's effective sample size" + (line_search_columns if line_search else ""))
    for u in updates:
        row = f"{u['position']:8d} | {u['m_max']:5.3g} | {u['m_mean']:6.3g} | {u['m_ess']:25.2%}"
        if line_search:
            full_kl, full_improvement = u["trials"][0]
            fraction = saved["backtrack_coef"] ** u["steps"]
            taken = "rejected" if rejected(u) else f"{fraction:.3f}: {u['kl']:.4f}, {u['improvement']:.4g}"
            row += f" | {u['predicted']:13.4g} | {full_kl:.4f}, {full_improvement:.4g} | {taken}"
        print(row)
    summary = "per position, over the iterations: median effective sample size"
    print(summary + (", steps rejected" if line_search else ""))
    for position in sorted({u["position"] for u in updates}):
        mine = [u for u in updates if u["position"] == position]
        row = f"{position:8d} | {statistics.median(u['m_ess'] for u in mine):.2%}"
        print(row + (f" | {sum(map(rejected, mine))} of {len(mine)}" if line_search else ""))
    return updates


if __name__ == "__main__":
    main()
