"""MATRPO's pieces against independent references: the private-reward task from positions and sizes, the edge update
against the direct minimiser of the edge's augmented Lagrangian, the ADMM loop against the centralised optimum of a
convex instance, Jacobian and Fisher products against explicit matrices, the linearized step against a naive loop;
then every mode end to end."""

import itertools
import json
import math
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import TINY, load_script, read_metrics, run_dirs, run_ok
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

matrpo = load_script("matrpo_admm.py")


def test_private_rewards_split_the_landmark_term_and_the_collisions():
    env = matrpo.MPEPrivateEnv(num_agents=3, max_cycles=100)
    env.reset(seed=0)
    world, rng = env.mpe_env.world, np.random.default_rng(0)
    assert env.observation_space["agent_0"].shape == (14,)  # 18 minus the 4 communication numbers
    collided = 0
    for _ in range(100):
        obs, team_reward, terminated, truncated, info = env.step(tuple(rng.integers(0, 5, size=3)))
        private = info["private_rewards"]
        positions = [a.state.p_pos for a in world.agents]
        assert np.array_equal(obs["agent_1"], env.mpe_env.observe("agent_1")[:14])  # the dropped part was last

        def collisions(i):  # the other agents overlapping agent i, from positions and sizes
            return sum(
                np.linalg.norm(positions[i] - positions[j]) < world.agents[i].size + world.agents[j].size
                for j in range(3)
                if j != i
            )

        landmark_term = -sum(min(np.linalg.norm(p - lm.state.p_pos) for p in positions) for lm in world.landmarks)
        assert private[0] + collisions(0) == pytest.approx(landmark_term, abs=1e-9)
        for i in (1, 2):
            assert private[i] == -collisions(i)  # only their own collision penalties
        assert team_reward == pytest.approx(private.sum())
        collided += sum(collisions(i) for i in range(3))
        if terminated or truncated:
            break
    assert truncated and collided > 0  # a 100-step episode, and the collision branch was exercised


