"""Shared test utilities: run a top-level script as a subprocess and read what it wrote."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the five scripts, by name: a researcher's modified copy beside them (my_happo_variant.py) is not held to their tests
SCRIPTS = ["happo_mamujoco.py", "happo_mpe.py", "hatrpo_mamujoco.py", "hatrpo_mpe.py", "matrpo_admm.py"]
MPE_SCRIPTS = [s for s in SCRIPTS if s.endswith("_mpe.py")]
MAMUJOCO_SCRIPTS = [s for s in SCRIPTS if s.endswith("_mamujoco.py")]


def family(script: str) -> str:
    """The environment family of a script, the end of its name: happo_mpe.py -> "mpe"."""
    return Path(script).stem.rsplit("_", 1)[1]


def tiny(total_timesteps: int = 100) -> list[str]:
    """2 envs x 25 steps per iteration (one MPE episode per env) with small networks; 100 steps = two iterations."""
    return f"--num-envs 2 --num-steps 25 --total-timesteps {total_timesteps} --hidden-sizes 16 16".split()


TINY = tiny()


def load_script(script: str):
    """Import a top-level script as a module (importing has no side effects)."""
    return importlib.import_module(Path(script).stem)


def script_command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / script), *args]


SCRIPT_ENV = {**os.environ, "SDL_VIDEODRIVER": "dummy", "WANDB_MODE": "offline"}  # headless rendering, no network


def run_script(script: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python script args...` in cwd (its runs/ folder lands there)."""
    return subprocess.run(
        script_command(script, *args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=SCRIPT_ENV
    )


def run_ok(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = run_script(script, *args, cwd=cwd)
    assert result.returncode == 0, (
        f"{script} {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def run_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "runs").iterdir())


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_metrics(metrics: list[dict]) -> list[dict]:
    """The per-iteration lines (evaluation lines left out)."""
    return [m for m in metrics if "charts/SPS" in m]
