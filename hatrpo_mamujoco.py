# HATRPO (Kuba et al., ICLR 2022, https://arxiv.org/abs/2109.11251) on MaMuJoCo; docs: docs/mamujoco.md
import contextlib
import io
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

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn
from torch.autograd import forward_ad
from torch.distributions import Categorical, Independent, Normal, kl_divergence

with contextlib.redirect_stderr(io.StringIO()):  # gymnasium_robotics prints a notice about its Adroit envs on import
    from gymnasium_robotics import mamujoco_v1

# mamujoco_v1's scenarios and partitions, ManySegment robots taking any "NxK" (N agents of K segments); we leave out
# CoupledHalfCheetah-1p1, which mamujoco_v1 1.4.2 lists but fails to build
PARTITIONS = {
    "Ant": ("2x4", "2x4d", "4x2"), "HalfCheetah": ("2x3", "6x1"), "Hopper": ("3x1",), "Humanoid": ("9|8",),
    "HumanoidStandup": ("9|8",), "Pusher": ("3p",), "Reacher": ("2x1",), "Swimmer": ("2x1",), "Walker2d": ("2x3",),
    "ManySegmentSwimmer": ("NxK",), "ManySegmentAnt": ("NxK",),
}  # fmt: skip
# Partitions the papers used that mamujoco_v1 lacks: each agent's joints (mamujoco_v1's labels), agents split by "|"
HUMANOID_17X1 = " | ".join(  # one joint per agent
    "left_shoulder1 left_shoulder2 abdomen_x abdomen_y abdomen_z right_shoulder1 right_shoulder2 right_elbow "
    "left_elbow left_hip_x left_hip_y left_hip_z right_hip_x right_hip_y right_hip_z right_knee left_knee".split()
)
FACTORIZATIONS = {
    "Ant-8x1": "hip1 | ankle1 | hip2 | ankle2 | hip3 | ankle3 | hip4 | ankle4",
    "HalfCheetah-3x2": "bfoot bshin | bthigh ffoot | fshin fthigh",
    "Walker2d-3x2": "foot_joint leg_joint | thigh_joint foot_left_joint | leg_left_joint thigh_left_joint",
    "Walker2d-6x1": "foot_joint | leg_joint | thigh_joint | foot_left_joint | leg_left_joint | thigh_left_joint",
    "Humanoid-17x1": HUMANOID_17X1,
    "HumanoidStandup-17x1": HUMANOID_17X1,
}
ENV_IDS = (*(f"{scenario}-{p}" for scenario, partitions in PARTITIONS.items() for p in partitions), *FACTORIZATIONS)


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
    resume: str | None = None  # path of a checkpoint to continue training from (same env and architecture)
    eval_checkpoint: str | None = None  # path of a checkpoint to evaluate with deterministic actions; no training
    eval_episodes: int = 10  # episodes per evaluation (run in parallel, one env each)
    eval_interval: int = 250_000  # env steps between deterministic evaluations (eval/episodic_return); 0: none

    # Environment
    env_id: str = "HalfCheetah-2x3"
    """Scenario-Partition: Ant-2x4, Ant-2x4d, Ant-4x2, Ant-8x1, HalfCheetah-2x3, HalfCheetah-3x2, HalfCheetah-6x1,
    Hopper-3x1, Humanoid-9|8, Humanoid-17x1, HumanoidStandup-9|8, HumanoidStandup-17x1, Pusher-3p, Reacher-2x1,
    Swimmer-2x1, Walker2d-2x3, Walker2d-3x2, Walker2d-6x1, ManySegmentSwimmer-NxK, ManySegmentAnt-NxK (N agents of K
    segments). Ids in the TUNED table run with HARL's tuned values, not the defaults shown here (Ant-2x4: Ant-4x2's);
    a flag given wins. The run's first line lists the tuned values taken and the flags that overrode one"""
    agent_obsk: int | None = None  # None: each agent sees the full state and its one-hot id; K: joints within K hops
    async_envs: bool = False  # step the envs in subprocesses (gymnasium.vector.AsyncVectorEnv), not in this process
    total_timesteps: int = 10_000_000  # env steps in all (one per env per vector step, all agents acting at once)
    num_envs: int = 20  # the number of parallel environments
    num_steps: int = 200  # the number of steps per environment per rollout

    # Algorithm
    critic_learning_rate: float = 5e-4  # Adam learning rate of the critic
    anneal_lr: bool = False  # if toggled, decay every Adam learning rate linearly to 0
    gamma: float = 0.99  # the discount factor gamma
    gae_lambda: float = 0.95  # the lambda of generalised advantage estimation
    hidden_sizes: tuple[int, ...] = (128, 128, 128)  # hidden layer sizes of the actors and the critic
    sequential: bool = True  # weight each agent's advantage by the factor M of the agents updated before it
    fixed_order: bool = False  # update the agents in index order, not in a fresh random order every iteration
    kl_threshold: float = 0.01  # delta: the bound on each agent's mean KL(pi_old || pi_new) per update
    ls_steps: int = 10  # the number of step fractions the backtracking line search tries
    backtrack_coef: float = 0.8  # the line search tries the fractions backtrack_coef**j, j = 0 .. ls_steps - 1
    accept_ratio: float = 0.5  # accept a fraction whose improvement is above accept_ratio x the linear prediction
    cg_iters: int = 10  # conjugate gradient iterations solving (F + damping I) x = g
    cg_damping: float = 0.1  # the damping added to the Fisher matrix F
    fvp_subsample: int = 1  # Fisher-vector products on every K-th step of each env (HARL: 1, every step)
    num_minibatches: int = 1  # minibatches per epoch
    clip_coef: float = 0.2  # the clipping coefficient of the value loss
    critic_epochs: int = 5  # epochs of the critic update
    huber_delta: float = 10.0  # delta of the Huber value loss
    max_grad_norm: float = 10.0  # the maximum norm for gradient clipping

    # Computed at run time (not command-line options)
    batch_size: tyro.conf.Suppress[int] = 0  # samples per agent per iteration (num_envs * num_steps)
    num_iterations: tyro.conf.Suppress[int] = 0  # the number of iterations (total_timesteps // batch_size)