def test_private_rewards_of_a_vector_step_include_the_steps_that_end_episodes():
    """3-step episodes in a same-step-autoreset vector env: the private rewards read from its infos equal those of the
    same envs stepped one by one, also on the steps that end an episode (where the infos hold the reset's zeros)."""
    vector = gym.vector.SyncVectorEnv(
        [matrpo.make_env(3, 3) for _ in range(2)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    singles = [matrpo.make_env(3, 3)() for _ in range(2)]
    vector.reset(seed=5)
    for i, env in enumerate(singles):
        env.reset(seed=5 + i)
    rng, ended = np.random.default_rng(0), 0
    for _ in range(7):
        actions = rng.integers(0, 5, size=(3, 2))
        _, _, terminated, truncated, infos = vector.step(tuple(actions))
        private = matrpo.step_private_rewards(infos, terminated | truncated)
        for i, env in enumerate(singles):
            _, _, single_terminated, single_truncated, info = env.step(tuple(actions[:, i]))
            np.testing.assert_array_equal(private[i], info["private_rewards"])
            assert info["private_rewards"][0] < 0  # the landmark term: never zero, so a reset's zeros would show
            if single_terminated or single_truncated:
                env.reset()
        ended += (terminated | truncated).sum()
    assert ended == 4  # both envs ended episodes at steps 3 and 6


def test_advantage_normalisation_pooled_and_local():
    generator = torch.Generator().manual_seed(0)
    advantages = torch.randn(50, 3, generator=generator) * torch.tensor([5.0, 0.1, 1.0]) + torch.tensor([2.0, 0.0, -1])
    a = advantages.numpy().astype(np.float64)
    pooled = (a - a.mean()) / a.std(ddof=1)  # two scalars for all agents
    local = (a - a.mean(0)) / a.std(0, ddof=1)
    np.testing.assert_allclose(matrpo.normalize_advantages(advantages, "pooled").numpy(), pooled, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(matrpo.normalize_advantages(advantages, "local").numpy(), local, rtol=1e-4, atol=1e-5)
    assert pooled[:, 1].std() < 0.1  # pooling keeps the agents' scales apart


@pytest.mark.parametrize(("num_agents", "edges"), [(2, [(0, 1)]), (3, [(0, 1), (1, 2), (2, 0)]), (5, None)])
def test_ring(num_agents, edges):
    ring = matrpo.ring_edges(num_agents)
    if edges is not None:
        assert ring == edges
    assert sorted(q for edge in ring for q in edge) == sorted(list(range(num_agents)) * min(2, len(ring)))


# ----------------------------------------------------------------------------------------------------------------------
# ADMM
def consensus_residuals(residuals: dict) -> list[float]:
    """The per-edge admm/consensus_residual_{i}_{j} metrics of admm_consensus's residuals."""
    return [value for key, value in residuals.items() if key.startswith("admm/consensus_residual_")]


def test_edge_update_is_the_augmented_lagrangian_minimiser_then_the_dual_step():
    """min over z_ei + z_ej = 0 of sum_q [lambda_q . (w_q l_q - z_q) + rho/2 |w_q l_q - z_q|^2], solved from its KKT
    system per coordinate, then lambda_q += rho (w_q l_q - z_q)."""
    rng = np.random.default_rng(0)
    for rho in (0.5, 1.0, 3.0):
        lam_i, lam_j, l_i, l_j = (rng.normal(size=50) for _ in range(4))
        z_i, z_j, v = matrpo.edge_update(*(torch.tensor(a) for a in (lam_i, lam_j, l_i, l_j)), rho)
        w_i, w_j = 1.0, -1.0
        for k in range(50):  # unknowns z_i, z_j, multiplier mu
            kkt = np.array([[rho, 0.0, 1.0], [0.0, rho, 1.0], [1.0, 1.0, 0.0]])
            rhs = np.array([lam_i[k] + rho * w_i * l_i[k], lam_j[k] + rho * w_j * l_j[k], 0.0])
            expected_z_i, expected_z_j, _ = np.linalg.solve(kkt, rhs)
            assert z_i[k].item() == pytest.approx(expected_z_i) and z_j[k].item() == pytest.approx(expected_z_j)
            assert v[k].item() == pytest.approx(lam_i[k] + rho * (w_i * l_i[k] - expected_z_i))
            assert v[k].item() == pytest.approx(lam_j[k] + rho * (w_j * l_j[k] - expected_z_j))


def test_local_lagrangian_gradient_is_C_over_N():
    """The linearized step's b = (1/N) J^T vec(C) is the gradient of the line search's objective at theta_old."""
    generator = torch.Generator().manual_seed(0)
    advantages, coupling = torch.randn(7, generator=generator), torch.randn(7, 3, generator=generator)
    log_ratios = torch.zeros(7, 3, requires_grad=True)
    matrpo.local_lagrangian(log_ratios, advantages, coupling, 2.0).backward()
    torch.testing.assert_close(log_ratios.grad, (advantages[:, None] - coupling) / 7)


@pytest.mark.parametrize(("num_agents", "edge_order"), [(3, "random"), (5, "random"), (5, "round-robin")])
def test_prox_admm_reaches_consensus_and_the_centralised_optimum(num_agents, edge_order):
    """A convex instance of the linearised problem: l_q = J_q x_q with the J_q sharing a block U (so consensus is
    possible in span(U)), H_q = J_q^T J_q / N + 0.5 I (dominates J^T J / N), random advantages, a ring. Centralised:
    maximise the team objective sum_q <A_q 1^T, l> / N over l = U y subject to every agent's trust region
    1/2 y^T H_q,UU y <= delta, solved in closed form (the H_q,UU blocks are equal here)."""
    torch.manual_seed(num_agents)
    N, k, private, rho, delta = 20, 4, 3, 1.0, 0.05
    shape = (N, num_agents)  # a log-ratio matrix l: N samples x n heads
    U = torch.randn(N * num_agents, k, dtype=torch.float64)
    J = [torch.cat([U, torch.randn(N * num_agents, private, dtype=torch.float64)], 1) for _ in range(num_agents)]
    H = [Jq.T @ Jq / N + 0.5 * torch.eye(k + private, dtype=torch.float64) for Jq in J]
    A = [torch.randn(N, dtype=torch.float64) for _ in range(num_agents)]
    x = [torch.zeros(k + private, dtype=torch.float64) for _ in range(num_agents)]

    args = matrpo.Args(admm_rho=rho, admm_iters=1500 * num_agents, edge_order=edge_order, kl_threshold=delta)

    def policy_step(q, coupling, degree):
        # what prox_x_update reads of agent q's LocalModel (C = A 1^T - D), with the explicit matrices of this instance
        model = SimpleNamespace(advantages=A[q], prox_step=x[q], kept_log_ratios=(J[q] @ x[q]).view(shape),
                                J_transpose=lambda u: J[q].T @ u.reshape(-1), fisher_product=lambda v: H[q] @ v,
                                solve=lambda c: torch.linalg.solve(H[q], c))  # fmt: skip
        x[q] = matrpo.prox_x_update(model, coupling, rho * degree, args)
        return (J[q] @ x[q]).view(shape)

    ls, residuals = matrpo.admm_consensus(
        [lambda D, degree, q=q: policy_step(q, D, degree) for q in range(num_agents)],
        torch.zeros(shape, dtype=torch.float64),
        matrpo.ring_edges(num_agents),
        args,
        np.random.default_rng(0),
    )
    assert max((a - b).abs().max().item() for a, b in itertools.combinations(ls, 2)) < 1e-8  # consensus
    assert residuals["admm/primal_residual"] < 1e-8 and residuals["admm/dual_residual"] < 1e-8
    assert len(consensus_residuals(residuals)) == num_agents and max(consensus_residuals(residuals)) < 1e-16
    objective = sum(A[q] @ ls[q].sum(1) for q in range(num_agents)).item() / N
    g = sum(U.T @ A[q].repeat_interleave(num_agents) for q in range(num_agents)) / N
    y = torch.linalg.solve(H[0][:k, :k], g)
    y = y * torch.sqrt(2 * delta / (g @ y))
    assert objective == pytest.approx((g @ y).item(), rel=1e-8)


# ----------------------------------------------------------------------------------------------------------------------
# Jacobian and Fisher products of a tiny double-precision joint policy, against explicit matrices
def tiny_model(num_heads: int = 3, seed: int = 0, advantages=None, **arg_values):
    """A tiny joint policy moved to a generic point (non-uniform heads), its batch (12 samples of one env, advantages
    zero unless given) and its LocalModel; arg_values set the Args it is built with (fvp_subsample, cg_iters)."""
    torch.manual_seed(seed)
    policy = matrpo.JointPolicy(4, num_heads, 5, (6,)).double()
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.5 * torch.randn_like(param))
    obs = torch.randn(12, 4, dtype=torch.float64)
    actions = torch.randint(0, 5, (12, num_heads))
    advantages = torch.zeros(12, dtype=torch.float64) if advantages is None else advantages
    args = matrpo.Args(**{"num_envs": 1, "fvp_subsample": 1, "cg_damping": 0.01, **arg_values})
    return policy, obs, actions, matrpo.LocalModel(policy, obs, actions, advantages, args)


def logits_at(policy, obs):
    """theta -> the policy's logits (batch, heads, actions) on obs, for a flat parameter vector theta."""
    names, shapes = zip(*[(name, p.shape) for name, p in policy.named_parameters()])

    def logits(theta):
        chunks = theta.split([shape.numel() for shape in shapes])
        return functional_call(policy, {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}, (obs,))[0]

    return logits


def explicit_log_ratios(policy, obs, actions):
    """l(theta) written out: log-softmax of each head's logits at the taken action, minus its value at theta_old."""
    logits = logits_at(policy, obs)

    def logp(theta):
        return torch.log_softmax(logits(theta), -1).gather(-1, actions[..., None]).squeeze(-1)

    theta_old = parameters_to_vector(policy.parameters()).detach()
    return lambda theta: logp(theta) - logp(theta_old), theta_old


def explicit_mean_kl(policy, obs):
    """theta -> mean over obs of sum_k KL(pi_k,old || pi_k), written out from the logits."""
    logits = logits_at(policy, obs)
    logp_old = torch.log_softmax(logits(parameters_to_vector(policy.parameters()).detach()), -1)
    return lambda theta: (logp_old.exp() * (logp_old - torch.log_softmax(logits(theta), -1))).sum((-1, -2)).mean()


def test_jacobian_products_match_the_explicit_jacobian():
    policy, obs, actions, model = tiny_model()
    log_ratios, theta_old = explicit_log_ratios(policy, obs, actions)
    jacobian = torch.autograd.functional.jacobian(log_ratios, theta_old)  # (N, heads, parameters)
    assert jacobian.shape == (12, 3, theta_old.numel())
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(theta_old.numel(), dtype=torch.float64, generator=generator)
        u = torch.randn(12, 3, dtype=torch.float64, generator=generator)
        torch.testing.assert_close(model.J(v), jacobian @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.J_transpose(u), torch.einsum("tkp,tk->p", jacobian, u), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.log_ratios(theta_old + 0.1 * v), log_ratios(theta_old + 0.1 * v))


@pytest.mark.parametrize("fvp_subsample", [1, 3])
def test_fisher_vector_product_matches_the_explicit_kl_hessian(fvp_subsample):
    """F = Hessian of the mean over the (subsampled) batch of sum_k KL(pi_k,old || pi_k), written out by hand."""
    policy, obs, actions, model = tiny_model(fvp_subsample=fvp_subsample)
    theta_old = parameters_to_vector(policy.parameters()).detach()
    hessian = torch.autograd.functional.hessian(explicit_mean_kl(policy, obs[::fvp_subsample]), theta_old)
    v = torch.randn(theta_old.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model.fisher_product(v), hessian @ v + 0.01 * v, rtol=1e-9, atol=1e-12)


def test_linearized_step_matches_a_naive_reimplementation():
    """Explicit Jacobian and Fisher matrix, a direct solve and a plain loop over the step fractions."""
    generator = torch.Generator().manual_seed(3)
    advantages = torch.randn(12, dtype=torch.float64, generator=generator)
    policy, obs, actions, model = tiny_model(advantages=advantages, cg_iters=200)
    log_ratios, theta_old = explicit_log_ratios(policy, obs, actions)
    jacobian = torch.autograd.functional.jacobian(log_ratios, theta_old)
    mean_kl = explicit_mean_kl(policy, obs)
    fisher = torch.autograd.functional.hessian(mean_kl, theta_old) + 0.01 * torch.eye(theta_old.numel())

    for kl_threshold, scale in [(0.01, 0.0), (0.01, 0.3), (0.5, 0.3)]:
        coupling = scale * torch.randn(12, 3, dtype=torch.float64, generator=generator)
        rho_degree = 2.0 * (scale > 0)
        args = matrpo.Args(kl_threshold=kl_threshold, ls_steps=10, backtrack_coef=0.5)
        theta, theta_log_ratios, steps = matrpo.linearized_x_update(model, coupling, rho_degree, args)
        torch.testing.assert_close(theta_log_ratios, log_ratios(theta))

        b = torch.einsum("tkp,tk->p", jacobian, advantages[:, None] - coupling) / 12
        s = torch.linalg.solve(fisher, b)
        full_step = s * torch.sqrt(2 * kl_threshold / (b @ s))

        def lagrangian(theta):
            return matrpo.local_lagrangian(log_ratios(theta).detach(), advantages, coupling, rho_degree).item()

        for expected_steps in range(10):
            candidate = theta_old + 0.5**expected_steps * full_step
            kl = mean_kl(candidate).item()
            if kl <= 1.5 * kl_threshold and lagrangian(candidate) >= lagrangian(theta_old):
                break
        assert steps == expected_steps
        # CG stops at |r|^2 < 1e-10, the direct solve does not: agreement to about 1e-4 (a wrong scale would be far off)
        torch.testing.assert_close(theta, candidate, rtol=1e-3, atol=1e-5)
        assert lagrangian(theta) > lagrangian(theta_old)  # an improving step was found on this instance
    assert steps > 0  # the large threshold made the full step fail at least once


def test_linearized_step_without_an_improving_fraction_returns_none():
    """A penalty rho d so large that every fraction tried overshoots: the augmented Lagrangian falls."""
    advantages = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    policy, obs, actions, model = tiny_model(advantages=advantages, cg_iters=10)
    coupling = torch.zeros(12, 3, dtype=torch.float64)
    args = matrpo.Args(kl_threshold=0.01, ls_steps=3, backtrack_coef=0.5)
    theta, log_ratios, steps = matrpo.linearized_x_update(model, coupling, 1e6, args)
    assert theta is None and log_ratios is None and steps == 3
    theta, _, steps = matrpo.linearized_x_update(model, coupling, 0.0, args)
    assert theta is not None and steps < 3  # the same step without the penalty is accepted


@pytest.mark.parametrize("x_update", ["linearized", "prox"])
def test_admm_loop_brings_real_policies_to_agree(x_update):
    """Three tiny joint policies on their own observations with different advantages, driven by the script's own
    policy_step: after the loop, neighbours' log-ratio matrices differ far less with rho = 1 than with a negligible
    rho, and every policy moved."""

    def run(rho):
        torch.manual_seed(0)
        policies = [matrpo.JointPolicy(6, 3, 5, (16,)) for _ in range(3)]
        obs = [torch.randn(64, 6) for _ in range(3)]
        actions, advantages = torch.randint(0, 5, (64, 3)), torch.randn(64, 3)
        args = matrpo.Args(x_update=x_update, admm_rho=rho, admm_iters=60, kl_threshold=0.01, num_envs=1,
                           fvp_subsample=1)  # fmt: skip
        models = [
            matrpo.LocalModel(pi, o, actions, advantages[:, p], args) for p, (pi, o) in enumerate(zip(policies, obs))
        ]
        steps = [lambda coupling, degree, m=m: matrpo.policy_step(m, coupling, degree, args) for m in models]
        _, residuals = matrpo.admm_consensus(
            steps, torch.zeros(64, 3), matrpo.ring_edges(3), args, np.random.default_rng(0)
        )
        moved = [not torch.equal(parameters_to_vector(policy.parameters()), model.theta_old) for policy, model in
                 zip(policies, models)]  # fmt: skip
        consensus = consensus_residuals(residuals)
        assert len(consensus) == 3
        return max(consensus), min(consensus), all(moved)

    coupled, _, coupled_moved = run(1.0)
    _, uncoupled, uncoupled_moved = run(1e-4)
    assert coupled_moved and uncoupled_moved
    assert 0 < coupled < 0.1 * uncoupled, (coupled, uncoupled)


# ----------------------------------------------------------------------------------------------------------------------
# End to end
TINY_TASK = ["--max-cycles", "25", "--critic-minibatch-size", "25"]  # episodes and minibatches that fit TINY's batch
MODE_METRICS = {
    "admm": {"admm/primal_residual", "admm/dual_residual"}
    | {f"admm/consensus_residual_{edge}" for edge in ("0_1", "1_2", "2_0")},
    "independent": set(),
    "centralized": set(),
}  # fmt: skip


@pytest.mark.parametrize(
    "flags", [["--mode", "admm"], ["--mode", "admm", "--x-update", "prox", "--edge-order", "round-robin",
                                   "--advantage-norm", "local"], ["--mode", "independent"], ["--mode", "centralized"]],
    ids=["admm", "admm-prox", "independent", "centralized"],
)  # fmt: skip
def test_mode_runs_two_iterations(flags, tmp_path):
    run_ok("matrpo_admm.py", *flags, *TINY_TASK, "--admm-iters", "20", *TINY, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    metrics = read_metrics(run_dir)
    assert [m["global_step"] for m in metrics] == [50, 100]
    mode = flags[1]
    # the authors' code: each agent normalises its own advantages in the TRPO baseline, all pooled in MATRPO
    advantage_norm = json.loads((run_dir / "args.json").read_text())["advantage_norm"]
    assert advantage_norm == ("local" if mode == "independent" or "local" in flags else "pooled")
    learners = 1 if mode == "centralized" else 3
    stats = {"policy_loss", "entropy", "approx_kl", "kl"} | ({"line_search_steps"} if "prox" not in flags else set())
    expected = (
        {"global_step", "charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
         "charts/update_seconds", "losses/value_loss", "losses/explained_variance"}
        | {f"agent{i}/episodic_return" for i in range(3)}
        | {f"agent{p}/{name}" for p in range(learners) for name in stats}
        | MODE_METRICS[mode]
    )  # fmt: skip
    for line in metrics:
        assert set(line) == expected
        assert all(math.isfinite(value) for value in line.values())
        assert line["charts/episodic_length"] == 25
        # the team return is the sum of the private ones; only agent 0 sees the (negative) landmark term
        private = [line[f"agent{i}/episodic_return"] for i in range(3)]
        assert line["charts/episodic_return"] == pytest.approx(sum(private))
        assert private[0] < min(private[1:]) - 1
        assert all(line[f"agent{p}/kl"] > 0 for p in range(learners))  # every policy moved
        if "prox" not in flags:  # the line search keeps the KL within 1.5 delta (prox has no line search)
            assert all(line[f"agent{p}/kl"] <= 1.5 * 0.003 for p in range(learners))
