"""HATRPO's pieces against independent references: conjugate gradient against a direct solve, the Fisher-vector
product against an explicit Hessian of the KL, and a whole trust-region step against a naive re-implementation."""

import math

import gymnasium as gym
import pytest
import torch
from helpers import load_script
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

hatrpo = load_script("hatrpo_mpe.py")

SPACES = {"categorical": gym.spaces.Discrete(4), "gaussian": gym.spaces.Box(0.0, 1.0, (3,))}


# ----------------------------------------------------------------------------------------------------------------------
# Conjugate gradient
def random_spd(n: int, condition: float, seed: int) -> torch.Tensor:
    """A random symmetric positive definite matrix with eigenvalues spread from 1 to `condition`."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


@pytest.mark.parametrize("n", [6, 40])
def test_conjugate_gradient_error_shrinks_as_theory_says_and_reaches_the_direct_solve(n):
    condition = 100.0
    A = random_spd(n, condition, seed=n)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_star = torch.linalg.solve(A, b)

    def a_norm(v):
        return torch.sqrt(v @ A @ v).item()

    # k iterations: ||x_k - x*||_A <= 2 ((sqrt(c) - 1) / (sqrt(c) + 1))^k ||x*||_A, c the condition number
    rate = (math.sqrt(condition) - 1) / (math.sqrt(condition) + 1)
    for k in [1, 2, 3, 5]:
        products = []
        x = hatrpo.conjugate_gradient(lambda v: products.append(v) or A @ v, b, k, residual_tol=0.0)
        assert len(products) == k  # one matrix-vector product per iteration
        assert a_norm(x - x_star) <= 2 * rate**k * a_norm(x_star)
        assert a_norm(x - x_star) > 1e-6 * a_norm(x_star)  # not converged yet: k < n and a spread spectrum
    # n iterations solve an n x n system in exact arithmetic; float64 rounding allows a few more
    x = hatrpo.conjugate_gradient(lambda v: A @ v, b, 2 * n, residual_tol=1e-28)
    torch.testing.assert_close(x, x_star, rtol=1e-9, atol=1e-12)


def test_conjugate_gradient_stops_at_the_residual_tolerance():
    A = random_spd(20, 10.0, seed=0)
    products = []
    x = hatrpo.conjugate_gradient(lambda v: products.append(v) or A @ v, torch.zeros(20, dtype=torch.float64), 10)
    assert products == [] and torch.equal(x, torch.zeros(20, dtype=torch.float64))  # b = 0: x = 0, no NaN
    b = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = hatrpo.conjugate_gradient(lambda v: products.append(v) or A @ v, b, 100)  # default tolerance 1e-10 on |r|^2
    residual = ((b - A @ x) ** 2).sum()
    assert len(products) < 20 and 1e-16 < residual < 1e-10  # stopped once under the tolerance, not long after


# ----------------------------------------------------------------------------------------------------------------------
# Explicit reference quantities of a tiny double-precision actor, as functions of its flat parameter vector
def tiny_actor(kind: str, seed: int = 0):
    """A tiny actor moved to a generic point (random LayerNorm gains, a non-uniform policy) and a batch of obs."""
    torch.manual_seed(seed)
    actor = hatrpo.Actor(3, SPACES[kind], (6,)).double()
    with torch.no_grad():
        for param in actor.parameters():
            param.add_(0.5 * torch.randn_like(param))
    return actor, torch.randn(16, 3, dtype=torch.float64)


def as_function_of_theta(actor, obs):
    """u(theta): the actor's distribution parameters (logits,) or (mean, std) for a flat parameter vector."""
    names, shapes = zip(*[(name, p.shape) for name, p in actor.named_parameters()])

    def dist_params(theta):
        chunks = theta.split([shape.numel() for shape in shapes])
        return functional_call(actor, {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}, (obs,))

    return dist_params


def explicit_kl(u_old, u) -> torch.Tensor:
    """Per-sample KL(old || new), written out: categorical sum p (log p - log q); Gaussians summed over dimensions."""
    if len(u) == 1:
        logp_old, logp = torch.log_softmax(u_old[0], -1), torch.log_softmax(u[0], -1)
        return (logp_old.exp() * (logp_old - logp)).sum(-1)
    (mean_old, std_old), (mean, std) = u_old, u
    return (torch.log(std / std_old) + (std_old**2 + (mean_old - mean) ** 2) / (2 * std**2) - 0.5).sum(-1)