# HARL's tuned values per task where they differ from the defaults above (its tuned_configs/mamujoco, gym v2 models)
TUNED = {
    "Ant-4x2": dict(kl_threshold=0.005),
    "HalfCheetah-2x3": dict(kl_threshold=0.01),
    "Hopper-3x1": dict(kl_threshold=0.001),
    "Walker2d-2x3": dict(kl_threshold=0.01),
    "Walker2d-6x1": dict(kl_threshold=0.005),
}  # fmt: skip
TUNED["Ant-2x4"] = TUNED["Ant-4x2"]  # HARL did not tune Ant-2x4: the nearest tuned task


def fail(message: str):
    """A user's mistake: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def apply_tuned_values(args: Args, argv: list[str], tuned: dict) -> dict:
    """Set the fields of a TUNED entry that argv does not give (a flag given wins); print them. Returns those set."""
    given = {flag.split("=")[0][2:].removeprefix("no-").replace("-", "_") for flag in argv if flag.startswith("--")}
    applied = {name: value for name, value in tuned.items() if name not in given}
    vars(args).update(applied)
    taken = " ".join(f"{name}={value}" for name, value in applied.items()) or "none"
    overridden = " ".join(f"{name}={getattr(args, name)}" for name in tuned if name in given) or "none"
    print(f"{args.env_id}: from HARL's tuned values (TUNED) {taken}; overridden by a flag: {overridden}")
    return applied


ARG_RANGES = (  # (fields, test, what the error message says), checked by validate_args
    ("num_envs num_steps total_timesteps num_minibatches critic_epochs eval_episodes torch_threads "
     "critic_learning_rate max_grad_norm huber_delta kl_threshold ls_steps cg_iters fvp_subsample", lambda x: x > 0,
     "positive"),
    ("hidden_sizes", lambda x: len(x) > 0 and min(x) > 0, "one or more positive sizes"),
    ("gamma gae_lambda clip_coef backtrack_coef", lambda x: 0 < x <= 1, "in (0, 1]"),
    ("eval_interval accept_ratio cg_damping", lambda x: x >= 0, ">= 0"),
)  # fmt: skip


def validate_args(args: Args):
    scenario, _, partition = args.env_id.rpartition("-")
    many_segments = PARTITIONS.get(scenario) == ("NxK",)  # the ManySegment robots: any N agents of K segments
    if not (re.fullmatch(r"[1-9]\d*x[1-9]\d*", partition) if many_segments else args.env_id in ENV_IDS):
        fail(f"unknown --env-id {args.env_id!r} (Scenario-Partition); valid ids: {', '.join(ENV_IDS)}")
    if args.agent_obsk is not None and args.agent_obsk < 0:
        fail(f"--agent-obsk must be >= 0 (joints within K hops) or None (the full state), got {args.agent_obsk}")
    for names, in_range, expected in ARG_RANGES:
        for name in names.split():
            if not in_range(getattr(args, name)):
                fail(f"--{name.replace('_', '-')} must be {expected}, got {getattr(args, name)}")
    if args.batch_size % args.num_minibatches != 0:
        fail(f"batch of {args.batch_size} steps is not divisible by --num-minibatches {args.num_minibatches}")
    if args.batch_size < 2:
        fail(f"--num-envs x --num-steps must be 2 or more to normalise the advantages, got {args.batch_size}")
    if args.total_timesteps < args.batch_size:
        fail(f"--total-timesteps {args.total_timesteps} is smaller than one batch of {args.batch_size} steps")
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")


# Environment: one mamujoco_v1 parallel env as a gymnasium.Env, so gymnasium.vector can batch it
def agent_factorization(env_id: str) -> dict | None:
    """mamujoco_v1's agent_factorization (its own joints, edges and globals) for an id of FACTORIZATIONS, else None."""
    if env_id not in FACTORIZATIONS:
        return None
    scenario = env_id.rpartition("-")[0]
    parts, edges, global_nodes = mamujoco_v1.get_parts_and_edges(scenario, PARTITIONS[scenario][0])
    joints = {node.label: node for part in parts for node in part}
    agents = [tuple(joints[label] for label in agent.split()) for agent in FACTORIZATIONS[env_id].split("|")]
    return {"partition": agents, "edges": edges, "globals": global_nodes}


