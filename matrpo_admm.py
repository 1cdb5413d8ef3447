# MATRPO: TRPO with asynchronous ADMM (Li & He 2020, https://arxiv.org/abs/2010.07916); docs: docs/matrpo_admm.md
import importlib
import json
import math
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch import nn
from torch.autograd import forward_ad
from torch.distributions import Categorical, Independent, kl_divergence


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment
    torch_threads: int = 1  # torch.set_num_threads; 1 leaves the other cores to parallel runs (results depend on it)
    track: bool = False  # if toggled, log to Weights and Biases (respects WANDB_MODE, e.g. WANDB_MODE=offline)
    wandb_project_name: str = "marl-trust-region"  # the wandb project name
    wandb_entity: str | None = None  # the entity (team) of the wandb project
    capture_video: bool = False  # if toggled, evaluation writes a video of its first episode to runs/{run_name}/videos
    save_model: bool = False  # checkpoint after every iteration (resume with --resume), then evaluate at the end
    resume: str | None = None  # path of a checkpoint to continue training from (same task, mode and architecture)
    eval_checkpoint: str | None = None  # path of a checkpoint to evaluate with deterministic actions; no training
    eval_episodes: int = 10  # episodes per evaluation (run in parallel, one env each)
    eval_interval: int = 100_000  # env steps between deterministic evaluations (eval/episodic_return); 0: none

    # Environment: the paper's Cooperative Navigation with private rewards
    num_agents: int = 3  # the number of agents (and landmarks) of simple_spread; the agents talk on a ring
    max_cycles: int = 100  # steps per episode (a time-limit truncation)
    total_timesteps: int = 5_000_000  # total environment steps (one per env per vector step, all agents acting at once)
    num_envs: int = 10  # the number of parallel environments
    num_steps: int = 1000  # the number of steps per environment per rollout

    # Algorithm (the admm_*, edge_order and x_update settings apply to --mode admm only)
    mode: str = "admm"  # admm (MATRPO), independent (TRPO per agent, own reward and action), centralized (one policy)
    kl_threshold: float = 0.003  # delta: the bound on each agent's mean KL(pi_old || pi_new) per policy iteration
    admm_rho: float = 1.0  # rho: the penalty of the augmented Lagrangian
    admm_iters: int = 100  # edge activations per policy iteration
    edge_order: str = "random"  # which edge each ADMM iteration activates: random (uniformly) or round-robin
    x_update: str = "linearized"  # ADMM's policy step: linearized (the authors', a line-searched TRPO step) or prox
    advantage_norm: str | None = None  # pooled over all agents (MATRPO) or local (TRPO); None: local if independent
    gamma: float = 0.995  # the discount factor gamma
    gae_lambda: float = 0.95  # the lambda of generalised advantage estimation
    hidden_sizes: tuple[int, ...] = (128, 128)  # hidden layer sizes of the policies and the critics (SELU)
    ls_steps: int = 10  # the number of step fractions the backtracking line search tries
    backtrack_coef: float = 0.5  # the line search tries the fractions backtrack_coef**j, j = 0 .. ls_steps - 1
    cg_iters: int = 10  # conjugate gradient iterations solving (F + damping I) s = b
    cg_damping: float = 0.01  # the damping added to the Fisher matrix F
    fvp_subsample: int = 5  # Fisher-vector products on every K-th step of each env (the authors' 5)
    critic_learning_rate: float = 3e-4  # Adam learning rate of the critics
    critic_epochs: int = 3  # epochs of the critic update
    critic_minibatch_size: int = 64  # samples per critic minibatch (reshuffled each epoch; a last partial one dropped)

    # Computed at run time (not command-line options)
    batch_size: tyro.conf.Suppress[int] = 0  # samples per agent per iteration (num_envs * num_steps)
    num_iterations: tyro.conf.Suppress[int] = 0  # the number of iterations (total_timesteps // batch_size)


