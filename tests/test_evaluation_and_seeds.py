"""Periodic evaluation (every script: at the right steps, without touching training) against a naive episode loop, and
the env seed streams: every (run seed, env index) starts its own environment."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import SCRIPTS, load_script, read_metrics, run_dirs, run_ok, tiny, train_metrics
from test_end_to_end import task

happo_mpe, happo_mamujoco = load_script("happo_mpe.py"), load_script("happo_mamujoco.py")
SPREAD_AGENTS = ["agent_0", "agent_1", "agent_2"]


def naive_evaluation(actors, make_env, seed: int) -> float:
    """One deterministic episode on one env, step by step (Box bounds here are [-1, 1]: the action is sent clipped)."""
    env = make_env()
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        with torch.no_grad():
            actions = tuple(
                actor.distribution(torch.as_tensor(obs[agent])[None]).mode[0].numpy()
                for actor, agent in zip(actors, env.agents)
            )
        sent = tuple(np.clip(a, -1, 1) if a.ndim else a for a in actions)
        obs, reward, terminated, truncated, _ = env.step(sent)
        total += reward
        done = terminated or truncated
    return total


@pytest.mark.parametrize(
    ("m", "make_env", "seeds"),
    [(happo_mpe, happo_mpe.make_env("simple_spread_v3", False, 25), [3, 9, 4]),
     (happo_mamujoco, happo_mamujoco.make_env("Hopper-3x1", None), [3, 9])],
    ids=["spread", "hopper"],
)  # fmt: skip
def test_parallel_evaluation_matches_one_episode_at_a_time(m, make_env, seeds):
    """evaluate() runs one episode per env in a vector env; each must equal the same episode played alone (the Hopper
    episodes end at different steps, so the envs that finished early must stop counting)."""
    env = make_env()
    torch.manual_seed(0)
    actors = [
        m.Actor(env.observation_space[a].shape[0], space, (16,)) for a, space in zip(env.agents, env.action_space)
    ]
    returns = m.evaluate(actors, env.agents, gym.vector.SyncVectorEnv([make_env] * len(seeds)), seeds)
    expected = [naive_evaluation(actors, make_env, seed) for seed in seeds]
    np.testing.assert_allclose(returns, expected, rtol=1e-6)
    assert len(set(np.round(returns, 6))) == len(seeds)  # different starts: the check compares distinct episodes


@pytest.mark.parametrize("script", SCRIPTS)
def test_periodic_evaluation_logs_at_its_interval_and_leaves_training_unchanged(script, tmp_path):
    """--eval-interval 100 on 50-step iterations of a 250-step run: one eval line at each of steps 100 and 200; the
    training lines are exactly those of a run without evaluation."""
    for name, interval in (("with", "100"), ("without", "0")):
        (tmp_path / name).mkdir()
        run_ok(script, *task(script), *tiny(250), "--eval-interval", interval, "--eval-episodes", "2",
               cwd=tmp_path / name)  # fmt: skip
    with_eval, without_eval = (read_metrics(run_dirs(tmp_path / name)[0]) for name in ("with", "without"))
    evaluations = [m for m in with_eval if "eval/episodic_return" in m]
    assert [m["global_step"] for m in evaluations] == [100, 200]
    keys = {"global_step", "eval/episodic_returns", "eval/episodic_return", "eval/episodic_return_std"}
    for m in evaluations:  # the returns of the 2 episodes, and their mean and std
        assert set(m) == keys and len(m["eval/episodic_returns"]) == 2
        assert m["eval/episodic_return"] == pytest.approx(np.mean(m["eval/episodic_returns"]), rel=1e-12)
        assert m["eval/episodic_return_std"] == pytest.approx(np.std(m["eval/episodic_returns"]), rel=1e-12)
    assert len(without_eval) == len(train_metrics(without_eval)) == 5
    training = train_metrics(with_eval)
    for line in training + without_eval:
        line.pop("charts/SPS"), line.pop("charts/update_seconds", None)  # wall-clock times
    assert training == without_eval


@pytest.mark.parametrize(
    ("make_env", "state_of"),
    [(happo_mpe.make_env("simple_spread_v3", False, 25), lambda obs: obs["state"]),
     (happo_mamujoco.make_env("HalfCheetah-2x3", None), lambda obs: obs["state"])],
    ids=["spread", "halfcheetah"],
)  # fmt: skip
def test_two_run_seeds_start_no_env_from_the_same_state(make_env, state_of):
    """Runs seeded 1, 2 and 3 with 20 envs each: 60 different starting states (seeding env i with seed + i, runs 1
    and 2 would share 19 envs). A resumed run (step 4000) starts 20 more, new ones. env_seeds is the same code in every
    script (test_shared_code)."""
    env = make_env()
    seeds = [s for run_seed in (1, 2, 3) for s in happo_mpe.env_seeds(run_seed, 20, purpose=0)]
    seeds += happo_mpe.env_seeds(1, 20, purpose=0, step=4000)
    starts = {state_of(env.reset(seed=seed)[0]).tobytes() for seed in seeds}
    assert len(set(seeds)) == len(starts) == 80
    evaluation = happo_mpe.env_seeds(1, 10, purpose=1)
    assert not set(evaluation) & set(seeds)
