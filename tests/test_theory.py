"""The results HAPPO and HATRPO rest on (Kuba et al., ICLR 2022), checked on games small enough to enumerate:
the multi-agent advantage decomposition lemma, the importance-weighted surrogate with the factor M, and monotonic
improvement of the sequential update (with the scripts' own update functions) where the simultaneous one fails."""

import itertools

import numpy as np
import pytest

from benchmarks.a1a2_game import KL_THRESHOLD, return_curve


# ----------------------------------------------------------------------------------------------------------------------
# Exact multi-agent values by enumeration. A state's joint action values Q(s, a) are an array with one axis per agent;
# policies are independent per agent: pi[i] is a probability vector over agent i's actions.
def expected_q(q: np.ndarray, pi: list, fixed: dict) -> float:
    """Q^{S}(s, a^S) = E_{a^{-S} ~ pi^{-S}}[Q(s, a^S, a^{-S})] for the agents S in `fixed` ({agent: action}), summed
    term by term over every joint action."""
    total = 0.0
    for joint in itertools.product(*(range(len(p)) for p in pi)):
        if all(joint[i] == a for i, a in fixed.items()):
            total += q[joint] * np.prod([pi[i][joint[i]] for i in range(len(pi)) if i not in fixed])
    return total


def ordered_subsets(n: int):
    for m in range(1, n + 1):
        yield from itertools.permutations(range(n), m)


def check_decomposition(q: np.ndarray, pi: list):
    """For every ordered subset i_1..i_m and every a^{i_1:m}:
    A^{i_1:m}(s, a^{i_1:m}) = sum_j A^{i_j}(s, a^{i_1:j-1}, a^{i_j}), with A^{i_j}(s, a^{i_1:j-1}, a^{i_j}) =
    Q^{i_1:j}(s, a^{i_1:j}) - Q^{i_1:j-1}(s, a^{i_1:j-1}). Returns the largest gap of the naive sum of individual
    advantages A^{i_j}(s, a^{i_j}), which ignores the predecessors' actions: the lemma needs the conditioning."""
    v = expected_q(q, pi, {})
    naive_gap = 0.0
    for subset in ordered_subsets(q.ndim):
        for actions in itertools.product(*(range(q.shape[i]) for i in subset)):
            joint_advantage = expected_q(q, pi, dict(zip(subset, actions))) - v
            terms = [
                expected_q(q, pi, dict(zip(subset[: j + 1], actions[: j + 1])))
                - expected_q(q, pi, dict(zip(subset[:j], actions[:j])))
                for j in range(len(subset))
            ]
            assert joint_advantage == pytest.approx(sum(terms), abs=1e-12)
            naive = sum(expected_q(q, pi, {i: a}) - v for i, a in zip(subset, actions))
            naive_gap = max(naive_gap, abs(joint_advantage - naive))
    return naive_gap


def random_policy(rng, k: int) -> np.ndarray:
    logits = rng.normal(size=k)
    return np.exp(logits) / np.exp(logits).sum()


@pytest.mark.parametrize("num_agents", [2, 3, 4])
def test_advantage_decomposition_lemma_on_random_matrix_games(num_agents):
    rng = np.random.default_rng(num_agents)
    for _ in range(3):
        shape = tuple(rng.integers(2, 4, size=num_agents))  # 2 or 3 actions per agent
        q, pi = rng.normal(size=shape), [random_policy(rng, k) for k in shape]
        assert check_decomposition(q, pi) > 0.1  # the conditioning matters in these games


def test_advantage_decomposition_lemma_on_a_random_markov_game():
    """3 states, 3 agents with 2, 3 and 2 actions, random rewards and transitions, gamma 0.9: Q solved exactly from
    the Bellman equations of the joint policy, then the lemma checked in every state."""
    rng = np.random.default_rng(0)
    num_states, shape, gamma = 3, (2, 3, 2), 0.9
    rewards = rng.normal(size=(num_states, *shape))
    transitions = rng.dirichlet(np.ones(num_states), size=(num_states, *shape))  # P(s' | s, a)
    pi = [[random_policy(rng, k) for k in shape] for _ in range(num_states)]
    # V = r_pi + gamma P_pi V, with r_pi and P_pi the expectations over the joint policy in each state
    joint_pi = [np.einsum("i,j,k->ijk", *pi[s]) for s in range(num_states)]
    r_pi = np.array([(joint_pi[s] * rewards[s]).sum() for s in range(num_states)])
    p_pi = np.array([np.einsum("ijk,ijkt->t", joint_pi[s], transitions[s]) for s in range(num_states)])
    v = np.linalg.solve(np.eye(num_states) - gamma * p_pi, r_pi)
    q = rewards + gamma * transitions @ v
    for s in range(num_states):
        assert expected_q(q[s], pi[s], {}) == pytest.approx(v[s], abs=1e-12)  # the solve is right
        assert check_decomposition(q[s], pi[s]) > 0.1


