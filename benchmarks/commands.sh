#!/usr/bin/env bash
# The commands behind every benchmark number in README.md and docs/, in the order the runs were made. Each runner call skips
# finished runs and resumes stopped ones, so the file can simply be run again after an interruption. Two copies may run
# at once on one results folder (`WORKERS=1 bash benchmarks/commands.sh &` twice): they never start the same run.
# Our numbers: a 2-core machine, one torch thread per run (the scripts' default), two runs at a time.
#
#   bash benchmarks/commands.sh            # speed, then runs, then report
#   bash benchmarks/commands.sh speed      # the speed table: alone on an idle machine
#   bash benchmarks/commands.sh runs       # the learning runs (any number of copies at once)
#   bash benchmarks/commands.sh report     # benchmarks/report/: summary.csv, milestones.csv, curves/
#   bash benchmarks/commands.sh trace      # the update traces of docs/mamujoco.md (needs the git history)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="python benchmarks/run.py --workers ${WORKERS:-2}"
MPE="--num-envs 8"  # 8 envs x 200 steps, as our HARL anchor runs (HARL's tuned MPE configs use 20 envs)

runs() {
    # --- MaMuJoCo at the papers' budget: 10M steps, 3 seeds, HARL's tuned values (the scripts' defaults for these ids),
    # deterministic evaluation every 250k steps. Cheapest and most telling first.
    TEN_M="--total-timesteps 10000000"
    $RUN --scripts happo_mamujoco.py --env-ids HalfCheetah-2x3 --seeds 1 2 3 -- $TEN_M
    $RUN --scripts hatrpo_mamujoco.py --env-ids HalfCheetah-2x3 --seeds 1 2 3 -- $TEN_M
    # --- MPE simple_spread_v3, discrete, 3 seeds, 2M steps (the HARL anchor's task and settings), independent env seeds
    $RUN --scripts happo_mpe.py hatrpo_mpe.py --env-ids simple_spread_v3 --seeds 1 2 3 -- $MPE --total-timesteps 2000000
    # --- MATRPO's TRPO baseline with each agent's own advantage normalisation (the authors' code), 3 seeds, 2M steps
    $RUN --scripts matrpo_admm.py --seeds 1 2 3 -- --mode independent --total-timesteps 2000000
    # --- Ant-2x4 at 10M (seed 1 of each script was started before the two short sets above, which came first
    # after that so that their tables could be completed within one session)
    $RUN --scripts happo_mamujoco.py hatrpo_mamujoco.py --env-ids Ant-2x4 --seeds 1 2 3 -- $TEN_M
    # --- then Walker2d-2x3, and one seed of HAPPO on the ICLR paper's HalfCheetah-6x1
    $RUN --scripts happo_mamujoco.py hatrpo_mamujoco.py --env-ids Walker2d-2x3 --seeds 1 2 3 -- $TEN_M
    $RUN --scripts happo_mamujoco.py --env-ids HalfCheetah-6x1 --seeds 1 -- $TEN_M
    # --- the rest of HARL's on-policy MaMuJoCo tasks (from 2026-12-06, on the code with the forward-mode Fisher-vector
    # product), cheapest first, but HATRPO on Humanoid-17x1 (one seed, about 12 hours of one core) started early on one
    # of the two cores, so that it does not run alone at the end
    $RUN --scripts happo_mamujoco.py hatrpo_mamujoco.py --env-ids Hopper-3x1 Walker2d-6x1 --seeds 1 2 3 -- $TEN_M
    $RUN --scripts hatrpo_mamujoco.py --env-ids Humanoid-17x1 --seeds 1 -- $TEN_M
    $RUN --scripts happo_mamujoco.py hatrpo_mamujoco.py --env-ids Ant-4x2 --seeds 1 2 3 -- $TEN_M
    $RUN --scripts happo_mamujoco.py --env-ids Humanoid-17x1 --seeds 1 2 3 -- $TEN_M
}

