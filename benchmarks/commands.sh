#!/usr/bin/env bash
# The commands behind every number in README "Results". Each runner call skips finished runs and resumes stopped
# ones, so this file can be run again after an interruption. The order is the order the runs were made.
# 2 workers, one torch thread per run (the scripts' default): the 2-core machine the numbers come from.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="python benchmarks/run.py --workers ${WORKERS:-2}"

# MPE simple_spread_v3, discrete: HARL's 8 rollout envs x 200 steps, 3 seeds, 2M steps
$RUN --scripts happo_mpe.py hatrpo_mpe.py --env-ids simple_spread_v3 --seeds 1 2 3 -- \
    --num-envs 8 --total-timesteps 2000000
