"""The two-agent game r(a1, a2) = a1 * a2 of README "What the tests prove": expected return per iteration of the
sequential HATRPO update (with the factor M) against the simultaneous one (M = 1), both made by hatrpo_mpe.py's own
update function (`hatrpo_update`), in the sequential order of its main loop; this file imports it for the figure.
tests/test_theory.py checks the same curves. Regenerate the figure with

    pip install -e ".[bench]" && python benchmarks/a1a2_game.py      # writes benchmarks/a1a2_game.png
"""

import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hatrpo_mpe as hatrpo  # noqa: E402

OBS = torch.ones(1, 1)  # a one-step game: the policies see a constant observation
SPACE = gym.spaces.Box(-np.inf, np.inf, (1,))


def game_actors(seed: int, means=(-0.25, 0.25)) -> list:
    """Two of the scripts' Gaussian actors whose means start at -0.25 and 0.25 (std 0.5 * sigmoid(1), about 0.37)."""
    torch.manual_seed(seed)
    actors = [hatrpo.Actor(1, SPACE, (4,)) for _ in means]
    for actor, mean in zip(actors, means):
        with torch.no_grad():
            actor.head.weight.zero_()
            actor.head.bias.fill_(mean)
    return actors


def expected_return(actors) -> float:
    """E[a1 a2] = mu1 mu2 for independent Gaussian policies, in closed form."""
    with torch.no_grad():
        return actors[0](OBS)[0].item() * actors[1](OBS)[0].item()


def game_iteration(actors, sequential: bool, kl_threshold: float, rng: np.random.Generator, batch_size: int = 4000):
    """One iteration of the scripts' scheme: sample the game with the current policies, advantage = reward minus the
    exact expected return, then hatrpo_update per agent with the factor M, in a fresh random order."""
    obs = [OBS.expand(batch_size, 1)] * 2
    with torch.no_grad():
        dists = [actor.distribution(o) for actor, o in zip(actors, obs)]
        actions = [dist.sample() for dist in dists]
        logp_old = [dist.log_prob(a) for dist, a in zip(dists, actions)]
    advantages = actions[0][:, 0] * actions[1][:, 0] - expected_return(actors)
    args = hatrpo.Args(kl_threshold=kl_threshold, ls_steps=10, backtrack_coef=0.8, accept_ratio=0.5, cg_iters=10,
                       cg_damping=0.1)  # fmt: skip
    factor = torch.ones_like(logp_old[0])
    for i in list(rng.permutation(2)):  # the sequential update of hatrpo_mpe.py's main loop
        hatrpo.hatrpo_update(actors[i], obs[i], actions[i], logp_old[i], advantages, factor, args)
        if sequential:
            with torch.no_grad():
                logp_new = actors[i].distribution(obs[i]).log_prob(actions[i])
            factor = factor * torch.exp(logp_new - logp_old[i])


def return_curve(sequential: bool, kl_threshold: float, seed: int, iterations: int) -> list[float]:
    actors, rng = game_actors(seed), np.random.default_rng(seed)
    curve = [expected_return(actors)]
    for _ in range(iterations):
        game_iteration(actors, sequential, kl_threshold, rng)
        curve.append(expected_return(actors))
    return curve


KL_THRESHOLD = 0.5  # large steps: each agent alone would overshoot the other's sign change
SEEDS, ITERATIONS = range(5), 10


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.distributions.Distribution.set_default_validate_args(False)
    runs = {
        "sequential, with the factor M (HATRPO)": (True, "tab:blue"),
        "simultaneous, M = 1 (each agent against the plain advantage)": (False, "tab:red"),
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, (sequential, color) in runs.items():
        curves = np.array([return_curve(sequential, KL_THRESHOLD, seed, ITERATIONS) for seed in SEEDS])
        for ax in axes:
            ax.plot(curves.T, color=color, alpha=0.25, lw=1)
            ax.plot(curves.mean(0), color=color, lw=2, label=label)
    axes[0].set_title("expected return mu1 * mu2")
    axes[1].set_title("the same, near the start (-0.0625)")
    axes[1].set_ylim(-0.1, 0.15)
    for ax in axes:
        ax.axhline(-0.0625, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("iteration")
    axes[0].legend(loc="upper left", fontsize=8)
    title = "r(a1, a2) = a1 * a2, Gaussian policies from means -0.25 and 0.25, kl_threshold"
    fig.suptitle(f"{title} {KL_THRESHOLD}, {len(SEEDS)} seeds (thin) and their mean (thick)", fontsize=9)
    fig.tight_layout()
    path = Path(__file__).with_suffix(".png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
