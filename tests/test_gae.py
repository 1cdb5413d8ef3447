"""compute_gae against a naive forward sum, on random rollouts with terminations, truncations and rollout ends."""

import pytest
import torch
from helpers import SCRIPTS, load_script

GAE_SCRIPTS = [s for s in SCRIPTS if hasattr(load_script(s), "compute_gae")]


def naive_gae(rewards, values, next_values, terminations, dones, gamma, gae_lambda):
    """A_t = sum_k (gamma lambda)^k delta_{t+k}, summed forward until the episode or the rollout ends."""
    num_steps, num_envs = rewards.shape
    advantages = torch.zeros(num_steps, num_envs, dtype=torch.float64)
    for e in range(num_envs):
        for t in range(num_steps):
            total, weight = 0.0, 1.0
            for k in range(t, num_steps):
                bootstrap = 0.0 if terminations[k, e] else gamma * next_values[k, e].item()
                delta = rewards[k, e].item() + bootstrap - values[k, e].item()
                total += weight * delta
                if dones[k, e]:
                    break
                weight *= gamma * gae_lambda
            advantages[t, e] = total
    return advantages


@pytest.mark.parametrize("script", GAE_SCRIPTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_gae_matches_naive_sum(script, seed):
    generator = torch.Generator().manual_seed(seed)
    num_steps, num_envs, gamma, gae_lambda = 40, 5, 0.97, 0.9
    rewards, values, next_values = (torch.randn(num_steps, num_envs, generator=generator) for _ in range(3))
    terminations = (torch.rand(num_steps, num_envs, generator=generator) < 0.08).float()
    truncations = (torch.rand(num_steps, num_envs, generator=generator) < 0.08).float() * (1 - terminations)
    dones = torch.maximum(terminations, truncations)
    assert terminations.sum() > 0 and truncations.sum() > 0 and dones[-1].sum() < num_envs  # every case occurs

    advantages, returns = load_script(script).compute_gae(
        rewards, values, next_values, terminations, dones, gamma, gae_lambda
    )
    expected = naive_gae(rewards, values, next_values, terminations, dones, gamma, gae_lambda)
    torch.testing.assert_close(advantages.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(returns, advantages + values)


@pytest.mark.parametrize("script", GAE_SCRIPTS)
def test_truncation_bootstraps_and_termination_does_not(script):
    """One step ending an episode: a truncation adds gamma * V(final state), a termination adds nothing."""
    compute_gae = load_script(script).compute_gae
    reward, value, final_value, gamma = torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]), 0.9
    truncated, _ = compute_gae(reward, value, final_value, torch.tensor([[0.0]]), torch.tensor([[1.0]]), gamma, 0.95)
    terminated, _ = compute_gae(reward, value, final_value, torch.tensor([[1.0]]), torch.tensor([[1.0]]), gamma, 0.95)
    assert truncated.item() == pytest.approx(1.0 + 0.9 * 2.0 - 0.5)
    assert terminated.item() == pytest.approx(1.0 - 0.5)
