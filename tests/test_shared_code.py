"""Code shared between scripts is copied word for word: every top-level function or class that several scripts define
under the same name has the same source text in each, and behaves the same on the same inputs (identical text can
still differ through the module-level names it uses). Helpers that build or check the environment are compared within
an environment family (*_mpe.py, *_mamujoco.py). The five scripts are named in helpers.SCRIPTS: a researcher's modified
copy at the root is theirs to change, and the suite leaves it alone."""

import ast
import contextlib
import difflib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import REPO, SCRIPTS, family, load_script
from torch import nn

PER_SCRIPT = {"Args"}  # each script's own command line; any other name defined twice must be the same code
PER_FAMILY = {
    "validate_args",
    "make_env",
    "env_action",
    "evaluate",
}  # they know the environment: shared within a family


def top_level_definitions(script: str) -> dict[str, str]:
    source = (REPO / script).read_text()
    nodes = ast.parse(source).body
    return {n.name: ast.get_source_segment(source, n) for n in nodes if isinstance(n, ast.FunctionDef | ast.ClassDef)}


DEFINITIONS = {script: top_level_definitions(script) for script in SCRIPTS}
ALL_NAMES = {name for definitions in DEFINITIONS.values() for name in definitions}
FAMILIES = sorted({family(s) for s in SCRIPTS})
CANDIDATES = {name: [s for s in SCRIPTS if name in DEFINITIONS[s]] for name in ALL_NAMES - PER_SCRIPT - PER_FAMILY} | {
    f"{name}[{f}]": [s for s in SCRIPTS if name in DEFINITIONS[s] and family(s) == f]
    for name in PER_FAMILY
    for f in FAMILIES
}
SHARED = {key: scripts for key, scripts in sorted(CANDIDATES.items()) if len(scripts) > 1}  # "make_env[mpe]": scripts


def helper_name(key: str) -> str:
    return key.split("[")[0]


def test_the_scripts_share_their_harness():
    """Guards the tests below against passing vacuously (no scripts found, or nothing shared)."""
    assert len(SCRIPTS) == 5 and all((REPO / script).is_file() for script in SCRIPTS)
    assert {"compute_gae", "Actor", "Critic", "ValueNorm", "critic_update", "start_run", "stop"} <= set(SHARED)
    assert {"validate_args[mpe]", "make_env[mamujoco]", "hatrpo_update", "happo_update"} <= set(SHARED)
    assert {"conjugate_gradient", "fisher_vector_product", "compute_gae", "restore"} <= {
        name for name, scripts in SHARED.items() if "matrpo_admm.py" in scripts
    }


@pytest.mark.parametrize("key", SHARED)
def test_shared_helper_has_identical_source(key):
    name, (first, *others) = helper_name(key), SHARED[key]
    for other in others:
        expected, actual = DEFINITIONS[first][name], DEFINITIONS[other][name]
        diff = "\n".join(difflib.unified_diff(expected.splitlines(), actual.splitlines(), first, other, lineterm=""))
        assert actual == expected, f"{name} differs between {first} and {other}:\n{diff}"


