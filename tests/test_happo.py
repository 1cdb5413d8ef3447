"""HAPPO's pieces on hand-made tensors: the sequential factor, the policy distributions, the value normaliser."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import REPO, load_script

happo = load_script("happo_mpe.py")

# three heterogeneous agents: (observation size, action space)
AGENT_SPECS = [(4, gym.spaces.Discrete(5)), (3, gym.spaces.Box(0.0, 1.0, (2,))), (6, gym.spaces.Discrete(3))]
BATCH = 256


def make_batch(seed: int = 0):
    torch.manual_seed(seed)
    actors = [happo.Actor(size, space, (16, 16)) for size, space in AGENT_SPECS]
    obs = [torch.randn(BATCH, size) for size, _ in AGENT_SPECS]
    with torch.no_grad():
        dists = [actor.distribution(o) for actor, o in zip(actors, obs)]
        actions = [d.sample() for d in dists]
        logp_old = [d.log_prob(a) for d, a in zip(dists, actions)]
    advantages = torch.randn(BATCH)
    return actors, obs, actions, logp_old, advantages


def run_sequential_update(order, sequential: bool, seed: int = 0):
    """The sequential update of happo_mpe.py's main loop, written out here: each agent i in `order` gets the factor M
    of the agents updated before it; the factors given are recorded."""
    actors, obs, actions, logp_old, advantages = make_batch(seed)
    initial_states = [copy.deepcopy(actor.state_dict()) for actor in actors]
    optimizers = [torch.optim.Adam(actor.parameters(), lr=1e-2) for actor in actors]
    args, rng = (
        happo.Args(clip_coef=0.2, ent_coef=0.01, ppo_epochs=5, num_minibatches=2, max_grad_norm=10.0),
        np.random.default_rng(seed),
    )
    factor, stats, factors = torch.ones_like(logp_old[0]), {}, {}
    for i in order:
        factors[i] = factor
        stats[i] = happo.happo_update(
            actors[i], optimizers[i], obs[i], actions[i], logp_old[i], advantages, factor, args, rng
        )
        if sequential:
            with torch.no_grad():
                logp_new = actors[i].distribution(obs[i]).log_prob(actions[i])
            factor = factor * torch.exp(logp_new - logp_old[i])
    final_states = [copy.deepcopy(actor.state_dict()) for actor in actors]
    return stats, factors, initial_states, final_states, obs, actions


def test_the_main_loop_updates_as_written_out_above():
    """The loop above is the scripts' own: every HAPPO and HATRPO script has these lines in its main loop. HATRPO's
    update returns log pi_new(a|o) from its line search (test_hatrpo.py checks it) instead of a forward pass here."""
    for script in ("happo_mpe.py", "happo_mamujoco.py", "hatrpo_mpe.py", "hatrpo_mamujoco.py"):
        lines = [line.strip() for line in (REPO / script).read_text().splitlines()]
        loop = lines.index("factor, stats = torch.ones_like(b_logprobs[0]), {}") + 1
        assert lines[loop] == "for i in order:", script
        update = lines.index("if args.sequential:", loop)  # after the agent's update (one call)
        new_log_probs = ["with torch.no_grad():", "logp_new = actors[i].distribution(b_obs[i]).log_prob(b_actions[i])"]
        if script.startswith("hatrpo"):
            assert lines[loop + 1].startswith("stats[i], logp_new = hatrpo_update("), script
            new_log_probs = []
        assert update - loop <= 4 and lines[update : update + 2 + len(new_log_probs)] == [
            "if args.sequential:",
            *new_log_probs,
            "factor = factor * torch.exp(logp_new - b_logprobs[i])",
        ], script


def ratio_from_saved(i, initial_state, final_state, obs, action):
    """pi_new(a|o) / pi_old(a|o) of agent i, from fresh networks loaded with the saved parameters."""
    size, space = AGENT_SPECS[i]
    old, new = happo.Actor(size, space, (16, 16)), happo.Actor(size, space, (16, 16))
    old.load_state_dict(initial_state)
    new.load_state_dict(final_state)
    with torch.no_grad():
        return torch.exp(new.distribution(obs).log_prob(action) - old.distribution(obs).log_prob(action))


@pytest.mark.parametrize("order", [[2, 0, 1], [0, 1, 2], [1, 2, 0]])
def test_factor_is_product_of_earlier_agents_ratios(order):
    stats, factors, initial, final, obs, actions = run_sequential_update(order, sequential=True)
    assert list(stats) == order  # agents updated in the order given
    ratios = {i: ratio_from_saved(i, initial[i], final[i], obs[i], actions[i]) for i in order}
    expected = torch.ones(BATCH)
    for i in order:
        torch.testing.assert_close(factors[i], expected, rtol=1e-5, atol=1e-6)
        expected = expected * ratios[i]
    # the agents really moved, so a factor of ones would fail the check above
    assert (factors[order[-1]] - 1).abs().max() > 0.05


def test_no_sequential_gives_every_agent_factor_one():
    stats, factors, initial, final, obs, actions = run_sequential_update([2, 0, 1], sequential=False)
    for i in range(3):
        assert torch.equal(factors[i], torch.ones(BATCH))
        assert not torch.equal(ratio_from_saved(i, initial[i], final[i], obs[i], actions[i]), torch.ones(BATCH))


def test_happo_update_reports_means_and_moves_toward_the_advantage():
    actors, obs, actions, logp_old, advantages = make_batch()
    actor, optimizer = actors[0], torch.optim.Adam(actors[0].parameters(), lr=1e-3)
    args = happo.Args(clip_coef=0.2, ent_coef=0.0, ppo_epochs=3, num_minibatches=4, max_grad_norm=10.0)
    factor, rng = torch.ones(BATCH), np.random.default_rng(0)
    stats = happo.happo_update(actor, optimizer, obs[0], actions[0], logp_old[0], advantages, factor, args, rng)
    assert set(stats) == {"policy_loss", "entropy", "approx_kl", "clipfrac"}
    with torch.no_grad():
        ratio = torch.exp(actor.distribution(obs[0]).log_prob(actions[0]) - logp_old[0])
    assert (ratio * advantages).mean() > advantages.mean()  # the surrogate improved
    assert 0 < stats["approx_kl"] < 0.1 and 0 <= stats["clipfrac"] <= 1


def test_gaussian_log_prob_and_entropy_sum_over_action_dimensions():
    """One value per sample (no (B,) x (B, 1) broadcasting): the ratio is the product of per-dimension ratios."""
    torch.manual_seed(0)
    actor = happo.Actor(3, gym.spaces.Box(0.0, 1.0, (4,)), (8,))
    obs = torch.randn(10, 3)
    dist = actor.distribution(obs)
    action = dist.sample()
    mean = actor.head(actor.trunk(obs))
    std = 0.5 * torch.sigmoid(torch.ones(4))  # log_std starts at 1
    per_dim = torch.distributions.Normal(mean, std)
    assert dist.log_prob(action).shape == dist.entropy().shape == (10,)
    torch.testing.assert_close(dist.log_prob(action), per_dim.log_prob(action).sum(-1))
    torch.testing.assert_close(dist.entropy(), per_dim.entropy().sum(-1))
    torch.testing.assert_close(dist.mode, mean)


def test_value_norm_matches_debiased_running_averages():
    beta = 0.9  # small, so that the debiasing matters
    norm = happo.ValueNorm(beta=beta)
    batches = [torch.randn(50) * 3 + 5, torch.randn(70) * 2 - 1, torch.randn(30) + 10]
    for batch in batches:
        norm.update(batch)
    weights = [(1 - beta) * beta ** (len(batches) - 1 - k) for k in range(len(batches))]
    mean = sum(w * b.mean() for w, b in zip(weights, batches)) / sum(weights)
    mean_sq = sum(w * (b**2).mean() for w, b in zip(weights, batches)) / sum(weights)
    norm_mean, norm_std = norm.mean_std()
    torch.testing.assert_close(norm_mean, mean)
    torch.testing.assert_close(norm_std, (mean_sq - mean**2).sqrt())