# ----------------------------------------------------------------------------------------------------------------------
# The surrogate: what HAPPO and HATRPO estimate from samples of the old joint policy
SAMPLES = 400_000


def surrogate_case(seed: int):
    """A 3-agent matrix game, an old joint policy, new policies for all agents (the first two in the order are the
    already-updated predecessors, the third is agent i_m), and N joint actions sampled from the old policy."""
    rng = np.random.default_rng(seed)
    shape = (3, 3, 3)
    q = rng.normal(size=shape)
    old = [random_policy(rng, k) for k in shape]
    new = [np.exp(np.log(p) + 0.5 * rng.normal(size=len(p))) for p in old]
    new = [p / p.sum() for p in new]
    order = list(rng.permutation(3))
    actions = np.stack([rng.choice(k, size=SAMPLES, p=p) for k, p in zip(shape, old)], axis=1)
    return q, old, new, order, actions


def exact_expectation(values_of, policies: dict) -> float:
    """E[values_of(actions)] with each agent in `policies` ({agent: probabilities}) drawing its action."""
    agents = list(policies)
    total = 0.0
    for actions in itertools.product(*(range(len(policies[i])) for i in agents)):
        weight = np.prod([policies[i][a] for i, a in zip(agents, actions)])
        total += weight * values_of(dict(zip(agents, actions)))
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_importance_weighted_surrogate_estimates_the_agents_advantage_under_the_new_policies(seed):
    """With r = pibar^{i_m} / pi^{i_m}, M = prod_{j<m} pibar^{i_j} / pi^{i_j} and A the joint advantage of the old
    policy, on samples of the old joint policy:
      E[(r - 1) M A] = E_{a^{i_1:m} ~ pibar}[A^{i_m}(s, a^{i_1:m-1}, a^{i_m})]  (what agent i_m improves; HATRPO logs
                                                                              its sample mean as `improvement`)
      E[r M A]       = E_{a^{i_1:m} ~ pibar}[A^{i_1:m}(s, a^{i_1:m})]          (the predecessors' terms included).
    Each sample mean must lie within 4 standard errors of the exact value (400k samples: about 0.002); without the
    factor (M = 1), the estimate must miss by more than 10 standard errors, so the check can tell."""
    q, old, new, order, actions = surrogate_case(seed)
    *predecessors, agent = order
    v = expected_q(q, old, {})
    advantage = q[tuple(actions.T)] - v  # A(s, a), exact
    ratio = new[agent][actions[:, agent]] / old[agent][actions[:, agent]]
    factor = np.prod([new[j][actions[:, j]] / old[j][actions[:, j]] for j in predecessors], axis=0)

    def agent_advantage(a):  # A^{i_m}(s, a^{i_1:m-1}, a^{i_m}) of the old policy
        return expected_q(q, old, a) - expected_q(q, old, {j: a[j] for j in predecessors})

    updated = {j: new[j] for j in order}  # the predecessors and agent i_m draw from their new policies
    exact_agent = exact_expectation(agent_advantage, updated)
    exact_joint = exact_expectation(lambda a: expected_q(q, old, a) - v, updated)
    for samples, exact in [((ratio - 1) * factor * advantage, exact_agent), (ratio * factor * advantage, exact_joint)]:
        standard_error = samples.std() / np.sqrt(SAMPLES)
        assert abs(samples.mean() - exact) < 4 * standard_error, (samples.mean(), exact, standard_error)
    without_factor = (ratio - 1) * advantage
    assert abs(without_factor.mean() - exact_agent) > 10 * without_factor.std() / np.sqrt(SAMPLES)


# ----------------------------------------------------------------------------------------------------------------------
# Monotonic improvement on the two-agent game r(a1, a2) = a1 * a2, played by the scripts' own update functions
# (the game lives in benchmarks/a1a2_game.py, which also draws the README's figure of it)
def test_sequential_trust_region_update_never_lowers_the_expected_return():
    for seed in range(5):
        curve = return_curve(sequential=True, kl_threshold=KL_THRESHOLD, seed=seed, iterations=10)
        assert all(after >= before for before, after in zip(curve, curve[1:])), np.round(curve, 4)
        assert curve[-1] > 1.0  # and it learns: from -0.0625 to a large positive return


def test_simultaneous_update_lowers_the_expected_return():
    """Each agent improves its own surrogate against the plain advantage (M = 1, as MAPPO and IPPO without sharing do):
    the two moves together cross zero and the joint return falls."""
    drops = []
    for seed in range(5):
        curve = return_curve(sequential=False, kl_threshold=KL_THRESHOLD, seed=seed, iterations=10)
        drops.append(min(after - before for before, after in zip(curve, curve[1:])))
    assert min(drops) < -0.05 and sum(drop < 0 for drop in drops) >= 4, np.round(drops, 4)
