"""A short training run on simple_spread_v3 must improve the team return by far more than seed-to-seed noise."""

import numpy as np
import pytest
from helpers import read_metrics, run_dirs, run_ok, train_metrics

# Minimum gain of the team return (mean of the last 3 iterations minus mean of the first 2) after 96k env steps with
# HARL's MPE settings (8 envs x 200 steps, seed 1): about 40 s (HAPPO), 70 s (HATRPO). Measured on this 2-core machine:
#   happo_mpe.py, seeds 1-5: first 2 iterations -81.4 -80.0 -78.1 -80.2 -81.2 (random policy; mpe2 random: -79.7)
#                            last 3 iterations  -63.8 -68.5 -68.5 -64.1 -64.4; gain 17.5 11.5 9.5 16.1 16.8
#   hatrpo_mpe.py, seeds 1-5: first 2 iterations -82.1 -80.5 -78.9 -80.8 -82.3
#                             last 3 iterations  -67.2 -68.5 -67.9 -66.0 -67.6; gain 14.9 12.0 11.0 14.7 14.7
#   one iteration's return fluctuates by about +-2 within a run, the start by +-1.6 across seeds.
MIN_GAIN = {"happo_mpe.py": 8.0, "hatrpo_mpe.py": 8.0}


@pytest.mark.parametrize("script", sorted(MIN_GAIN))
def test_team_return_improves_on_simple_spread(script, tmp_path):
    run_ok(script, "--seed", "1", "--num-envs", "8", "--num-steps", "200", "--total-timesteps", "96000", cwd=tmp_path)
    returns = [m["charts/episodic_return"] for m in train_metrics(read_metrics(run_dirs(tmp_path)[0]))]
    start, end = np.mean(returns[:2]), np.mean(returns[-3:])
    assert end - start > MIN_GAIN[script], f"team return {start:.1f} -> {end:.1f}"