def standardize(x: np.ndarray) -> np.ndarray:
    """Each input (a row of x) minus its mean, over its standard deviation, across its features (HARL's MaMuJoCo)."""
    return ((x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-8)).astype(np.float32)


class MaMuJoCoTeamEnv(gym.Env):
    """Dict of the state and each agent's observation (each standardised), Tuple of the agents' torques, the robot's
    reward. agent_obsk=None (papers, HARL): each agent sees the full state and its one-hot id, and the env steps the
    MuJoCo v5 robot directly, skipping local observations; agent_obsk=K: mamujoco_v1's, of joints within K hops."""

    def __init__(self, env_id: str, agent_obsk: int | None, render_mode: str | None = None):
        # MuJoCo warns "settotalmass is deprecated" for every robot model built from mamujoco_v1's XML: drop just that
        mujoco.set_mju_user_warning(
            lambda text: None if "settotalmass" in text else print(f"WARNING: {text}", file=sys.stderr)
        )
        if render_mode is not None:
            os.environ.setdefault("MUJOCO_GL", "egl")  # render without a display, unless MUJOCO_GL says otherwise
        scenario, _, partition = env_id.rpartition("-")
        obsk = 1 if agent_obsk is None else agent_obsk  # agent_obsk=None reads no local observations: any K will do
        factorization = agent_factorization(env_id)
        self.ma_env = mamujoco_v1.parallel_env(
            scenario, partition, agent_obsk=obsk, agent_factorization=factorization, render_mode=render_mode
        )
        self.robot = self.ma_env.single_agent_env  # MuJoCo v5 env with its 1000-step time limit
        self.agent_obsk, self.agents, self.render_mode = agent_obsk, self.ma_env.possible_agents, render_mode
        self.metadata = {"render_modes": ["rgb_array"], "render_fps": self.robot.metadata["render_fps"]}
        self.render, self.close = self.ma_env.render, self.ma_env.close  # gym.Env's render() and close(), delegated
        # each agent's joints: indices of its actions in the robot's action vector (mamujoco_v1's partition)
        self.joints = [np.array([node.act_ids for node in part]) for part in self.ma_env.agent_action_partitions]
        state_size = self.robot.observation_space.shape[0]
        sizes = {"state": state_size}
        for a in self.agents:  # the full state and its one-hot id, or mamujoco_v1's local observation
            local_size = self.ma_env.observation_space(a).shape[0]
            sizes[a] = state_size + len(self.agents) if agent_obsk is None else local_size
        boxes = {key: gym.spaces.Box(-np.inf, np.inf, (size,), np.float32) for key, size in sizes.items()}
        self.observation_space = gym.spaces.Dict(boxes)
        self.action_space = gym.spaces.Tuple([self.ma_env.action_space(a) for a in self.agents])

    def robot_action(self, action) -> np.ndarray:
        """The agents' actions placed on the robot's joints."""
        robot_action = np.zeros(self.robot.action_space.shape)
        robot_action[np.concatenate(self.joints)] = np.concatenate(action)
        return robot_action

    def _observe(self, state: np.ndarray, agent_obs: dict | None = None) -> dict:
        if agent_obs is None:  # each agent observes the full state and its one-hot id: one row each, one call
            rows = standardize(np.hstack([np.tile(state, (len(self.agents), 1)), np.eye(len(self.agents))]))
            return {"state": standardize(state), **dict(zip(self.agents, rows))}
        return {"state": standardize(state), **{a: standardize(agent_obs[a]) for a in self.agents}}

    def reset(self, seed=None, options=None):
        if self.agent_obsk is None:
            state, _ = self.robot.reset(seed=seed)
            return self._observe(state), {}
        local_obs, _ = self.ma_env.reset(seed=seed)
        return self._observe(self.ma_env.state(), local_obs), {}

    def step(self, action):
        if self.agent_obsk is None:
            state, reward, terminated, truncated, _ = self.robot.step(self.robot_action(action))
            return self._observe(state), float(reward), terminated, truncated, {}
        local_obs, rewards, terminations, truncations, _ = self.ma_env.step(dict(zip(self.agents, action)))
        state, first = self.ma_env.state(), self.agents[0]  # every agent gets the same reward and episode end
        return self._observe(state, local_obs), rewards[first], terminations[first], truncations[first], {}