def test_a_modified_copy_of_a_script_at_the_root_leaves_the_suite_green(tmp_path):
    """A researcher copies happo_mpe.py to my_happo_variant.py and edits a shared helper: the shared-code checks of the
    copied repository still pass, and no test is collected for the copy."""
    skip = shutil.ignore_patterns("results", "report", "report_earlier", "__pycache__")  # benchmark outputs
    for name in [*SCRIPTS, "pyproject.toml"]:
        shutil.copy(REPO / name, tmp_path)
    for name in ["tests", "benchmarks"]:
        shutil.copytree(REPO / name, tmp_path / name, ignore=skip)
    source = (REPO / "happo_mpe.py").read_text()
    variant = source.replace("lastgaelam = delta + gamma", "lastgaelam = 0.5 * delta + gamma")  # a new estimator
    assert variant != source
    (tmp_path / "my_happo_variant.py").write_text(variant)
    pytest_command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-q"]
    checks = subprocess.run([*pytest_command, "tests/test_shared_code.py", "-k", "not modified_copy"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert checks.returncode == 0 and " passed" in checks.stdout, checks.stdout[-3000:]
    collected = subprocess.run([*pytest_command, "--collect-only", "tests"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=600)  # fmt: skip
    assert collected.returncode == 0 and "happo_mpe.py" in collected.stdout, collected.stdout[-3000:]
    assert "my_happo_variant" not in collected.stdout


# ----------------------------------------------------------------------------------------------------------------------
# Behaviour: for each helper, a function of (script module, tmp_path) that calls it on fixed inputs and returns what
# it produced. Every shared helper needs an entry; the results of all scripts defining it must be equal.
def exit_of(function, *args, **kwargs) -> tuple:
    """The exit code and stderr of a call that must exit."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        function(*args, **kwargs)
    return exit_info.value.code, stderr.getvalue()


def make_args(module, **fields):
    args = module.Args(**fields)
    args.batch_size = args.num_envs * args.num_steps
    return args


def rollout(env, actions, seed=3) -> list:
    """What the env returns on reset and on each of the given joint actions."""
    return [env.reset(seed=seed)] + [env.step(action) for action in actions]


def seeded(build, seed: int = 0):
    torch.manual_seed(seed)
    return build()


def x(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SPACES = [gym.spaces.Discrete(4), gym.spaces.Box(0.0, 1.0, (2,))]


def actor_outputs(m) -> list:
    results = []
    for space in SPACES:
        actor = seeded(lambda: m.Actor(5, space, (8,)))
        dist = actor.distribution(x(6, 5))
        action = torch.tensor([0, 1, 2, 3, 0, 1]) if space.shape == () else x(6, 2)
        results.append((actor(x(6, 5)), dist.log_prob(action), dist.entropy(), dist.mode))
    return results


def value_norm_outputs(m) -> tuple:
    norm = m.ValueNorm(beta=0.9)
    norm.update(x(20) * 3 + 1)
    norm.update(x(30, seed=2))
    return norm.mean_std(), norm.state_dict()


def critic_update_outputs(m) -> tuple:
    critic = seeded(lambda: m.Critic(6, (8,)))
    optimizer = torch.optim.Adam(critic.parameters(), lr=1e-2)
    states, targets = x(12, 6), x(12, seed=2)
    with torch.no_grad():
        old_values = critic(states)
    args = m.Args(clip_coef=0.2, huber_delta=10.0, critic_epochs=3, num_minibatches=2, max_grad_norm=10.0)
    loss = m.critic_update(critic, optimizer, states, targets, old_values, args=args, rng=np.random.default_rng(0))
    return loss, critic.state_dict()


def checkpoint_outputs(m, tmp_path) -> tuple:
    """restore reads back what save_checkpoint wrote (--eval-checkpoint: the parts given, not the generators), and
    refuses another architecture and an unreadable file with one line and exit 2."""
    path = str(tmp_path / "checkpoint.pt")
    args = make_args(m, hidden_sizes=(8,), eval_checkpoint=path)  # hidden_sizes: an architecture arg of every script
    m.save_checkpoint(path, parts={"net": seeded(lambda: nn.Linear(3, 2))}, global_step=300, iteration=3,
                      rng=np.random.default_rng(5), args=args)  # fmt: skip
    saved = torch.load(path, weights_only=False)
    net, rng = seeded(lambda: nn.Linear(3, 2), seed=1), np.random.default_rng(0)
    steps = m.restore(args, {"net": net}, rng)
    mismatch = exit_of(m.restore, make_args(m, hidden_sizes=(9,), eval_checkpoint=path), {"net": net}, rng)
    unreadable = tmp_path / "not_a_checkpoint.pt"
    unreadable.write_text("text")
    unreadable_exit = exit_of(m.restore, make_args(m, eval_checkpoint=str(unreadable)), {"net": net}, rng)
    assert (
        steps == (300, 3) and torch.equal(net.weight, saved["net"]["weight"]) and mismatch[0] == unreadable_exit[0] == 2
    )
    assert rng.random() == np.random.default_rng(0).random()  # not the saved generator: only --resume restores it
    return steps, net.state_dict(), mismatch, unreadable_exit


def evaluate_outputs(m) -> np.ndarray:
    """The same env and actors for every script of a family (env_action, which evaluate calls, is per family)."""
    if family(m.__name__ + ".py") == "mamujoco":
        envs = gym.vector.SyncVectorEnv([load_script("happo_mamujoco.py").make_env("Hopper-3x1", None)] * 2)
    else:
        envs = gym.vector.SyncVectorEnv([load_script("happo_mpe.py").make_env("simple_spread_v3", False, 25)] * 2)
    agents = envs.get_attr("agents")[0]
    spaces = [envs.single_observation_space[a].shape[0] for a in agents]
    actors = [seeded(lambda: m.Actor(size, space, (8,)), seed) for seed, (size, space) in
              enumerate(zip(spaces, envs.single_action_space))]  # fmt: skip
    return m.evaluate(actors, agents, envs, seeds=[5, 6])


def env_action_outputs(m) -> list:
    if family(m.__name__ + ".py") == "mamujoco":  # Box actions on any bounds
        return [m.env_action(torch.tensor([-1.0, 0.3, 1.7]), gym.spaces.Box(low, high, (3,))) for low, high in
                [(-1.0, 1.0), (-0.4, 0.4), (-2.0, 1.0)]]  # fmt: skip
    return [
        m.env_action(torch.tensor([-0.5, 0.3, 1.7]), gym.spaces.Box(0.0, 1.0, (3,))),
        m.env_action(torch.tensor(2), gym.spaces.Discrete(5)),
    ]


def tuned_values_outputs(m) -> list:
    results = []
    for argv in (["--env-id", "Ant-2x4"], ["--clip-coef", "0.2", "--no-anneal-lr"], ["--critic-epochs=3"]):
        args = m.Args()
        applied = m.apply_tuned_values(args, argv, tuned={"clip_coef": 0.05, "anneal_lr": True, "critic_epochs": 9})
        results.append((applied, args.clip_coef, args.anneal_lr, args.critic_epochs))
    return results


def check_finite_outputs(m) -> list:
    broken = nn.Linear(2, 2)
    with torch.no_grad():
        broken.weight[0, 0] = math.nan
    results = [m.check_finite({"a": 1.0}, {"net": nn.Linear(2, 2)})]  # None: nothing to report
    for metrics, networks in [({"a": 1.0, "b": math.inf}, {}), ({"a": 1.0}, {"agent1": broken})]:
        with pytest.raises(FloatingPointError) as error:
            m.check_finite(metrics, networks)
        results.append(str(error.value))
    return results


def fisher_vector_product_outputs(m) -> list:
    results = []
    for space in SPACES:
        actor = seeded(lambda: load_script("hatrpo_mpe.py").Actor(5, space, (8,)))  # the same actor for every script
        fvp = m.fisher_vector_product(actor, obs=x(6, 5), damping=0.1)
        results.append(fvp(x(sum(p.numel() for p in actor.parameters()), seed=3)))
    return results


def hatrpo_update_outputs(m) -> list:
    results = []
    for space in SPACES:
        actor = seeded(lambda: m.Actor(5, space, (8,)))
        obs = x(32, 5)
        with torch.no_grad():
            dist = actor.distribution(obs)
            actions = dist.sample()
            logp_old = dist.log_prob(actions)
        args = m.Args(kl_threshold=0.01, ls_steps=10, backtrack_coef=0.8, accept_ratio=0.5, cg_iters=10, cg_damping=0.1,
                      num_envs=4, fvp_subsample=2)  # fmt: skip
        advantages, factor = x(32, seed=2), x(32, seed=3).exp()
        stats, logp_new = m.hatrpo_update(actor, obs, actions, logp_old, advantages, factor, args)
        results.append((stats, logp_new, actor.state_dict()))
    return results


def happo_update_outputs(m) -> tuple:
    actor = seeded(lambda: m.Actor(5, SPACES[1], (8,)))
    optimizer = torch.optim.Adam(actor.parameters(), lr=1e-2)
    obs, actions = x(32, 5), x(32, 2)
    with torch.no_grad():
        logp_old = actor.distribution(obs).log_prob(actions)
    args = m.Args(clip_coef=0.2, ent_coef=0.01, ppo_epochs=3, num_minibatches=2, max_grad_norm=10.0)
    advantages, factor, rng = x(32, seed=2), x(32, seed=3).exp(), np.random.default_rng(0)
    stats = m.happo_update(actor, optimizer, obs, actions, logp_old, advantages=advantages, factor=factor, args=args,
                           rng=rng)  # fmt: skip
    return stats, actor.state_dict()


def start_run_outputs(m, tmp_path) -> tuple:
    """A resumed run keeps the metrics lines up to its checkpoint's step and drops a line cut by a crash, then log
    appends; args.json holds the args, the command and the notes; the checkpoint's name is shell-safe."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text('{"global_step": 50}\n{"global_step": 100}\n{"global_step": 150}\n{"glo')
    stderr, args = io.StringIO(), make_args(m, resume=str(run_dir / "a.pt"), exp_name="my|run")
    with contextlib.redirect_stderr(stderr):
        folder, checkpoint_path, log = m.start_run(args, label="unused on resume", global_step=100, note="kept")
    log({"global_step": 200, "charts/SPS": 2.5})
    record = json.loads((run_dir / "args.json").read_text())
    assert {k: v for k, v in record.items() if k not in ("command", "note")} == json.loads(json.dumps(vars(args)))
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert metrics == '{"global_step": 50}\n{"global_step": 100}\n{"global_step": 200, "charts/SPS": 2.5}\n'
    assert "dropped line 4" in stderr.getvalue()
    return (
        folder == str(run_dir),
        checkpoint_path == str(run_dir / "my_run.pt"),
        metrics,
        record["note"],
        stderr.getvalue(),
    )


def save_and_restore_outputs(m, tmp_path) -> list:
    """save_checkpoint writes what --resume needs; restore puts every part and the random generators back."""
    net, nets = (
        seeded(lambda: nn.Linear(3, 2)),
        [seeded(lambda: nn.Linear(2, 2), 1), seeded(lambda: nn.Linear(2, 1), 2)],
    )
    optimizer, rng = torch.optim.Adam(net.parameters(), lr=0.1), np.random.default_rng(5)
    net(x(4, 3)).sum().backward()
    optimizer.step()
    parts = dict(net=net, nets=nets, optimizer=optimizer)
    path = str(tmp_path / "checkpoint.pt")
    m.save_checkpoint(path, parts, global_step=300, iteration=3, rng=rng, args=m.Args(resume=path))
    before = [p.detach().clone() for p in net.parameters()], rng.random(), torch.rand(2)
    with torch.no_grad():
        for p in [*net.parameters(), *nets[1].parameters()]:
            p.add_(1.0)
    with contextlib.redirect_stdout(io.StringIO()):  # "resumed from ..."
        steps = m.restore(m.Args(resume=path), parts, rng)
    after = [p.detach().clone() for p in net.parameters()], rng.random(), torch.rand(2)
    saved = torch.load(path, weights_only=False)
    assert saved["script"] == m.__name__ + ".py" and saved["args"] == vars(m.Args(resume=path))
    assert steps == (300, 3) and not os.path.exists(path + ".tmp")
    return [steps, before, after, nets[1].state_dict(), optimizer.state_dict()["state"][0]["exp_avg"]]


def interrupt_outputs(m) -> tuple:
    """SIGTERM (like Ctrl-C) raises KeyboardInterrupt carrying the signal number: stop() exits with 128 + it."""
    previous = signal.signal(signal.SIGTERM, m.raise_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt) as interrupt:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises within this sleep
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert interrupt.value.args == (signal.SIGTERM,)
    return interrupt.value.args


def stop_outputs(m, tmp_path) -> list:
    """A NaN: exit 1 with one error line; Ctrl-C/SIGTERM: exit 128 + signal, naming the step the checkpoint holds and
    the command that resumes from it (an earlier --resume replaced, in both its forms); with none, says so."""
    path, argv, stdout = os.path.join(tempfile.mkdtemp(dir=tmp_path), "r|1.pt"), sys.argv, io.StringIO()
    nan = FloatingPointError("agent0/policy_loss is nan")
    results = [exit_of(m.stop, reason=nan, global_step=100, checkpoint_path=path)]
    torch.save({"global_step": 50}, path)
    try:
        sys.argv = ["a.py", "--resume", "old.pt", "--seed", "2", "--resume=x y.pt"]
        with contextlib.redirect_stdout(stdout):
            results.append(exit_of(m.stop, reason=KeyboardInterrupt(15), global_step=100, checkpoint_path=path))
    finally:
        sys.argv = argv
    printed = stdout.getvalue().replace(path, "PATH")
    assert results[0][0] == 1 and "nothing saved" in results[0][1] and results[1][0] == 128 + 15
    assert "global_step=50" in printed and printed.endswith("python a.py --seed 2 --resume 'PATH'\n"), printed
    return results + [printed]


def agent_factorization_outputs(m) -> list:
    """Each agent's joints, the edges and the global nodes, as labels (edges as sorted label pairs)."""
    results = [m.agent_factorization("HalfCheetah-2x3")]  # None: a partition mamujoco_v1 defines
    for env_id in ("Walker2d-3x2", "Humanoid-17x1"):
        factorization = m.agent_factorization(env_id)
        results.append(
            (
                [[node.label for node in agent] for agent in factorization["partition"]],
                sorted(sorted(node.label for node in edge.nodes) for edge in factorization["edges"]),
                [node.label for node in factorization["globals"]],
            )
        )
    return results


def make_env_outputs(m) -> list:
    if family(m.__name__ + ".py") == "mpe":
        return rollout(m.make_env("simple_spread_v3", False, 25)(), SPREAD_ACTIONS)
    if family(m.__name__ + ".py") == "admm":
        return rollout(m.make_env(3, 25)(), SPREAD_ACTIONS)
    return rollout(m.make_env("Humanoid-9|8", None)(), HUMANOID_ACTIONS)


CHEETAH_ACTIONS = [tuple(np.full(1, 0.1 * (i - j), np.float32) for i in range(6)) for j in range(3)]
HOPPER_ACTIONS = [tuple(np.full(1, 0.5 * (i - j), np.float32) for i in range(3)) for j in range(3)]
HUMANOID_ACTIONS = [(np.full(9, 0.1 * j, np.float32), np.full(8, -0.1 * j, np.float32)) for j in range(3)]
SPREAD_ACTIONS = [(0, 1, 2), (3, 4, 0), (1, 1, 1)]
LISTENER_ACTIONS = [(np.full(3, 0.2, np.float32), np.linspace(0, 1, 5, dtype=np.float32))] * 3
BAD_ARGS = [{"env_id": "nope"}, {"num_envs": 0}, {"hidden_sizes": ()}, {"gamma": 2.0}, {"total_timesteps": 10},
            {"resume": "a.pt", "eval_checkpoint": "b.pt"}]  # fmt: skip

BEHAVIOUR = {
    "fail": lambda m, tmp_path: exit_of(m.fail, "a message"),
    "validate_args": lambda m, tmp_path: [
        exit_of(m.validate_args, make_args(m, **bad)) for bad in BAD_ARGS if all(hasattr(m.Args, k) for k in bad)
    ],
    "MPETeamEnv": lambda m, tmp_path: rollout(m.MPETeamEnv("simple_speaker_listener_v4", True, 25), LISTENER_ACTIONS),
    "make_env": lambda m, tmp_path: make_env_outputs(m),
    "MaMuJoCoTeamEnv": lambda m, tmp_path: [
        rollout(m.MaMuJoCoTeamEnv("HalfCheetah-6x1", 1), CHEETAH_ACTIONS),
        rollout(m.MaMuJoCoTeamEnv("Hopper-3x1", None), HOPPER_ACTIONS),
    ],
    "standardize": lambda m, tmp_path: m.standardize(np.array([1.0, -2.0, 4.0, 0.5])),
    "agent_factorization": lambda m, tmp_path: agent_factorization_outputs(m),
    "layer_init": lambda m, tmp_path: seeded(lambda: m.layer_init(nn.Linear(3, 4), std=0.5)).state_dict(),
    "mlp": lambda m, tmp_path: seeded(lambda: m.mlp(5, (8, 8)))(x(3, 5)),
    "Actor": lambda m, tmp_path: actor_outputs(m),
    "Critic": lambda m, tmp_path: seeded(lambda: m.Critic(6, (8,)))(x(4, 6)),
    "ValueNorm": lambda m, tmp_path: value_norm_outputs(m),
    "compute_gae": lambda m, tmp_path: m.compute_gae(
        rewards=x(5, 3),
        values=x(5, 3, seed=2),
        next_values=x(5, 3, seed=3),
        terminations=(x(5, 3, seed=4) > 1).float(),
        dones=(x(5, 3, seed=5) > 0.5).float(),
        gamma=0.9,
        gae_lambda=0.8,
    ),  # fmt: skip
    "minibatches": lambda m, tmp_path: m.minibatches(np.random.default_rng(0), batch_size=12, num_minibatches=3),
    "critic_update": lambda m, tmp_path: critic_update_outputs(m),
    "save_checkpoint": checkpoint_outputs,
    "env_action": lambda m, tmp_path: env_action_outputs(m),
    "env_seeds": lambda m, tmp_path: [
        m.env_seeds(seed=7, num_envs=3, purpose=p, step=s) for p, s in [(0, 0), (0, 800), (1, 0)]
    ],
    "evaluate": lambda m, tmp_path: evaluate_outputs(m),
    "apply_tuned_values": lambda m, tmp_path: tuned_values_outputs(m),
    "check_finite": lambda m, tmp_path: check_finite_outputs(m),
    "start_run": start_run_outputs,
    "progress_line": lambda m, tmp_path: m.progress_line(step=3000, total=10_000, steps_per_second=1.5, episodes="-"),
    "raise_interrupt": lambda m, tmp_path: interrupt_outputs(m),
    "restore": save_and_restore_outputs,
    "with_video": lambda m, tmp_path: (
        type(
            m.with_video(
                lambda: gym.make("CartPole-v1", render_mode="rgb_array"), run_dir=tempfile.mkdtemp(dir=tmp_path)
            )()
        ).__name__
    ),
    "stop": stop_outputs,
    # defined in one script today; the sibling scripts of other environments will share them
    "happo_update": lambda m, tmp_path: happo_update_outputs(m),
    "conjugate_gradient": lambda m, tmp_path: m.conjugate_gradient(lambda v: 3 * v + v.sum(), b=x(6), iters=4),
    "fisher_vector_product": lambda m, tmp_path: fisher_vector_product_outputs(m),
    "hatrpo_update": lambda m, tmp_path: hatrpo_update_outputs(m),
}


def assert_same(expected, actual, where="result"):
    """Exact equality of nested results (tensors, arrays, numbers, strings, dicts, sequences)."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), f"{where}: {actual} != {expected}"
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(actual, expected), f"{where}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{where}[{i}]")
    else:
        assert actual == expected or (actual != actual and expected != expected), f"{where}: {actual} != {expected}"


def test_every_behaviour_check_names_a_real_helper():
    assert set(BEHAVIOUR) <= ALL_NAMES


@pytest.mark.parametrize("key", SHARED)
def test_shared_helper_behaves_identically(key, tmp_path):
    name, (first, *others) = helper_name(key), SHARED[key]
    assert name in BEHAVIOUR, f"{name} is shared by {SHARED[key]}: add a behaviour check for it to BEHAVIOUR"
    expected = BEHAVIOUR[name](load_script(first), tmp_path)
    for other in others:
        assert_same(expected, BEHAVIOUR[name](load_script(other), tmp_path), f"{name} of {other} vs {first}")


@pytest.mark.parametrize("name", sorted(BEHAVIOUR))
def test_behaviour_check_runs_and_is_deterministic(name, tmp_path):
    """Each check works on every script defining the helper (also helpers not shared yet) and repeats exactly, so a
    difference between scripts can only come from the scripts."""
    for script in [s for s in SCRIPTS if name in DEFINITIONS[s]]:
        module = load_script(script)
        assert_same(BEHAVIOUR[name](module, tmp_path), BEHAVIOUR[name](module, tmp_path), f"{name} of {script}")