# The runs behind the earlier results in docs/ (1M-step MaMuJoCo, MPE tasks, ablations, MATRPO's three modes), made
# before env i of a run got its own seed stream (it was seeded with seed + i) and before the tuned-values table (the
# HalfCheetah-2x3 flags below then gave HARL's values except its 15 critic epochs). Their summaries and curves are in
# benchmarks/report_earlier/ (the run folders were not kept); CHANGELOG.md says what changed since.
earlier_runs() {
    # --- MPE simple_spread_v3, discrete, 3 seeds, 2M steps (the HARL anchor's task and settings)
    $RUN --scripts happo_mpe.py hatrpo_mpe.py --env-ids simple_spread_v3 --seeds 1 2 3 -- \
        --num-envs 8 --total-timesteps 2000000

    # --- ablations on simple_spread_v3 (HAPPO, 3 seeds, 500k steps; the baseline is the 2M runs above at 500k)
    for ablation in --no-sequential --fixed-order; do
        $RUN --scripts happo_mpe.py --env-ids simple_spread_v3 --seeds 1 2 3 -- $MPE --total-timesteps 500000 $ablation
    done

    # --- MaMuJoCo HalfCheetah-2x3, 1M steps, HAPPO with HARL's tuned values, 3 seeds; then its ablations
    # (3 seeds, 500k steps; the baseline is the tuned runs at 500k), HATRPO (HARL has no tuned values) seed 1
    HALFCHEETAH_HAPPO="--clip-coef 0.05 --ppo-epochs 15 --ent-coef 0.01"
    $RUN --scripts happo_mamujoco.py --env-ids HalfCheetah-2x3 --seeds 1 2 3 -- \
        $HALFCHEETAH_HAPPO --total-timesteps 1000000
    for ablation in --no-sequential --fixed-order; do
        $RUN --scripts happo_mamujoco.py --env-ids HalfCheetah-2x3 --seeds 1 2 3 -- \
            $HALFCHEETAH_HAPPO --total-timesteps 500000 $ablation
    done
    $RUN --scripts hatrpo_mamujoco.py --env-ids HalfCheetah-2x3 --seeds 1 -- --total-timesteps 1000000

    # --- MaMuJoCo Ant-2x4 (no tuned values in HARL) and Walker2d-2x3 (HAPPO tuned), seed 1, 1M steps
    $RUN --scripts happo_mamujoco.py hatrpo_mamujoco.py --env-ids Ant-2x4 --seeds 1 -- --total-timesteps 1000000
    WALKER_HAPPO="--clip-coef 0.05 --ppo-epochs 5 --num-minibatches 2 --learning-rate 1e-3 --anneal-lr"
    $RUN --scripts happo_mamujoco.py --env-ids Walker2d-2x3 --seeds 1 -- $WALKER_HAPPO --total-timesteps 1000000
    $RUN --scripts hatrpo_mamujoco.py --env-ids Walker2d-2x3 --seeds 1 -- --total-timesteps 1000000
    $RUN --scripts hatrpo_mamujoco.py --env-ids HalfCheetah-2x3 --seeds 2 3 -- --total-timesteps 1000000

    # --- the other MPE tasks, 3 seeds, 2M steps
    $RUN --scripts happo_mpe.py hatrpo_mpe.py --env-ids simple_spread_v3 --seeds 1 2 3 -- \
        $MPE --total-timesteps 2000000 --continuous-actions
    $RUN --scripts happo_mpe.py hatrpo_mpe.py --env-ids simple_speaker_listener_v4 --seeds 1 2 3 -- \
        $MPE --total-timesteps 2000000

    # --- MATRPO: the three modes, 3 seeds, 2M steps (then also --save-interval 5, a flag since removed: checkpoints are
    # now written after every iteration, which does not change the metrics)
    for mode in centralized independent admm; do
        $RUN --scripts matrpo_admm.py --seeds 1 2 3 -- --mode $mode --total-timesteps 2000000
    done
}

speed() { python benchmarks/speed.py --against 7d39617; }  # the speed table of docs/benchmarks.md
report() { python benchmarks/report.py; }

# HATRPO's trust-region steps on Humanoid-17x1 and Walker2d-6x1 (seed 1 each), continued from the checkpoints committed
# mid-run (at 6.19M and 6.73M steps): the factor M each agent sees and what its line search did; then HAPPO's M on
# Humanoid-17x1 (seed 1, from its checkpoint at 2.64M steps)
trace() {
    local folder revision_and_run revision run script checkpoint
    folder=$(mktemp -d)
    for revision_and_run in 32b6f31:hatrpo_mamujoco__Humanoid-17x1 b57d472:hatrpo_mamujoco__Walker2d-6x1 \
        1f889fa:happo_mamujoco__Humanoid-17x1; do
        revision=${revision_and_run%%:*} run=${revision_and_run#*:}
        script=${run%%__*}  # hatrpo_mamujoco or happo_mamujoco
        checkpoint=$(git ls-tree -r --name-only "$revision" -- "benchmarks/results/${run}__total-timesteps=10000000__s1" |
            grep '\.pt$')
        git show "$revision:$checkpoint" >"$folder/$script.pt"
        python benchmarks/trace_updates.py "$folder/$script.pt" --iterations 5
    done
    rm -r "$folder"
}

if [ $# -eq 0 ]; then set -- speed runs report; fi
for step in "$@"; do
    case $step in
        speed | runs | earlier_runs | report | trace) "$step" ;;
        *) echo "error: unknown step '$step'; valid: speed, runs, earlier_runs, report, trace" >&2 && exit 2 ;;
    esac
done
