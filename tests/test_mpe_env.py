"""The MPE adapter against mpe2's own parallel_env: same observations, state, team reward and episode ends."""

import importlib

import gymnasium as gym
import numpy as np
import pytest
from helpers import MPE_SCRIPTS, load_script

mpe = load_script(MPE_SCRIPTS[0])  # the adapter is a shared helper: the consistency test keeps the copies identical


@pytest.mark.parametrize("continuous_actions", [False, True])
@pytest.mark.parametrize("env_id", mpe.ENV_IDS)
def test_adapter_matches_parallel_env(env_id, continuous_actions):
    ours = mpe.MPETeamEnv(env_id, continuous_actions, max_cycles=25)
    reference = importlib.import_module(f"mpe2.{env_id}").parallel_env(
        max_cycles=25, continuous_actions=continuous_actions
    )
    agents = reference.possible_agents
    ours.action_space.seed(0)
    for episode in range(2):
        obs, _ = ours.reset(seed=episode)
        ref_obs, _ = reference.reset(seed=episode)
        for t in range(25):
            assert all(np.array_equal(obs[a], ref_obs[a]) for a in agents)
            np.testing.assert_array_equal(obs["state"], reference.state())
            assert ours.observation_space.contains(obs)
            action = ours.action_space.sample()
            obs, reward, terminated, truncated, _ = ours.step(action)
            ref_obs, ref_rewards, ref_terminations, ref_truncations, _ = reference.step(dict(zip(agents, action)))
            assert reward == pytest.approx(sum(ref_rewards[a] for a in agents), abs=1e-12)
            assert terminated == any(ref_terminations.values())
            assert truncated == (t == 24)  # MPE episodes only end by the 25-step time limit


def test_speaker_listener_is_heterogeneous():
    env = mpe.MPETeamEnv("simple_speaker_listener_v4", False, max_cycles=25)
    assert env.agents == ["speaker_0", "listener_0"]
    assert [env.observation_space[a].shape for a in env.agents] == [(3,), (11,)]
    assert list(env.action_space) == [gym.spaces.Discrete(3), gym.spaces.Discrete(5)]
    assert env.observation_space["state"].shape == (14,)