def make_env(env_id: str, agent_obsk: int | None, render_mode: str | None = None):
    return lambda: MaMuJoCoTeamEnv(env_id, agent_obsk, render_mode)  # gymnasium.vector builds each env from a thunk


def env_action(action: torch.Tensor, space: gym.spaces.Box) -> np.ndarray:
    """The torques sent: a Gaussian sample a in [-1, 1] mapped linearly onto [low, high] as HARL does, then clipped
    to the bounds (bounds of +-1, as HalfCheetah's, Ant's, Walker2d's: a itself). The stored action is a."""
    center, half_width = (space.high + space.low) / 2, (space.high - space.low) / 2
    return np.clip(center + half_width * action.numpy(), space.low, space.high)


# Networks (HARL's architecture: input LayerNorm, then [Linear, ReLU, LayerNorm] per hidden layer)
def layer_init(layer, std=2**0.5, bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(input_size: int, hidden_sizes: tuple[int, ...]) -> nn.Sequential:
    layers, size = [nn.LayerNorm(input_size)], input_size
    for hidden in hidden_sizes:
        layers += [layer_init(nn.Linear(size, hidden)), nn.ReLU(), nn.LayerNorm(hidden)]
        size = hidden
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """pi^i(a^i | o^i): categorical over Discrete actions, or Gaussian with a state-independent std for Box actions."""

    def __init__(self, obs_size: int, action_space: gym.Space, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.trunk = mlp(obs_size, hidden_sizes)
        self.continuous = isinstance(action_space, gym.spaces.Box)
        num_outputs = action_space.shape[0] if self.continuous else action_space.n
        self.head = layer_init(nn.Linear(hidden_sizes[-1], num_outputs), std=0.01)
        if self.continuous:
            # std = 0.5 * sigmoid(log_std) starts near 0.37 and never exceeds 0.5 (HARL)
            self.log_std = nn.Parameter(torch.ones(num_outputs))

    def forward(self, obs: torch.Tensor) -> tuple:
        """The parameters u of pi^i(.|o^i): (logits,) for Discrete actions, (mean, std) for Box actions."""
        out = self.head(self.trunk(obs))
        return (out, 0.5 * torch.sigmoid(self.log_std)) if self.continuous else (out,)

    def distribution_from(self, params: tuple):
        # Independent: log-probs and entropies sum over action dimensions (ratio = product of per-dim ratios)
        return Independent(Normal(*params), 1) if self.continuous else Categorical(logits=params[0])

    def distribution(self, obs: torch.Tensor):
        return self.distribution_from(self(obs))


class Critic(nn.Module):
    """V(s) on the global state, in the units of the value normaliser."""

    def __init__(self, state_size: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.net = nn.Sequential(mlp(state_size, hidden_sizes), layer_init(nn.Linear(hidden_sizes[-1], 1), std=1.0))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state).squeeze(-1)


class ValueNorm(nn.Module):
    """Running mean and variance of the value targets: debiased exponential averages, as HARL's ValueNorm."""

    def __init__(self, beta: float = 0.99999, epsilon: float = 1e-5, var_min: float = 1e-2):
        super().__init__()
        self.beta, self.epsilon, self.var_min = beta, epsilon, var_min
        self.register_buffer("running_mean", torch.zeros(()))
        self.register_buffer("running_mean_sq", torch.zeros(()))
        self.register_buffer("debiasing_term", torch.zeros(()))

    def update(self, targets: torch.Tensor):
        self.running_mean.mul_(self.beta).add_((1 - self.beta) * targets.mean())
        self.running_mean_sq.mul_(self.beta).add_((1 - self.beta) * (targets**2).mean())
        self.debiasing_term.mul_(self.beta).add_(1 - self.beta)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        debias = self.debiasing_term.clamp(min=self.epsilon)
        mean = self.running_mean / debias
        var = (self.running_mean_sq / debias - mean**2).clamp(min=self.var_min)
        return mean, var.sqrt()


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


def minibatches(rng: np.random.Generator, batch_size: int, num_minibatches: int) -> list[torch.Tensor]:
    """A fresh random split of range(batch_size) into num_minibatches index tensors."""
    return [torch.from_numpy(mb) for mb in np.split(rng.permutation(batch_size), num_minibatches)]


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


def hatrpo_update(actor, obs, actions, logp_old, advantages, factor, args: Args) -> tuple[dict, torch.Tensor]:
    """Update of agent i_m, with r = pi_new(a|o) / pi_old(a|o) and M the factor of the agents updated before it.
    HATRPO: maximise L = E[r M A] s.t. mean KL(pi_old || pi_new) < delta by a line-searched natural-gradient step.
    Returns the metrics and log pi_new(a|o), for the factor of the next agent."""

    def surrogate(dist) -> torch.Tensor:  # L = E[r M A], with the same ratio in the gradient and the line search
        return (torch.exp(dist.log_prob(actions) - logp_old) * factor * advantages).mean()

    theta_old, dist_old = nn.utils.parameters_to_vector(actor.parameters()).detach(), actor.distribution(obs)
    L_old = surrogate(dist_old)  # L at theta_old
    g = nn.utils.parameters_to_vector(torch.autograd.grad(L_old, actor.parameters()))
    fisher_obs = obs.unflatten(0, (-1, args.num_envs))[:: args.fvp_subsample].flatten(0, 1)  # K-th steps of each env
    fvp = fisher_vector_product(actor, fisher_obs, args.cg_damping)
    x = conjugate_gradient(fvp, g, args.cg_iters)  # x = (F + damping I)^{-1} g
    x_F_x = x @ fvp(x)  # the full step s = beta x has the quadratic KL estimate 1/2 s^T (F + damping I) s = delta
    full_step = x * torch.sqrt(2 * args.kl_threshold / x_F_x) if x_F_x > 0 else torch.zeros_like(x)
    predicted = (g @ full_step).item()  # the linear prediction of the full step's improvement
    with torch.no_grad():  # backtracking line search over the fractions backtrack_coef**steps
        for steps in range(args.ls_steps):
            fraction = args.backtrack_coef**steps
            nn.utils.vector_to_parameters(theta_old + fraction * full_step, actor.parameters())
            dist = actor.distribution(obs)
            kl = kl_divergence(dist_old, dist).mean().item()
            improvement = (surrogate(dist) - L_old).item()
            if kl < args.kl_threshold and improvement > 0 and improvement / (fraction * predicted) > args.accept_ratio:
                break
        else:  # no fraction accepted: restore the old parameters (the agent's ratio stays 1)
            nn.utils.vector_to_parameters(theta_old, actor.parameters())
            steps, fraction, dist, kl, improvement = args.ls_steps, 0.0, dist_old, 0.0, 0.0
        logp_new = dist.log_prob(actions)
        logratio = logp_new - logp_old  # approx_kl: http://joschu.net/blog/kl-approx.html
        return dict(policy_loss=-(L_old.item() + improvement), entropy=dist.entropy().mean().item(),
                    approx_kl=((logratio.exp() - 1) - logratio).mean().item(), kl=kl, improvement=improvement,
                    expected_improvement=fraction * predicted, line_search_steps=steps), logp_new  # fmt: skip


def critic_update(critic, optimizer, states, targets, old_values, args: Args, rng: np.random.Generator) -> float:
    """Fit V(s) to the normalised returns with the clipped Huber loss of HARL. Returns the mean loss."""
    total = 0.0
    for _ in range(args.critic_epochs):
        for mb in minibatches(rng, len(targets), args.num_minibatches):
            values = critic(states[mb])
            values_clipped = old_values[mb] + (values - old_values[mb]).clamp(-args.clip_coef, args.clip_coef)
            loss_unclipped = F.huber_loss(values, targets[mb], reduction="none", delta=args.huber_delta)
            loss_clipped = F.huber_loss(values_clipped, targets[mb], reduction="none", delta=args.huber_delta)
            value_loss = torch.max(loss_unclipped, loss_clipped).mean()
            optimizer.zero_grad()
            value_loss.backward()
            nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            optimizer.step()
            total += value_loss.item()
    return total / (args.critic_epochs * args.num_minibatches)


# Harness: checkpoints, run folder, console, signals, evaluation. Boilerplate a researcher may skip.
ARCHITECTURE_ARGS = ("env_id", "agent_obsk", "hidden_sizes")


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


def env_seeds(seed: int, num_envs: int, purpose: int, step: int = 0) -> list[int]:
    """One seed per env from its own SeedSequence stream (run seed, purpose, step, env index): neighbouring run seeds
    share no env. purpose 0: the training envs, started at `step` (a resume starts fresh episodes); 1: evaluation."""
    sequence = np.random.SeedSequence(seed, spawn_key=(purpose, step))
    return [int(child.generate_state(1)[0]) for child in sequence.spawn(num_envs)]


def evaluate(actors, agents: list[str], envs: gym.vector.VectorEnv, seeds: list[int]) -> np.ndarray:
    """Team return of one episode per env with deterministic actions (argmax / Gaussian mean), all envs in parallel."""
    obs, _ = envs.reset(seed=seeds)
    returns, finished = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=bool)
    while not finished.all():
        with torch.no_grad():
            modes = [actor.distribution(torch.as_tensor(obs[agent])).mode for actor, agent in zip(actors, agents)]
        obs, rewards, terminated, truncated, _ = envs.step(tuple(map(env_action, modes, envs.single_action_space)))
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
    tuned_values = apply_tuned_values(args, sys.argv[1:], TUNED.get(args.env_id, {}))
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // max(args.batch_size, 1)
    validate_args(args)

    # seeding
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    torch.distributions.Distribution.set_default_validate_args(False)  # checks cost more than the tiny networks
    rng = np.random.default_rng(args.seed)  # agent orders and minibatch shuffles

    # env setup
    envs = (gym.vector.AsyncVectorEnv if args.async_envs else gym.vector.SyncVectorEnv)(
        [make_env(args.env_id, args.agent_obsk) for _ in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    agents = envs.get_attr("agents")[0]
    num_agents, action_spaces = len(agents), list(envs.single_action_space)
    state_size = envs.single_observation_space["state"].shape[0]

    # agent setup
    obs_sizes = [envs.single_observation_space[a].shape[0] for a in agents]
    actors = [Actor(size, space, args.hidden_sizes) for size, space in zip(obs_sizes, action_spaces)]
    critic = Critic(state_size, args.hidden_sizes)
    value_norm = ValueNorm()
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate, eps=1e-5)

    # ----- boilerplate a researcher may skip: resume, run folder, logging, evaluation -----
    parts = dict(actors=actors, critic=critic, critic_optimizer=critic_optimizer, value_norm=value_norm)
    global_step, start_iteration = restore(args, parts if args.resume else dict(actors=actors), rng)
    label = f"{args.env_id}__{args.exp_name}__{args.seed}"
    run_dir, checkpoint_path, log = start_run(args, label, global_step, from_tuned_table=tuned_values)
    total = args.num_iterations * args.batch_size
    print(f"run folder {run_dir}: {total:,} steps, on the CPU with {torch.get_num_threads()} torch thread(s)")

    def evaluate_and_log(video: bool = False):
        """Deterministic evaluation at global_step, one env per episode; with video, env 0 films its episode."""
        modes = ["rgb_array" if video and i == 0 else None for i in range(args.eval_episodes)]
        thunks = [make_env(args.env_id, args.agent_obsk, mode) for mode in modes]
        eval_envs = gym.vector.SyncVectorEnv([with_video(thunks[0], run_dir) if video else thunks[0], *thunks[1:]])
        returns = evaluate(actors, agents, eval_envs, env_seeds(args.seed, args.eval_episodes, purpose=1))
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

    # rollout storage, one tensor per agent (their sizes may differ); values are in the value normaliser's units
    T, E = args.num_steps, args.num_envs
    obs = [torch.zeros((T, E, size)) for size in obs_sizes]
    actions = [torch.zeros((T, E) + s.shape, dtype=torch.long if s.shape == () else torch.float) for s in action_spaces]
    logprobs = [torch.zeros((T, E)) for _ in agents]
    states = torch.zeros((T, E, state_size))
    rewards, values, next_values, terminations, dones = (torch.zeros((T, E)) for _ in range(5))

    # start the game
    next_obs, _ = envs.reset(seed=env_seeds(args.seed, E, purpose=0, step=global_step))
    episode_returns, episode_lengths = np.zeros(E), np.zeros(E, dtype=int)
    start_time, start_step, episodes = time.time(), global_step, "no episode has ended yet"
    try:
        for iteration in range(start_iteration + 1, args.num_iterations + 1):
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / args.num_iterations
                critic_optimizer.param_groups[0]["lr"] = frac * args.critic_learning_rate

            # rollout
            finished_returns, finished_lengths = [], []
            with torch.no_grad():
                next_state = torch.as_tensor(next_obs["state"])
                next_value = critic(next_state)
                for step in range(T):
                    global_step += E
                    states[step] = next_state
                    values[step] = next_value
                    for i, agent in enumerate(agents):
                        obs[i][step] = torch.as_tensor(next_obs[agent])
                        dist = actors[i].distribution(obs[i][step])
                        actions[i][step] = dist.sample()
                        logprobs[i][step] = dist.log_prob(actions[i][step])
                    env_actions = tuple(env_action(a[step], space) for a, space in zip(actions, action_spaces))
                    next_obs, reward, terminated, truncated, infos = envs.step(env_actions)
                    done = terminated | truncated
                    rewards[step] = torch.as_tensor(reward)
                    terminations[step] = torch.as_tensor(terminated)
                    dones[step] = torch.as_tensor(done)
                    next_state = torch.as_tensor(next_obs["state"])
                    # V(s_{t+1}) of the true next state: where an episode ended, its final state, not the reset one
                    next_values[step] = next_value = critic(next_state)
                    if done.any():
                        final_states = np.stack([infos["final_obs"][j]["state"] for j in np.flatnonzero(done)])
                        next_values[step, torch.as_tensor(done)] = critic(torch.as_tensor(final_states))

                    episode_returns, episode_lengths = episode_returns + reward, episode_lengths + 1
                    finished_returns += list(episode_returns[done])
                    finished_lengths += list(episode_lengths[done])
                    episode_returns[done], episode_lengths[done] = 0.0, 0

                # advantages from the de-normalised values of the centralised critic
                mean, std = value_norm.mean_std()
                values_denormalized = values * std + mean
                advantages, returns = compute_gae(rewards, values_denormalized, next_values * std + mean,
                                                  terminations, dones, args.gamma, args.gae_lambda)  # fmt: skip

            # flatten the batch
            b_obs = [o.flatten(0, 1) for o in obs]
            b_actions = [a.flatten(0, 1) for a in actions]
            b_logprobs = [lp.flatten() for lp in logprobs]
            b_advantages = ((advantages - advantages.mean()) / (advantages.std() + 1e-5)).reshape(-1)

            # sequential update in a fresh random order: agent i_m maximises its surrogate objective times the factor
            # M = prod_{j<m} pi_new^{i_j} / pi_old^{i_j} of the agents updated before it (detached; --no-sequential: 1)
            order = list(range(num_agents)) if args.fixed_order else list(rng.permutation(num_agents))
            factor, stats = torch.ones_like(b_logprobs[0]), {}
            for i in order:
                stats[i], logp_new = hatrpo_update(actors[i], b_obs[i], b_actions[i], b_logprobs[i], b_advantages,
                                                   factor, args)  # fmt: skip
                if args.sequential:
                    factor = factor * torch.exp(logp_new - b_logprobs[i])

            # critic: normalise the targets with statistics that include this batch, then fit V(s)
            b_returns = returns.reshape(-1)
            value_norm.update(b_returns)
            mean, std = value_norm.mean_std()
            b_states, b_targets = states.reshape(-1, state_size), (b_returns - mean) / std
            value_loss = critic_update(critic, critic_optimizer, b_states, b_targets, values.reshape(-1), args, rng)

            # logging
            sps = int((global_step - start_step) / (time.time() - start_time))
            metrics = {"global_step": global_step, "charts/SPS": sps, "losses/value_loss": value_loss,
                       "charts/learning_rate": critic_optimizer.param_groups[0]["lr"]}  # fmt: skip
            var_returns = b_returns.var().item()
            if var_returns > 0:
                residual_var = (b_returns - values_denormalized.reshape(-1)).var().item()
                metrics["losses/explained_variance"] = 1 - residual_var / var_returns
            if finished_returns:
                metrics["charts/episodic_return"] = float(np.mean(finished_returns))
                metrics["charts/episodic_length"] = float(np.mean(finished_lengths))
                ended = f"{len(finished_returns)} episodes ended by step {global_step:,}"
                episodes = f"episodic_return={metrics['charts/episodic_return']:.2f} ({ended})"
            metrics |= {f"agent{i}/{name}": value for i in range(num_agents) for name, value in stats[i].items()}
            check_finite(metrics, {**{f"agent{i}": actor for i, actor in enumerate(actors)}, "critic": critic})
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
