# HATRPO (Kuba et al., ICLR 2022, https://arxiv.org/abs/2109.11251) on cooperative MPE; docs: docs/hatrpo_mpe.md
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

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn
from torch.autograd import forward_ad
from torch.distributions import Categorical, Independent, Normal, kl_divergence

ENV_IDS = ("simple_spread_v3", "simple_reference_v3", "simple_speaker_listener_v4")


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
    eval_interval: int = 100_000  # env steps between deterministic evaluations (eval/episodic_return); 0: none

    # Environment
    env_id: str = "simple_spread_v3"  # mpe2 task: simple_spread_v3, simple_reference_v3 or simple_speaker_listener_v4
    continuous_actions: bool = False  # if toggled, Box(0, 1) actions with a Gaussian policy instead of Discrete actions
    max_cycles: int = 25  # steps per episode (a time-limit truncation)
    total_timesteps: int = 10_000_000  # env steps in all (one per env per vector step, all agents acting at once)
    num_envs: int = 20  # the number of parallel environments
    num_steps: int = 200  # the number of steps per environment per rollout

    # Algorithm
    critic_learning_rate: float = 5e-4  # Adam learning rate of the critic
    anneal_lr: bool = False  # if toggled, decay every Adam learning rate linearly to 0
    gamma: float = 0.99  # the discount factor gamma
    gae_lambda: float = 0.95  # the lambda of generalised advantage estimation
    hidden_sizes: tuple[int, ...] = (128, 128)  # hidden layer sizes of the actors and the critic
    sequential: bool = True  # weight each agent's advantage by the factor M of the agents updated before it
    fixed_order: bool = False  # update the agents in index order, not in a fresh random order every iteration
    kl_threshold: float = 0.005  # delta: bound on each agent's mean KL(pi_old || pi_new) per update (HARL's MPE value)
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


def fail(message: str):
    """A user's mistake: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


ARG_RANGES = (  # (fields, test, what the error message says), checked by validate_args
    ("num_envs num_steps total_timesteps num_minibatches critic_epochs max_cycles eval_episodes torch_threads "
     "critic_learning_rate max_grad_norm huber_delta kl_threshold ls_steps cg_iters fvp_subsample", lambda x: x > 0,
     "positive"),
    ("hidden_sizes", lambda x: len(x) > 0 and min(x) > 0, "one or more positive sizes"),
    ("gamma gae_lambda clip_coef backtrack_coef", lambda x: 0 < x <= 1, "in (0, 1]"),
    ("eval_interval accept_ratio cg_damping", lambda x: x >= 0, ">= 0"),
)  # fmt: skip


def validate_args(args: Args):
    if args.env_id not in ENV_IDS:
        fail(f"unknown --env-id {args.env_id!r}; valid ids: {', '.join(ENV_IDS)}")
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


# Environment: one mpe2 parallel env as a gymnasium.Env, so gymnasium.vector can batch it
class MPETeamEnv(gym.Env):
    """Dict of the state and each agent's observation, Tuple of the agents' actions, the sum of their rewards. Drives
    mpe2's raw_env as pettingzoo's parallel_env does, minus wrappers that observe each agent twice (tests compare)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, env_id: str, continuous_actions: bool, max_cycles: int, render_mode: str | None = None):
        task = importlib.import_module(f"mpe2.{env_id}")
        self.mpe_env = task.raw_env(
            max_cycles=max_cycles, continuous_actions=continuous_actions, render_mode=render_mode
        )
        self.agents, self.render_mode = self.mpe_env.possible_agents, render_mode
        self.render, self.close = self.mpe_env.render, self.mpe_env.close  # gym.Env's hooks, served by mpe2's env
        self.observation_space = gym.spaces.Dict(
            {"state": self.mpe_env.state_space, **{a: self.mpe_env.observation_space(a) for a in self.agents}}
        )
        self.action_space = gym.spaces.Tuple([self.mpe_env.action_space(a) for a in self.agents])

    def _observe(self) -> dict:
        obs = {a: self.mpe_env.observe(a) for a in self.agents}
        return {"state": np.concatenate([obs[a] for a in self.agents]), **obs}  # = env.state(), not computed again

    def reset(self, seed=None, options=None):
        self.mpe_env.reset(seed=seed)
        return self._observe(), {}

    def step(self, action):
        for agent_action in action:  # agents act in turn; the world steps after the last one
            self.mpe_env.step(agent_action)
        team_reward = sum(self.mpe_env.rewards[a] for a in self.agents)
        terminated = any(self.mpe_env.terminations.values())
        truncated = any(self.mpe_env.truncations.values()) and not terminated
        return self._observe(), float(team_reward), terminated, truncated, {}


def make_env(env_id: str, continuous_actions: bool, max_cycles: int, render_mode: str | None = None) -> Callable:
    return lambda: MPETeamEnv(env_id, continuous_actions, max_cycles, render_mode)


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
ARCHITECTURE_ARGS = ("env_id", "continuous_actions", "hidden_sizes")


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


def env_action(action: torch.Tensor, space: gym.Space) -> np.ndarray:
    """The action sent to the env: Gaussian samples are stored unclipped and clipped to the bounds only here."""
    action = action.numpy()
    return np.clip(action, space.low, space.high) if isinstance(space, gym.spaces.Box) else action


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
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, args.continuous_actions, args.max_cycles) for _ in range(args.num_envs)],
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
    run_dir, checkpoint_path, log = start_run(args, f"{args.env_id}__{args.exp_name}__{args.seed}", global_step)
    total = args.num_iterations * args.batch_size
    print(f"run folder {run_dir}: {total:,} steps, on the CPU with {torch.get_num_threads()} torch thread(s)")

    def evaluate_and_log(video: bool = False):
        """Deterministic evaluation at global_step, one env per episode; with video, env 0 films its episode."""
        modes = ["rgb_array" if video and i == 0 else None for i in range(args.eval_episodes)]
        thunks = [make_env(args.env_id, args.continuous_actions, args.max_cycles, mode) for mode in modes]
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
                    next_value = critic(next_state)
                    # V(s_{t+1}) of the true next state: where an episode ended, its final state, not the reset one
                    next_values[step] = next_value
                    if done.any():
                        ended = np.flatnonzero(done)
                        final_states = np.stack([infos["final_obs"][j]["state"] for j in ended])
                        next_values[step, ended] = critic(torch.as_tensor(final_states))

                    episode_returns += reward
                    episode_lengths += 1
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