def explicit_log_prob(u, actions) -> torch.Tensor:
    if len(u) == 1:
        return torch.log_softmax(u[0], -1).gather(-1, actions[:, None]).squeeze(-1)
    mean, std = u
    return (-((actions - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)


def kl_hessian(actor, obs) -> torch.Tensor:
    """The explicit Hessian of the batch-mean KL(pi_old || pi_theta) at theta_old, by torch.autograd.functional."""
    dist_params = as_function_of_theta(actor, obs)
    theta_old = parameters_to_vector(actor.parameters()).detach()
    u_old = tuple(p.detach() for p in dist_params(theta_old))
    return torch.autograd.functional.hessian(lambda theta: explicit_kl(u_old, dist_params(theta)).mean(), theta_old)


@pytest.mark.parametrize("kind", SPACES)
def test_fisher_vector_product_is_the_explicit_kl_hessian_times_v_plus_damping(kind):
    actor, obs = tiny_actor(kind)
    H = kl_hessian(actor, obs)
    assert torch.linalg.eigvalsh(H).max() > 1e-2  # a real curvature, not a degenerate zero matrix
    fvp = hatrpo.fisher_vector_product(actor, obs, damping=0.1)
    for seed in range(3):
        v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(fvp(v), H @ v + 0.1 * v, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# One HATRPO step against a naive re-implementation of the trust-region step: explicit Hessian, direct solve
def make_batch(kind: str, seed: int = 0):
    actor, obs = tiny_actor(kind, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        dist = actor.distribution(obs)
        actions = dist.sample()
        logp_old = dist.log_prob(actions)
    advantages = torch.randn(len(obs), dtype=torch.float64, generator=generator)
    factor = torch.exp(0.3 * torch.randn(len(obs), dtype=torch.float64, generator=generator))  # M of earlier agents
    return actor, (obs, actions, logp_old, advantages, factor)


STEP = dict(ls_steps=10, backtrack_coef=0.8, accept_ratio=0.5, cg_damping=0.1)


def reference_step(actor, obs, actions, logp_old, advantages, factor, kl_threshold, ls_steps, backtrack_coef,
                   accept_ratio, cg_damping, fisher_obs) -> tuple:  # fmt: skip
    """theta_new, the number of rejected fractions and |x| of the solve, computed the slow, obvious way; the Fisher
    matrix on fisher_obs."""
    dist_params = as_function_of_theta(actor, obs)
    theta_old = parameters_to_vector(actor.parameters()).detach()
    u_old = tuple(p.detach() for p in dist_params(theta_old))

    def surrogate(theta):  # mean(r M A)
        return (torch.exp(explicit_log_prob(dist_params(theta), actions) - logp_old) * factor * advantages).mean()

    g = torch.autograd.functional.jacobian(surrogate, theta_old)
    F = kl_hessian(actor, fisher_obs) + cg_damping * torch.eye(len(theta_old), dtype=torch.float64)
    x = torch.linalg.solve(F, g)
    full_step = x * torch.sqrt(2 * kl_threshold / (x @ F @ x))
    for j in range(ls_steps):
        fraction = backtrack_coef**j
        theta = theta_old + fraction * full_step
        kl = explicit_kl(u_old, dist_params(theta)).mean()
        improvement = surrogate(theta) - surrogate(theta_old)
        if kl < kl_threshold and improvement > 0 and improvement / (fraction * g @ full_step) > accept_ratio:
            return theta, j, x.norm()
    return theta_old, ls_steps, x.norm()


@pytest.mark.parametrize("kind", SPACES)
@pytest.mark.parametrize(
    ("kl_threshold", "accept_ratio"), [(0.005, 0.5), (1.0, 0.8)], ids=["full-step", "backtracking"]
)
def test_hatrpo_step_matches_the_reference_and_satisfies_the_trust_region(kind, kl_threshold, accept_ratio):
    actor, batch = make_batch(kind)
    obs, actions, logp_old, advantages, factor = batch
    theta_old = parameters_to_vector(actor.parameters()).detach().clone()
    step_args = {**STEP, "accept_ratio": accept_ratio}
    expected_theta, expected_steps, x_norm = reference_step(actor, *batch, kl_threshold, **step_args, fisher_obs=obs)
    # CG runs until its residual r is under the tolerance (|r|^2 < 1e-10), so its solution x is within
    # |r| / smallest eigenvalue of F + damping I <= 1e-5 / damping of the direct solve: so is the step, relatively
    args = hatrpo.Args(kl_threshold=kl_threshold, cg_iters=500, num_envs=4, **step_args)
    stats, logp_new = hatrpo.hatrpo_update(actor, *batch, args)
    theta = parameters_to_vector(actor.parameters()).detach()
    assert stats["line_search_steps"] == expected_steps
    assert (expected_steps == 0) == (kl_threshold == 0.005)  # the large threshold makes the full step fail
    step, expected_step = theta - theta_old, expected_theta - theta_old
    relative_tolerance = 2 * (1e-5 / STEP["cg_damping"]) / x_norm  # 2: first order in the error of x, both ways
    assert (step - expected_step).norm() <= relative_tolerance * expected_step.norm()

    # the accepted step, checked on its own: KL under the threshold, a real improvement, close to the prediction
    dist_params = as_function_of_theta(actor, obs)
    u_old, u_new = dist_params(theta_old), dist_params(theta)
    kl = explicit_kl(u_old, u_new).mean().item()
    ratio = torch.exp(explicit_log_prob(u_new, actions) - logp_old)
    improvement = ((ratio - 1) * factor * advantages).mean().item()
    assert 0 < kl < kl_threshold and improvement > 0
    assert improvement / stats["expected_improvement"] > accept_ratio
    assert stats["kl"] == pytest.approx(kl, rel=1e-9) and stats["improvement"] == pytest.approx(improvement, rel=1e-9)
    assert stats["policy_loss"] == pytest.approx(-(ratio * factor * advantages).mean().item(), rel=1e-9)
    torch.testing.assert_close(logp_new, explicit_log_prob(u_new, actions))  # for the next agent's factor M


@pytest.mark.parametrize("kind", SPACES)
def test_fvp_subsample_takes_the_fisher_matrix_on_every_kth_step_of_each_env(kind):
    actor, batch = make_batch(kind)
    obs = batch[0]  # 4 steps of 4 envs, flattened step-major: with K = 3, steps 0 and 3 of each env
    theta_old = parameters_to_vector(actor.parameters()).detach().clone()
    fisher_obs = obs[[t * 4 + env for t in (0, 3) for env in range(4)]]
    expected_theta, expected_steps, x_norm = reference_step(actor, *batch, 0.001, **STEP, fisher_obs=fisher_obs)
    full_batch_theta, _, _ = reference_step(actor, *batch, 0.001, **STEP, fisher_obs=obs)
    args = hatrpo.Args(kl_threshold=0.001, cg_iters=500, num_envs=4, fvp_subsample=3, **STEP)
    stats, _ = hatrpo.hatrpo_update(actor, *batch, args)
    assert stats["line_search_steps"] == expected_steps < STEP["ls_steps"]  # the same fraction, and a step taken
    step, expected_step = parameters_to_vector(actor.parameters()).detach() - theta_old, expected_theta - theta_old
    tolerance = 2 * (1e-5 / STEP["cg_damping"]) / x_norm * expected_step.norm()  # as in the test above
    assert (step - expected_step).norm() <= tolerance < (full_batch_theta - expected_theta).norm() / 10


@pytest.mark.parametrize("kind", SPACES)
@pytest.mark.parametrize("case", ["zero-advantage", "unreachable-accept-ratio"])
def test_rejected_step_restores_the_parameters_bit_for_bit(kind, case):
    """Zero advantages: no step improves the surrogate. An accept ratio of 1e6: every real step is tried and refused."""
    actor, (obs, actions, logp_old, advantages, factor) = make_batch(kind)
    if case == "zero-advantage":
        advantages = torch.zeros_like(advantages)
    step = {**STEP, "accept_ratio": 1e6 if case == "unreachable-accept-ratio" else STEP["accept_ratio"]}
    before = [p.detach().clone() for p in actor.parameters()]
    args = hatrpo.Args(kl_threshold=0.01, cg_iters=10, num_envs=4, **step)
    stats, logp_new = hatrpo.hatrpo_update(actor, obs, actions, logp_old, advantages, factor, args)
    assert torch.equal(logp_new, logp_old)  # the policy is unchanged, so is its log-probability
    assert stats["line_search_steps"] == STEP["ls_steps"]
    assert stats["kl"] == stats["improvement"] == stats["expected_improvement"] == 0.0
    for old, new in zip(before, actor.parameters()):
        assert torch.equal(old.view(torch.int64), new.detach().view(torch.int64))  # the same bits, -0.0 included