def fail(message: str):
    """A user's mistake: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


ARG_RANGES = (  # (fields, test, what the error message says), checked by validate_args
    ("num_envs num_steps total_timesteps critic_epochs critic_minibatch_size max_cycles eval_episodes "
     "torch_threads critic_learning_rate kl_threshold admm_rho admm_iters ls_steps cg_iters "
     "fvp_subsample", lambda x: x > 0, "positive"),
    ("hidden_sizes", lambda x: len(x) > 0 and min(x) > 0, "one or more positive sizes"),
    ("num_agents", lambda x: x >= 2, ">= 2"),
    ("gamma gae_lambda backtrack_coef", lambda x: 0 < x <= 1, "in (0, 1]"),
    ("cg_damping eval_interval", lambda x: x >= 0, ">= 0"),
)  # fmt: skip
CHOICES = {"mode": ("admm", "independent", "centralized"), "edge_order": ("random", "round-robin"),
           "x_update": ("linearized", "prox"), "advantage_norm": ("pooled", "local")}  # fmt: skip


def validate_args(args: Args):
    for name, choices in CHOICES.items():
        if getattr(args, name) not in choices:
            fail(f"unknown --{name.replace('_', '-')} {getattr(args, name)!r}; valid choices: {', '.join(choices)}")
    for names, in_range, expected in ARG_RANGES:
        for name in names.split():
            if not in_range(getattr(args, name)):
                fail(f"--{name.replace('_', '-')} must be {expected}, got {getattr(args, name)}")
    if args.batch_size < 2:
        fail(f"--num-envs x --num-steps must be 2 or more to normalise the advantages, got {args.batch_size}")
    if args.total_timesteps < args.batch_size:
        fail(f"--total-timesteps {args.total_timesteps} is smaller than one batch of {args.batch_size} steps")
    if args.critic_minibatch_size > args.batch_size:
        fail(f"--critic-minibatch-size {args.critic_minibatch_size} is larger than one batch of {args.batch_size}")
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")


# Environment: the paper's Cooperative Navigation with private rewards
class MPEPrivateEnv(gym.Env):
    """mpe2's simple_spread as a gymnasium.Env: observation Dict of the global state and each agent's observation (the
    always-zero communication part dropped); action Tuple of Discrete(5); reward the team reward, the sum of the private
    rewards r^i in info["private_rewards"]: with local_ratio=1 each agent gets its own collision penalty, and agent 0
    alone the landmark term (minus the sum over landmarks of the closest agent's distance)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, num_agents: int, max_cycles: int, render_mode: str | None = None):
        module = importlib.import_module("mpe2.simple_spread_v3")
        self.mpe_env = module.raw_env(N=num_agents, local_ratio=1.0, max_cycles=max_cycles, render_mode=render_mode)
        self.agents, self.render_mode = self.mpe_env.possible_agents, render_mode
        self.render, self.close = self.mpe_env.render, self.mpe_env.close  # mpe2's frames; close ends its window
        # observation: velocity 2, position 2, landmarks 2n, other agents 2(n-1), then communication 2(n-1)
        self.obs_size = 4 + 2 * num_agents + 2 * (num_agents - 1)
        box = gym.spaces.Box(-np.inf, np.inf, (self.obs_size,), np.float32)
        state = gym.spaces.Box(-np.inf, np.inf, (num_agents * self.obs_size,), np.float32)
        self.observation_space = gym.spaces.Dict({"state": state, **{a: box for a in self.agents}})
        self.action_space = gym.spaces.Tuple([self.mpe_env.action_space(a) for a in self.agents])

    def _observe(self) -> dict:
        obs = {a: self.mpe_env.observe(a)[: self.obs_size] for a in self.agents}
        return {"state": np.concatenate([obs[a] for a in self.agents]), **obs}

    def reset(self, seed=None, options=None):
        self.mpe_env.reset(seed=seed)
        return self._observe(), {"private_rewards": np.zeros(len(self.agents))}

    def step(self, action):
        for agent_action in action:  # agents act in turn; the world steps after the last one
            self.mpe_env.step(agent_action)
        private = np.array([self.mpe_env.rewards[a] for a in self.agents])  # own collision penalties
        private[0] += self.mpe_env.scenario.global_reward(self.mpe_env.world)  # the landmark term, agent 0 only
        terminated = any(self.mpe_env.terminations.values())
        truncated = any(self.mpe_env.truncations.values()) and not terminated
        return self._observe(), float(private.sum()), terminated, truncated, {"private_rewards": private}


def step_private_rewards(infos: dict, done: np.ndarray) -> np.ndarray:
    """The private rewards r^i of a vector step (envs x agents). Where an episode ended, the step's info went to
    final_info (gymnasium's same-step autoreset) and infos holds the reset's."""
    final = infos["final_info"]["private_rewards"] if done.any() else 0.0
    return np.where(done[:, None], final, infos["private_rewards"])


def make_env(num_agents: int, max_cycles: int, render_mode: str | None = None) -> Callable:
    return lambda: MPEPrivateEnv(num_agents, max_cycles, render_mode)


def ring_edges(num_agents: int) -> list[tuple[int, int]]:
    """The communication graph 0-1-...-(n-1)-0. Edge e = (i, j) is oriented: w_ei = +1, w_ej = -1."""
    return [(0, 1)] if num_agents == 2 else [(i, (i + 1) % num_agents) for i in range(num_agents)]


# Networks (the authors' code: two SELU layers of 128 for the policy and the critic)
def layer_init(layer, std=2**0.5, bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def selu_mlp(input_size: int, hidden_sizes: tuple[int, ...]) -> nn.Sequential:
    sizes = (input_size, *hidden_sizes)
    linears = [layer_init(nn.Linear(size_in, size_out), std=1.0) for size_in, size_out in zip(sizes, sizes[1:])]
    return nn.Sequential(*[module for linear in linears for module in (linear, nn.SELU())])


class JointPolicy(nn.Module):
    """pi^i(a | o^i) over the joint action of the agents in its heads: one categorical head per agent on a shared
    trunk. Agent i executes its own head; the others are its model of its teammates, used only in likelihood ratios."""

    def __init__(self, obs_size: int, num_heads: int, num_actions: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.trunk = selu_mlp(obs_size, hidden_sizes)
        self.heads = layer_init(nn.Linear(hidden_sizes[-1], num_heads * num_actions), std=0.01)
        self.num_heads, self.num_actions = num_heads, num_actions

    def forward(self, obs: torch.Tensor) -> tuple:
        """The parameters u of the distribution: (logits,) of shape (batch, heads, actions)."""
        return (self.heads(self.trunk(obs)).unflatten(-1, (self.num_heads, self.num_actions)),)

    def distribution_from(self, params: tuple):
        return Independent(Categorical(logits=params[0]), 1)  # the joint log-prob, entropy and KL sum over the heads

    def distribution(self, obs: torch.Tensor):
        return self.distribution_from(self(obs))


class ValueNetwork(nn.Module):
    """V^i(o^i): agent i's local critic, fitted to its private returns (in `centralized` mode: V(s), team return)."""

    def __init__(self, obs_size: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.net = nn.Sequential(selu_mlp(obs_size, hidden_sizes), layer_init(nn.Linear(hidden_sizes[-1], 1), std=1.0))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


# Algorithm
def compute_gae(rewards, values, next_values, terminations, dones, gamma: float, gae_lambda: float):
    """Advantages and returns (targets of V) of a (num_steps, num_envs) rollout. next_values[t] = V(s_{t+1}) of the true
    next state: a truncation bootstraps from it, a termination zeroes it, and dones stops the sum at an episode end."""
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminations[t]) - values[t]
        lastgaelam = delta + gamma * gae_lambda * (1.0 - dones[t]) * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


def normalize_advantages(advantages: torch.Tensor, how: str) -> torch.Tensor:
    """advantages: (samples, policies). pooled: one mean and std over all policies' advantages (two scalars the agents
    could agree on by average consensus, as the authors' code); local: each policy's own."""
    dim = None if how == "pooled" else 0
    return (advantages - advantages.mean(dim)) / (advantages.std(dim) + 1e-8)


def conjugate_gradient(matrix_vector_product: Callable, b: torch.Tensor, iters: int, residual_tol: float = 1e-10):
    """Approximately solve A x = b for a symmetric positive definite A given as the function x -> A x."""
    x, r, p, r_dot_r = torch.zeros_like(b), b.clone(), b.clone(), b @ b  # solution, residual b - A x, direction, r.r
    for _ in range(iters):
        if r_dot_r < residual_tol:
            break
        Ap = matrix_vector_product(p)
        alpha = r_dot_r / (p @ Ap)
        x, r = x + alpha * p, r - alpha * Ap
        r_dot_r, r_dot_r_old = r @ r, r_dot_r
        p = r + (r_dot_r / r_dot_r_old) * p
    return x


def fisher_vector_product(actor, obs, damping: float) -> Callable:
    """v -> (F + damping I) v, F = J^T H J the Hessian of the batch-mean KL(pi_old || pi_theta) at theta_old (exact
    there, where the KL's gradient in u is 0): H the KL's Hessian in the distribution's parameters u, J = du/dtheta.
    J v is one forward-mode pass (dual numbers carrying v); J^T backpropagates through the first forward pass, kept."""
    params, u_old = dict(actor.named_parameters()), actor(obs)  # u(theta_old), its graph kept for all the products
    u = tuple(p.detach().requires_grad_() for p in u_old)  # a new leaf at u_old, to differentiate the KL in
    pi_old = actor.distribution_from(tuple(p.detach() for p in u_old))
    kl_grad = torch.autograd.grad(kl_divergence(pi_old, actor.distribution_from(u)).mean(), u, create_graph=True)

    def fvp(v: torch.Tensor) -> torch.Tensor:
        v_per_param = v.split([p.numel() for p in params.values()])
        with forward_ad.dual_level():  # theta_old + epsilon v: the network's outputs carry J v as their tangents
            dual = {n: forward_ad.make_dual(p.detach(), t.view_as(p)) for (n, p), t in zip(params.items(), v_per_param)}
            J_v = tuple(forward_ad.unpack_dual(out).tangent for out in torch.func.functional_call(actor, dual, (obs,)))
        H_J_v = torch.autograd.grad(kl_grad, u, grad_outputs=J_v, retain_graph=True)
        J_T_H_J_v = torch.autograd.grad(u_old, list(params.values()), grad_outputs=H_J_v, retain_graph=True)
        return nn.utils.parameters_to_vector(J_T_H_J_v) + damping * v

    return fvp


class LocalModel:
    """Agent i's local problem at theta_old on its own batch (obs, its heads' actions, advantages): the log-ratios
    l[t, k] = log pi_k(a^k_t | o_t; theta) - log pi_k(a^k_t | o_t; theta_old) (N samples x heads), the products J v and
    J^T u of J = dl/dtheta at theta_old (J is never formed), the Fisher product, and its state between activations."""

    def __init__(self, policy: JointPolicy, obs, actions, advantages, args: Args):
        self.policy, self.obs, self.actions, self.advantages = policy, obs, actions, advantages
        self.names, self.shapes = zip(*[(name, p.shape) for name, p in policy.named_parameters()])
        self.theta_old = nn.utils.parameters_to_vector(policy.parameters()).detach()
        with torch.no_grad():
            self.dist_old = policy.distribution(obs)
            self.logp_old = self.dist_old.base_dist.log_prob(actions)
        _, self.pullback = torch.func.vjp(self.log_ratios, self.theta_old)
        # F on every fvp_subsample-th step of every env (a stride over the flat (step, env) batch could skip envs)
        fisher_obs = obs.unflatten(0, (-1, args.num_envs))[:: args.fvp_subsample].flatten(0, 1)
        self.fisher_product = fisher_vector_product(policy, fisher_obs, args.cg_damping)
        self.solve = partial(conjugate_gradient, self.fisher_product, iters=args.cg_iters)  # b -> (F + damping I)^-1 b
        # carried between activations: l at the kept parameters, x^k of the prox update, the line search counts
        self.kept_log_ratios, self.prox_step = torch.zeros_like(self.logp_old), torch.zeros_like(self.theta_old)
        self.line_search_steps = []

    def distribution(self, theta: torch.Tensor):
        chunks = theta.split([shape.numel() for shape in self.shapes])
        params = {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}
        return self.policy.distribution_from(torch.func.functional_call(self.policy, params, (self.obs,)))

    def log_ratios(self, theta: torch.Tensor) -> torch.Tensor:
        return self.log_ratios_of(self.distribution(theta))

    def log_ratios_of(self, dist) -> torch.Tensor:
        return dist.base_dist.log_prob(self.actions) - self.logp_old

    def J(self, v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(self.log_ratios, (self.theta_old,), (v,))[1]

    def J_transpose(self, u: torch.Tensor) -> torch.Tensor:
        return self.pullback(u)[0]


def local_lagrangian(log_ratios, advantages, coupling, rho_degree: float) -> torch.Tensor:
    """Agent q's augmented Lagrangian, up to a constant: mean_t[r_t A_t] - (1/N) (<D, l> + rho d / 2 |l|^2), with the
    joint ratio r_t = exp(sum_k l_tk), d the agent's degree and D its coupling with its edges,
    D = sum_{e at q} w_eq (lambda_eq - rho z_eq) (so that C = A 1^T - D). Without edges it is TRPO's surrogate."""
    surrogate = (log_ratios.sum(1).exp() * advantages).mean()
    return surrogate - ((coupling * log_ratios).sum() + rho_degree / 2 * (log_ratios**2).sum()) / len(advantages)


def linearized_x_update(model: LocalModel, coupling, rho_degree: float, args: Args) -> tuple:
    """`--x-update linearized` (the authors' code), from theta_old: b = (1/N) J^T vec(C) with C = A 1^T - D, the
    natural-gradient step s = (F + damping I)^{-1} b scaled to the KL bound, x = sqrt(2 delta / b^T s) s, then a line
    search for the first fraction with mean KL <= 1.5 delta and local augmented Lagrangian not below theta_old's.
    Returns its parameters and log-ratio matrix (None, None if none) and the number of fractions rejected."""
    advantages, delta = model.advantages, args.kl_threshold
    C = advantages[:, None] - coupling
    b = model.J_transpose(C / len(advantages))
    s = model.solve(b)
    b_s = b @ s
    full_step = s * torch.sqrt(2 * delta / b_s) if b_s > 0 else torch.zeros_like(s)
    with torch.no_grad():
        lagrangian_old = local_lagrangian(torch.zeros_like(C), advantages, coupling, rho_degree)
        for steps in range(args.ls_steps):
            theta = model.theta_old + args.backtrack_coef**steps * full_step
            dist = model.distribution(theta)
            log_ratios = model.log_ratios_of(dist)
            kl = kl_divergence(model.dist_old, dist).mean()
            if kl <= 1.5 * delta and local_lagrangian(log_ratios, advantages, coupling, rho_degree) >= lagrangian_old:
                return theta, log_ratios, steps
    return None, None, args.ls_steps


def prox_x_update(model: LocalModel, coupling, rho_degree: float, args: Args) -> torch.Tensor:
    """`--x-update prox`: c = (1/N) J^T vec(C - rho d l^k) + rho d H x^k, s = H^{-1} c,
    x = min(1 / (rho d), sqrt(2 delta / c^T s)) s, with x^k the previous step and l^k = J x^k. The quadratic
    (rho d / 2N) |J x|^2 is replaced by its linearisation at x^k plus the proximal term (rho d / 2) |x - x^k|_H^2, so
    the step is exact ADMM on the linearised problem when H dominates J^T J / N."""
    C_shifted = model.advantages[:, None] - coupling - rho_degree * model.kept_log_ratios  # C - rho d l^k
    c = model.J_transpose(C_shifted) / len(C_shifted) + rho_degree * model.fisher_product(model.prox_step)
    s = model.solve(c)
    c_s = (c @ s).item()
    return min(1 / rho_degree, math.sqrt(2 * args.kl_threshold / c_s) if c_s > 0 else 0.0) * s


def policy_step(model: LocalModel, coupling, degree: int, args: Args) -> torch.Tensor:
    """Agent q's policy step in the ADMM loop, given its coupling D_q and degree d_q (the baselines: D = 0, d = 0):
    sets the policy's parameters and returns its log-ratio matrix l_q. A rejected linearized step changes nothing: the
    agent keeps its last accepted step (theta_old, l = 0 if none), so it does not announce l = 0 to its neighbours."""
    if args.x_update == "prox" and degree > 0:
        x = prox_x_update(model, coupling, args.admm_rho * degree, args)
        nn.utils.vector_to_parameters(model.theta_old + x, model.policy.parameters())
        model.prox_step, model.kept_log_ratios = x, model.J(x).detach()
    else:
        theta, log_ratios, steps = linearized_x_update(model, coupling, args.admm_rho * degree, args)
        model.line_search_steps.append(steps)
        if theta is not None:
            nn.utils.vector_to_parameters(theta, model.policy.parameters())
            model.kept_log_ratios = log_ratios
    return model.kept_log_ratios


def edge_update(lam_i, lam_j, l_i, l_j, rho: float) -> tuple:
    """The update of the active edge e = (i, j), w_ei = +1, w_ej = -1: z_ei, z_ej minimise the edge's augmented
    Lagrangian over z_ei + z_ej = 0, then the dual step gives both endpoints the same new dual v_e."""
    v = (lam_i + lam_j) / 2 + (rho / 2) * (l_i - l_j)
    return l_i + (lam_i - v) / rho, -l_j + (lam_j - v) / rho, v


def admm_consensus(policy_steps: list[Callable], zero: torch.Tensor, edges, args: Args, rng) -> tuple[list, dict]:
    """Asynchronous edge-based ADMM (Wei & Ozdaglar 2013) on the linearised problems from z = lambda = l = zero (N x n):
    each iteration activates one edge e = (i, j); both endpoints q take a policy step, policy_steps[q](coupling D_q,
    degree d_q) -> l_q, then exchange l and lambda over e and update e's estimators z and duals. Returns l, metrics."""
    rho = args.admm_rho
    sign = {(e, q): 1.0 if q == edge[0] else -1.0 for e, edge in enumerate(edges) for q in edge}  # w_eq
    # per (edge e, endpoint q): estimator z_eq of w_eq l_q (z_ei + z_ej = 0), dual lambda_eq, z_eq's last change
    z, lam, z_change = ({key: torch.zeros_like(zero) for key in sign} for _ in range(3))
    log_ratios = [torch.zeros_like(zero) for _ in policy_steps]
    for k in range(args.admm_iters):
        e = int(rng.integers(len(edges))) if args.edge_order == "random" else k % len(edges)
        for q in edges[e]:
            incident = [f for f, edge in enumerate(edges) if q in edge]
            coupling = sum(sign[f, q] * (lam[f, q] - rho * z[f, q]) for f in incident)  # D_q
            log_ratios[q] = policy_steps[q](coupling, len(incident))

        # ---- the exchange: the only information that crosses between agents in MATRPO --------------------------
        # agent i sends (l_i, lambda_ei) to j and receives (l_j, lambda_ej); both compute the same update of edge e
        i, j = edges[e]
        z_i, z_j, v = edge_update(lam[e, i], lam[e, j], log_ratios[i], log_ratios[j], rho)
        z_change[e, i], z_change[e, j] = z_i - z[e, i], z_j - z[e, j]
        z[e, i], z[e, j], lam[e, i], lam[e, j] = z_i, z_j, v, v.clone()

    def rms(tensors) -> float:
        return math.sqrt(sum((t**2).mean().item() for t in tensors))

    residuals = {"admm/primal_residual": rms(sign[e, q] * log_ratios[q] - z[e, q] for e, q in sign)}  # of w l = z
    residuals["admm/dual_residual"] = rho * rms(z_change.values())
    for i, j in edges:
        residuals[f"admm/consensus_residual_{i}_{j}"] = ((log_ratios[i] - log_ratios[j]) ** 2).mean().item()
    return log_ratios, residuals


def fit_critic(critic, optimizer, obs, returns, args: Args, rng: np.random.Generator) -> float:
    """Fit V to the returns by mean squared error on shuffled minibatches. Returns the mean loss."""
    losses, minibatch_size = [], args.critic_minibatch_size
    for _ in range(args.critic_epochs):
        order = torch.from_numpy(rng.permutation(len(returns)))
        for mb in order[: len(order) // minibatch_size * minibatch_size].split(minibatch_size):  # full minibatches
            loss = ((critic(obs[mb]) - returns[mb]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses))


# Harness: checkpoints, run folder, console, signals, evaluation. Boilerplate a researcher may skip.
ARCHITECTURE_ARGS = ("num_agents", "mode", "hidden_sizes")


def restore(args: Args, parts: dict, rng: np.random.Generator) -> tuple[int, int]:
    """Load --resume (all parts, random generators) or --eval-checkpoint (the parts given); returns the step counts."""
    path = args.resume or args.eval_checkpoint
    if path is None:
        return 0, 0
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        saved_args, made_by = checkpoint["args"], checkpoint["script"]
    except Exception as e:
        fail(f"cannot read checkpoint {path!r}: {type(e).__name__}: {e}")
    if made_by != os.path.basename(__file__):
        fail(f"checkpoint {path!r} was made by another script ({made_by}); use that script")
    for name in ARCHITECTURE_ARGS:
        if saved_args[name] != getattr(args, name):
            fail(f"checkpoint {path!r} was made with {name}={saved_args[name]!r}, not {getattr(args, name)!r}")
    for name, part in parts.items():
        for target, state in zip(part, checkpoint[name]) if isinstance(part, list) else [(part, checkpoint[name])]:
            target.load_state_dict(state)
    if args.resume:
        rng.bit_generator.state = checkpoint["rng"]
        torch.set_rng_state(checkpoint["torch_rng"])
        print(f"resumed from {path} at global_step={checkpoint['global_step']}")
    return checkpoint["global_step"], checkpoint["iteration"]


def save_checkpoint(path: str, parts: dict, global_step: int, iteration: int, rng: np.random.Generator, args: Args):
    """Write all --resume needs (parts, step counts, random generators, args) atomically: never half a checkpoint."""
    checkpoint = {name: [p.state_dict() for p in part] if isinstance(part, list) else part.state_dict()
                  for name, part in parts.items()}  # fmt: skip
    checkpoint |= dict(global_step=global_step, iteration=iteration, rng=rng.bit_generator.state,
                       torch_rng=torch.get_rng_state(), args=vars(args), script=os.path.basename(__file__))  # fmt: skip
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


def start_run(args: Args, label: str, global_step: int, **notes) -> tuple[str, str, Callable]:
    """Make the run folder (the checkpoint's on --resume) with args.json; return it, the checkpoint path and log()."""
    if args.track:
        import wandb

        # without a terminal wandb cannot ask for its API key: check the login before making the folder
        online = os.environ.get("WANDB_MODE") not in ("offline", "disabled")
        if online and not sys.stdin.isatty() and not wandb.login(prompt=False, verify=False):
            fail("--track needs a W&B login: run `wandb login` once, or log offline with WANDB_MODE=offline")
    unsafe = r"[^\w.=+-]"  # characters that become _ in file names, so that paths paste into a shell
    run_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else None
    run_dir = run_dir or os.path.join("runs", re.sub(unsafe, "_", f"{label}__{int(time.time())}"))
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump({**vars(args), "command": " ".join(sys.argv), **notes}, f, indent=2)
        if args.resume and os.path.exists(path):  # keep the lines up to the checkpoint's step
            lines = open(path).read().splitlines()
            for number in [n for n, line in enumerate(lines, 1) if not line.endswith("}")]:
                print(f"warning: dropped line {number} of {path}, cut by a crash", file=sys.stderr)
            kept = [line for line in lines if line.endswith("}") and json.loads(line)["global_step"] <= global_step]
            open(path, "w").writelines(line + "\n" for line in kept)
        metrics_file = open(path, "a")
    except OSError as e:
        fail(f"cannot write the run folder {run_dir!r} ({e.strerror}); run from a folder you can write to")
    if args.track:
        name = os.path.basename(run_dir)
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=name, id=name,
                   resume="allow", dir=run_dir, save_code=True)  # fmt: skip

    def log(metrics: dict):
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()
        if args.track:
            wandb.log(metrics, step=metrics["global_step"])

    return run_dir, os.path.join(run_dir, re.sub(unsafe, "_", args.exp_name) + ".pt"), log


def with_video(make: Callable, run_dir: str) -> Callable:
    """The env of make() filming its first episode to run_dir/videos."""
    video_dir = os.path.join(run_dir, "videos")
    return lambda: gym.wrappers.RecordVideo(make(), video_dir, episode_trigger=lambda e: e == 0, disable_logger=True)


def progress_line(step: int, total: int, steps_per_second: float, episodes: str) -> str:
    """The console line of an iteration: step / total, percent, env-steps/s, ETA and the latest episodes' return."""
    eta = int((total - step) / max(steps_per_second, 1e-9))
    return (f"step {step:,}/{total:,} ({100 * step / total:.1f}%) | {steps_per_second:,.0f} steps/s | "
            f"ETA {eta // 3600}:{eta % 3600 // 60:02}:{eta % 60:02} | {episodes}")  # fmt: skip


def raise_interrupt(signum: int, frame):
    """The handler of Ctrl-C and SIGTERM: KeyboardInterrupt(signal number), which ends training through stop()."""
    raise KeyboardInterrupt(signum)


def stop(reason: BaseException, global_step: int, checkpoint_path: str):
    """End training on Ctrl-C or SIGTERM (exit 128 + signal) or a NaN/inf (exit 1), saying how to resume."""
    saved = "nothing saved (--save-model saves checkpoints)"
    if os.path.exists(checkpoint_path):  # --save-model rewrites it after every finite update
        argv = [a for a, previous in zip(sys.argv, ["", *sys.argv]) if "--resume" not in (a.split("=")[0], previous)]
        resume = shlex.join(["python", *argv, "--resume", checkpoint_path])  # this command, resuming from it
        saved_step = torch.load(checkpoint_path, weights_only=False)["global_step"]
        saved = f"{checkpoint_path} holds global_step={saved_step}; resume with: {resume}"
    if isinstance(reason, FloatingPointError):
        print(f"error: {reason} at global_step={global_step}; stopping, {saved}", file=sys.stderr)
        sys.exit(1)
    print(f"interrupted at global_step={global_step}: {saved}", flush=True)
    sys.exit(128 + reason.args[0])


def joint_action(policies, obs_keys, executors, obs: dict, deterministic: bool) -> torch.Tensor:
    """The executed joint action (batch, agents): agent k plays head executors[k] = (policy, head) of that policy."""
    dists = [policy.distribution(torch.as_tensor(obs[key])) for policy, key in zip(policies, obs_keys)]
    chosen = [dist.base_dist.probs.argmax(-1) if deterministic else dist.sample() for dist in dists]  # for its heads
    return torch.stack([chosen[p][..., h] for p, h in executors], -1)


def env_seeds(seed: int, num_envs: int, purpose: int, step: int = 0) -> list[int]:
    """One seed per env from its own SeedSequence stream (run seed, purpose, step, env index): neighbouring run seeds
    share no env. purpose 0: the training envs, started at `step` (a resume starts fresh episodes); 1: evaluation."""
    sequence = np.random.SeedSequence(seed, spawn_key=(purpose, step))
    return [int(child.generate_state(1)[0]) for child in sequence.spawn(num_envs)]


def evaluate_team(policies, obs_keys, executors, envs: gym.vector.VectorEnv, seeds: list[int]) -> np.ndarray:
    """Team return of one episode per env with deterministic actions (each head's argmax), all envs in parallel."""
    obs, _ = envs.reset(seed=seeds)
    returns, finished = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=bool)
    while not finished.all():
        with torch.no_grad():
            action = joint_action(policies, obs_keys, executors, obs, True)
        obs, rewards, terminated, truncated, _ = envs.step(tuple(action.T.numpy()))
        returns += np.where(finished, 0.0, rewards)
        finished |= terminated | truncated
    return returns


def check_finite(metrics: dict, networks: dict):
    """Raise FloatingPointError naming the first NaN/inf metric or network parameter."""
    bad = [f"{name} is {value}" for name, value in metrics.items() if not math.isfinite(value)]
    bad += [f"{name} parameter {param_name} is nan or inf" for name, network in networks.items()
            for param_name, param in network.named_parameters() if not torch.isfinite(param).all()]  # fmt: skip
    if bad:
        raise FloatingPointError(bad[0])


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.advantage_norm is None:  # the authors' code: pooled for MATRPO, each agent its own for independent TRPO
        args.advantage_norm = "local" if args.mode == "independent" else "pooled"
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // max(args.batch_size, 1)
    validate_args(args)

    # seeding
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    torch.distributions.Distribution.set_default_validate_args(False)  # checks cost more than the tiny networks
    rng = np.random.default_rng(args.seed)  # edge activations and minibatch shuffles

    # env setup
    env_thunk = make_env(args.num_agents, args.max_cycles)
    envs = gym.vector.SyncVectorEnv([env_thunk] * args.num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    agents = envs.get_attr("agents")[0]
    n, num_actions = len(agents), envs.single_action_space[0].n

    # Who learns what: each policy's observation, the agents it models (its heads) and, for each agent, the (policy,
    # head) that acts for it. admm: agent i models the joint action from o^i with its private reward; independent:
    # agent i models only its own action; centralized: one policy on the global state (all observations), team reward.
    obs_keys, modelled_agents, executors = {
        "admm": (list(agents), [list(range(n))] * n, [(i, i) for i in range(n)]),
        "independent": (list(agents), [[i] for i in range(n)], [(i, 0) for i in range(n)]),
        "centralized": (["state"], [list(range(n))], [(0, k) for k in range(n)]),
    }[args.mode]
    obs_sizes = [envs.single_observation_space[key].shape[0] for key in obs_keys]
    policies = [JointPolicy(size, len(heads), num_actions, args.hidden_sizes)
                for size, heads in zip(obs_sizes, modelled_agents)]  # fmt: skip
    critics = [ValueNetwork(size, args.hidden_sizes) for size in obs_sizes]
    critic_optimizers = [torch.optim.Adam(c.parameters(), lr=args.critic_learning_rate) for c in critics]
    networks = {f"agent{p}": pi for p, pi in enumerate(policies)} | {f"critic{p}": c for p, c in enumerate(critics)}

    # ----- boilerplate a researcher may skip: resume, run folder, logging, evaluation -----
    parts = dict(actors=policies, critics=critics, critic_optimizers=critic_optimizers)  # what a checkpoint holds
    global_step, start_iteration = restore(args, parts if args.resume else dict(actors=policies), rng)
    label = f"spread_private_{args.num_agents}__{args.exp_name}__{args.mode}__{args.seed}"
    run_dir, checkpoint_path, log = start_run(args, label, global_step)
    total = args.num_iterations * args.batch_size
    print(f"run folder {run_dir}: {total:,} steps, on the CPU with {torch.get_num_threads()} torch thread(s)")

    def evaluate_and_log(video: bool = False):
        """Deterministic evaluation at global_step, one env per episode; with video, env 0 films its episode."""
        filmed = with_video(make_env(args.num_agents, args.max_cycles, "rgb_array"), run_dir)
        eval_envs = gym.vector.SyncVectorEnv([filmed if video else env_thunk] + [env_thunk] * (args.eval_episodes - 1))
        seeds = env_seeds(args.seed, args.eval_episodes, purpose=1)
        returns = evaluate_team(policies, obs_keys, executors, eval_envs, seeds)
        eval_envs.close()  # (writes the video)
        print(f"eval/episodic_return={returns.mean():.2f} +- {returns.std():.2f} over {len(returns)} episodes")
        log({"global_step": global_step, "eval/episodic_returns": returns.tolist(),  # one return per episode
             "eval/episodic_return": returns.mean(), "eval/episodic_return_std": returns.std()})  # fmt: skip

    if args.eval_checkpoint:
        evaluate_and_log(args.capture_video)
        sys.exit(0)
    signal.signal(signal.SIGINT, raise_interrupt)  # Ctrl-C and SIGTERM: stop() says what was saved, how to resume
    signal.signal(signal.SIGTERM, raise_interrupt)
    if args.save_model:  # rewritten after every finite update: what --resume continues from after a stop
        save_checkpoint(checkpoint_path, parts, global_step, start_iteration, rng, args)
    # ----- end of boilerplate -----

    # rollout storage: per policy its observations, rewards and values; the joint actions are known to every agent
    T, E = args.num_steps, args.num_envs
    obs = [torch.zeros((T, E, size)) for size in obs_sizes]
    actions = torch.zeros((T, E, n), dtype=torch.long)
    rewards, values, next_values = (torch.zeros((T, E, len(obs_keys))) for _ in range(3))
    terminations, dones = torch.zeros((T, E)), torch.zeros((T, E))

    def values_of(observation: dict) -> torch.Tensor:  # each policy's critic on its own part: (..., policies)
        return torch.stack([c(torch.as_tensor(observation[k])) for c, k in zip(critics, obs_keys)], -1)

    # start the game
    next_obs, _ = envs.reset(seed=env_seeds(args.seed, E, purpose=0, step=global_step))
    episode_returns, episode_lengths = np.zeros((E, n)), np.zeros(E, dtype=int)
    start_time, start_step, episodes = time.time(), global_step, "no episode has ended yet"
    try:
        for iteration in range(start_iteration + 1, args.num_iterations + 1):
            # rollout
            finished_returns, finished_lengths = [], []
            with torch.no_grad():
                next_value = values_of(next_obs)
                for step in range(T):
                    global_step += E
                    for p, key in enumerate(obs_keys):
                        obs[p][step] = torch.as_tensor(next_obs[key])
                    values[step] = next_value
                    actions[step] = joint_action(policies, obs_keys, executors, next_obs, False)

                    next_obs, _, terminated, truncated, infos = envs.step(tuple(actions[step].T.numpy()))
                    done = terminated | truncated
                    private = torch.as_tensor(step_private_rewards(infos, done), dtype=torch.float)
                    rewards[step] = private.sum(-1, keepdim=True) if args.mode == "centralized" else private
                    terminations[step] = torch.as_tensor(terminated)
                    dones[step] = torch.as_tensor(done)
                    # V(s_{t+1}) of the true next state: where an episode ended, its final state, not the reset one
                    next_values[step] = next_value = values_of(next_obs)
                    for j in np.flatnonzero(done):
                        next_values[step, j] = values_of(infos["final_obs"][j])

                    episode_returns += private.numpy()
                    episode_lengths += 1
                    finished_returns += list(episode_returns[done])
                    finished_lengths += list(episode_lengths[done])
                    episode_returns[done], episode_lengths[done] = 0.0, 0

                # every policy's own GAE on its own reward and critic
                advantages, returns = compute_gae(rewards, values, next_values, terminations[..., None],
                                                  dones[..., None], args.gamma, args.gae_lambda)  # fmt: skip

            # flatten the batch: (steps, envs, ...) -> (samples, ...)
            b_obs = [o.flatten(0, 1) for o in obs]
            b_actions = [actions.flatten(0, 1)[:, heads] for heads in modelled_agents]  # per policy, its heads' actions
            b_advantages = normalize_advantages(advantages.flatten(0, 1), args.advantage_norm)
            b_returns = returns.flatten(0, 1)

            # policy iteration: each agent linearises its policy at theta_old on its own batch, then takes its steps
            update_start = time.time()
            models = [LocalModel(pi, b_obs[p], b_actions[p], b_advantages[:, p], args) for p, pi in enumerate(policies)]
            if args.mode == "admm":
                steps = [partial(policy_step, model, args=args) for model in models]
                _, metrics = admm_consensus(steps, torch.zeros_like(models[0].logp_old), ring_edges(n), args, rng)
            else:  # the baselines: one TRPO step per policy
                metrics = {}
                for model in models:
                    policy_step(model, torch.zeros_like(model.logp_old), 0, args)
            update_seconds = time.time() - update_start

            with torch.no_grad():  # policy statistics at the parameters each agent kept
                for p, model in enumerate(models):
                    dist = model.policy.distribution(model.obs)
                    logratio = model.log_ratios_of(dist).sum(1)  # of the joint action
                    metrics[f"agent{p}/policy_loss"] = -(logratio.exp() * model.advantages).mean().item()
                    metrics[f"agent{p}/entropy"] = dist.entropy().mean().item()
                    metrics[f"agent{p}/approx_kl"] = ((logratio.exp() - 1) - logratio).mean().item()
                    metrics[f"agent{p}/kl"] = kl_divergence(model.dist_old, dist).mean().item()
                    if model.line_search_steps:
                        metrics[f"agent{p}/line_search_steps"] = float(np.mean(model.line_search_steps))
            del models  # frees the autodiff graphs kept for J^T

            # critics: each fits V^i to its own returns
            value_losses, explained = [], []
            for p, (critic, optimizer) in enumerate(zip(critics, critic_optimizers)):
                value_losses.append(fit_critic(critic, optimizer, b_obs[p], b_returns[:, p], args, rng))
                var_returns = b_returns[:, p].var().item()
                if var_returns > 0:  # the explained variance of the rollout's values
                    explained.append(1 - (b_returns[:, p] - values[..., p].reshape(-1)).var().item() / var_returns)

            # logging
            sps = int((global_step - start_step) / (time.time() - start_time))
            metrics |= {"global_step": global_step, "charts/SPS": sps}
            metrics |= {"charts/learning_rate": args.critic_learning_rate, "charts/update_seconds": update_seconds}
            metrics["losses/value_loss"] = float(np.mean(value_losses))
            if explained:
                metrics["losses/explained_variance"] = float(np.mean(explained))
            if finished_returns:
                private_returns = np.mean(finished_returns, 0)
                metrics["charts/episodic_return"] = float(np.sum(private_returns))
                metrics["charts/episodic_length"] = float(np.mean(finished_lengths))
                metrics |= {f"agent{i}/episodic_return": float(r) for i, r in enumerate(private_returns)}
                ended = f"{len(finished_returns)} episodes ended by step {global_step:,}"
                episodes = f"episodic_return={metrics['charts/episodic_return']:.2f} ({ended})"
            check_finite(metrics, networks)
            log(metrics)
            print(progress_line(global_step, total, sps, episodes))
            # evaluate each time global_step passes a multiple of eval_interval (at the end, --save-model does)
            saved_and_evaluated_below = args.save_model and iteration == args.num_iterations
            if args.eval_interval and global_step % args.eval_interval < E * T and not saved_and_evaluated_below:
                evaluate_and_log()
            if args.save_model:
                save_checkpoint(checkpoint_path, parts, global_step, iteration, rng, args)
    except (KeyboardInterrupt, FloatingPointError) as reason:
        stop(reason, global_step, checkpoint_path)
    envs.close()

    if args.save_model:
        print(f"model saved to {checkpoint_path}")
        evaluate_and_log(args.capture_video)
    if args.track:
        import wandb

        wandb.finish()
