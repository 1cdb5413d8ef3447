"""The MaMuJoCo adapter against mamujoco_v1 itself (joint mapping, observations, rewards, episode ends), termination
and truncation on real episodes, and every MaMuJoCo script end to end on several scenarios."""

import contextlib
import io
import json
import math
import re
import subprocess

import gymnasium as gym
import numpy as np
import pytest
import torch
import tyro
from helpers import MAMUJOCO_SCRIPTS, SCRIPT_ENV, TINY, load_script, read_metrics, run_dirs, run_ok, script_command
from test_end_to_end import expected_metrics

with contextlib.redirect_stderr(io.StringIO()):  # gymnasium_robotics prints a notice on import
    from gymnasium_robotics import mamujoco_v1

mamujoco = load_script(MAMUJOCO_SCRIPTS[0])  # the env code is the same text in every MaMuJoCo script (test_shared_code)

# every id mamujoco_v1 defines itself, with the "NxK" of the ManySegment robots made concrete
ENV_IDS = [env_id.replace("NxK", "3x2") for env_id in mamujoco.ENV_IDS if env_id not in mamujoco.FACTORIZATIONS]

# the papers' partitions that mamujoco_v1 lacks: each agent's joints, in agent order (the issue's table, written out
# here independently of the scripts' table); names compare without underscores (MuJoCo calls "hip1" "hip_1")
HUMANOID_17X1 = [
    [j]
    for j in "left_shoulder1 left_shoulder2 abdomen_x abdomen_y abdomen_z right_shoulder1 "
    "right_shoulder2 right_elbow left_elbow left_hip_x left_hip_y left_hip_z right_hip_x right_hip_y "
    "right_hip_z right_knee left_knee".split()
]
PAPER_PARTITIONS = {
    "Ant-8x1": [[j] for j in "hip1 ankle1 hip2 ankle2 hip3 ankle3 hip4 ankle4".split()],
    "HalfCheetah-3x2": [["bfoot", "bshin"], ["bthigh", "ffoot"], ["fshin", "fthigh"]],
    "Walker2d-6x1": [[j] for j in "foot leg thigh foot_left leg_left thigh_left".split()],
    "Walker2d-3x2": [["foot", "leg"], ["thigh", "foot_left"], ["leg_left", "thigh_left"]],
    "Humanoid-17x1": HUMANOID_17X1,
    "HumanoidStandup-17x1": HUMANOID_17X1,
}  # fmt: skip


def reference_env(env_id: str, agent_obsk: int = 1):
    """mamujoco_v1's own parallel env, built independently of the adapter."""
    scenario, _, partition = env_id.rpartition("-")
    return mamujoco_v1.parallel_env(scenario, partition, agent_obsk=agent_obsk)


def standardize(x) -> np.ndarray:
    return (x - np.mean(x)) / (np.std(x) + 1e-8)


def random_actions(env, rng) -> tuple:
    return tuple(rng.uniform(space.low, space.high).astype(np.float32) for space in env.action_space)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_agent_actions_reach_the_joints_mamujoco_v1_assigns(env_id):
    ours, reference = mamujoco.MaMuJoCoTeamEnv(env_id, None), reference_env(env_id)
    assert ours.agents == reference.possible_agents
    rng = np.random.default_rng(0)
    for _ in range(3):
        actions = random_actions(ours, rng)
        expected = reference.map_local_actions_to_global_action(dict(zip(reference.possible_agents, actions)))
        np.testing.assert_array_equal(ours.robot_action(actions), expected)
    # every joint of the robot is driven by exactly one agent
    joints = np.sort(np.concatenate(ours.joints))
    np.testing.assert_array_equal(joints, np.arange(ours.robot.action_space.shape[0]))


def joint_key(name: str) -> str:
    return name.replace("_", "").removesuffix("joint")


@pytest.mark.parametrize("env_id", PAPER_PARTITIONS)
def test_papers_partitions_give_each_agent_its_joints_in_order(env_id):
    """Checked against the single-agent v5 env's actuators: agent i drives exactly the listed joints, every joint has
    one agent, and local observations (--agent-obsk 1) build for every agent."""
    env = mamujoco.MaMuJoCoTeamEnv(env_id, None)
    model = gym.make(f"{env_id.rpartition('-')[0]}-v5").unwrapped.model  # built independently of the adapter
    driven = [[joint_key(model.joint(model.actuator_trnid[a, 0]).name) for a in joints] for joints in env.joints]
    assert driven == [[joint_key(name) for name in agent] for agent in PAPER_PARTITIONS[env_id]]
    np.testing.assert_array_equal(np.sort(np.concatenate(env.joints)), np.arange(model.nu))
    local = mamujoco.MaMuJoCoTeamEnv(env_id, 1)
    obs, _ = local.reset(seed=0)
    obs, *_ = local.step(random_actions(local, np.random.default_rng(0)))
    assert len(local.agents) == len(PAPER_PARTITIONS[env_id])
    assert all(obs[a].shape == local.observation_space[a].shape and np.isfinite(obs[a]).all() for a in local.agents)


@pytest.mark.parametrize("script", MAMUJOCO_SCRIPTS)
def test_help_lists_every_env_id(script):
    result = subprocess.run(script_command(script, "--help"), capture_output=True, text=True, env=SCRIPT_ENV)
    listed = set(re.findall(r"[A-Za-z0-9]+-[A-Za-z0-9|]+", result.stdout))
    assert set(load_script(script).ENV_IDS) <= listed, set(load_script(script).ENV_IDS) - listed


@pytest.mark.parametrize("env_id", ["HalfCheetah-2x3", "Hopper-3x1", "Ant-2x4", "Humanoid-9|8"])
def test_full_state_mode_matches_mamujoco_v1_step_by_step(env_id):
    """The default mode steps the MuJoCo env directly: states, observations, rewards and episode ends must be those of
    mamujoco_v1, with every agent seeing the standardised full state and its one-hot id."""
    ours, reference = mamujoco.MaMuJoCoTeamEnv(env_id, None), reference_env(env_id)
    agents = reference.possible_agents
    obs, _ = ours.reset(seed=5)
    reference.reset(seed=5)
    rng = np.random.default_rng(1)
    for _ in range(60):
        state = reference.state()
        np.testing.assert_allclose(obs["state"], standardize(state), rtol=1e-5, atol=1e-5)
        for i, agent in enumerate(agents):
            expected = standardize(np.concatenate([state, np.eye(len(agents))[i]]))
            np.testing.assert_allclose(obs[agent], expected, rtol=1e-5, atol=1e-5)
        actions = random_actions(ours, rng)
        obs, reward, terminated, truncated, _ = ours.step(actions)
        _, rewards, terminations, truncations, _ = reference.step(dict(zip(agents, actions)))
        assert reward == rewards[agents[0]]
        assert (terminated, truncated) == (terminations[agents[0]], truncations[agents[0]])
        if terminated or truncated:
            break


@pytest.mark.parametrize(("env_id", "obs_sizes"), [("HalfCheetah-6x1", [9, 9, 8, 9, 9, 8]), ("Humanoid-9|8", None)])
def test_local_observations_are_mamujoco_v1s_with_their_own_sizes(env_id, obs_sizes):
    ours, reference = mamujoco.MaMuJoCoTeamEnv(env_id, 1), reference_env(env_id, 1)
    agents = reference.possible_agents
    sizes = [ours.observation_space[a].shape[0] for a in agents]
    assert sizes == [reference.observation_space(a).shape[0] for a in agents]
    assert obs_sizes is None or sizes == obs_sizes
    assert len(set(sizes)) > 1  # heterogeneous agents, nothing padded
    obs, _ = ours.reset(seed=3)
    reference_obs, _ = reference.reset(seed=3)
    rng = np.random.default_rng(2)
    for _ in range(10):
        for agent in agents:
            np.testing.assert_allclose(obs[agent], standardize(reference_obs[agent]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(obs["state"], standardize(reference.state()), rtol=1e-5, atol=1e-5)
        actions = random_actions(ours, rng)
        obs, *_ = ours.step(actions)
        reference_obs, *_ = reference.step(dict(zip(agents, actions)))


def test_humanoid_agents_have_9_and_8_joints():
    env = mamujoco.MaMuJoCoTeamEnv("Humanoid-9|8", None)
    assert [space.shape for space in env.action_space] == [(9,), (8,)]
    assert env.observation_space["state"].shape == (348,)  # Humanoid-v5


def run_episode(env_id: str, action_value: float) -> tuple:
    """Step one vectorised env (same-step autoreset, as the scripts do) with a constant action until its episode ends:
    the number of steps, terminated, truncated, and whether the true final state came back in the infos."""
    envs = gym.vector.SyncVectorEnv(
        [mamujoco.make_env(env_id, None)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    envs.reset(seed=0)
    action = tuple(np.full((1,) + space.shape, action_value, np.float32) for space in envs.single_action_space)
    for step in range(1, 1001):
        next_obs, _, terminated, truncated, infos = envs.step(action)
        if terminated[0] or truncated[0]:
            final_state = infos["final_obs"][0]["state"]
            return step, terminated[0], truncated[0], not np.allclose(final_state, next_obs["state"][0])
    return step, False, False, False


def test_a_falling_hopper_terminates_and_a_cheetah_is_truncated_at_1000_steps():
    steps, terminated, truncated, final_state_kept = run_episode("Hopper-3x1", 1.0)  # full torque: it falls over
    assert steps < 1000 and terminated and not truncated and final_state_kept
    steps, terminated, truncated, final_state_kept = run_episode("HalfCheetah-2x3", 0.0)  # a cheetah cannot fall
    assert steps == 1000 and truncated and not terminated and final_state_kept


SCENARIOS = [
    ["--env-id", "HalfCheetah-2x3"],
    ["--env-id", "HalfCheetah-6x1", "--agent-obsk", "1"],  # heterogeneous local observations
    ["--env-id", "Humanoid-9|8"],  # heterogeneous action sizes
    ["--env-id", "Ant-4x2", "--agent-obsk", "0"],
]
SCENARIOS += [["--env-id", env_id] for env_id in PAPER_PARTITIONS]
NUM_AGENTS = {"HalfCheetah-2x3": 2, "HalfCheetah-6x1": 6, "Humanoid-9|8": 2, "Ant-4x2": 4}
NUM_AGENTS |= {env_id: len(agents) for env_id, agents in PAPER_PARTITIONS.items()}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda flags: " ".join(flags[1:]))
@pytest.mark.parametrize("script", MAMUJOCO_SCRIPTS)
def test_scenario_runs_two_iterations(script, scenario, tmp_path):
    run_ok(script, *scenario, *TINY, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    metrics = read_metrics(run_dir)
    assert [m["global_step"] for m in metrics] == [50, 100]
    episodic = {"charts/episodic_return", "charts/episodic_length"}  # only once an episode has ended
    for line in metrics:
        assert set(line) | episodic == expected_metrics(script, NUM_AGENTS[scenario[1]])
        assert all(math.isfinite(value) for value in line.values())
    args = json.loads((run_dir / "args.json").read_text())
    assert args["env_id"] == scenario[1] and args["agent_obsk"] == (int(scenario[3]) if len(scenario) > 2 else None)


# ----------------------------------------------------------------------------------------------------------------------
# Actions as HARL sends them, and HARL's tuned values
def test_gaussian_actions_map_linearly_onto_each_agents_bounds_on_humanoid():
    """Humanoid-9|8: each agent's torque bounds are the MuJoCo model's ctrlrange of its joints (+-0.4). A sample a
    goes to low + (a + 1) / 2 * (high - low), clipped: -1, 0 and 1 reach low, the centre and high; beyond, the bound."""
    env = mamujoco.MaMuJoCoTeamEnv("Humanoid-9|8", None)
    ctrlrange = env.robot.unwrapped.model.actuator_ctrlrange
    samples = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1.7, -3.0])
    for joints, space in zip(env.joints, env.action_space):
        low, high = ctrlrange[joints, 0], ctrlrange[joints, 1]
        np.testing.assert_array_equal(space.low, low.astype(np.float32))
        np.testing.assert_array_equal(space.high, high.astype(np.float32))
        a = samples[:, None].expand(-1, len(joints))
        sent = mamujoco.env_action(a, space)
        expected = np.clip(low + (a.numpy() + 1) / 2 * (high - low), low, high)
        np.testing.assert_allclose(sent, expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(sent[[0, 2, 4, 5, 6]], [low, (low + high) / 2, high, high, low], atol=1e-7)
    assert [len(joints) for joints in env.joints] == [9, 8] and np.allclose(ctrlrange, [-0.4, 0.4])


def test_actions_on_unit_bounds_are_sent_as_sampled():
    """HalfCheetah's bounds are +-1: the mapping is the identity bit for bit, so runs made before it stay valid."""
    space = mamujoco.MaMuJoCoTeamEnv("HalfCheetah-2x3", None).action_space[0]
    a = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0)) * 0.5
    sent = mamujoco.env_action(a, space)
    assert np.array_equal(sent, np.clip(a.numpy(), -1, 1)) and sent.dtype == np.float32


# HARL's tuned_configs/mamujoco/<task>/<algorithm>/config.json, written out independently of the scripts' tables:
# the full setting of every tuned field (Ant-2x4, which HARL did not tune, takes Ant-4x2's)
HAPPO_FIELDS = ("clip_coef", "ppo_epochs", "critic_epochs", "num_minibatches", "ent_coef", "learning_rate",
                "critic_learning_rate", "anneal_lr")  # fmt: skip
HARL_HAPPO = {
    "Ant-4x2": (0.1, 5, 5, 1, 0.0, 5e-4, 5e-4, False),
    "HalfCheetah-2x3": (0.05, 15, 15, 1, 0.01, 5e-4, 5e-4, False),
    "Hopper-3x1": (0.05, 10, 10, 1, 0.0, 5e-4, 5e-4, True),
    "Walker2d-2x3": (0.05, 5, 5, 2, 0.0, 1e-3, 1e-3, True),
    "Walker2d-6x1": (0.1, 5, 5, 1, 0.01, 5e-4, 5e-4, False),
    "Humanoid-17x1": (0.1, 5, 5, 1, 0.0, 5e-4, 5e-4, True),
    "Ant-2x4": (0.1, 5, 5, 1, 0.0, 5e-4, 5e-4, False),
    "HalfCheetah-6x1": (0.2, 5, 5, 1, 0.0, 5e-4, 5e-4, False),  # not tuned: the general defaults
}
HARL_HATRPO_KL = {"Ant-4x2": 0.005, "HalfCheetah-2x3": 0.01, "Hopper-3x1": 0.001, "Walker2d-2x3": 0.01,
                  "Walker2d-6x1": 0.005, "Ant-2x4": 0.005, "HalfCheetah-6x1": 0.01, "Humanoid-17x1": 0.01}  # fmt: skip


def parsed_args(m, argv: list[str]):
    """Args as the script builds them: tyro on argv, then the tuned values of the env id."""
    args = tyro.cli(m.Args, args=argv)
    m.apply_tuned_values(args, argv, m.TUNED.get(args.env_id, {}))
    return args


@pytest.mark.parametrize("env_id", HARL_HAPPO)
def test_each_task_runs_with_harls_tuned_values(env_id):
    happo, hatrpo = load_script("happo_mamujoco.py"), load_script("hatrpo_mamujoco.py")
    args = parsed_args(happo, ["--env-id", env_id])
    assert tuple(getattr(args, field) for field in HAPPO_FIELDS) == HARL_HAPPO[env_id]
    args = parsed_args(hatrpo, ["--env-id", env_id])
    assert (args.kl_threshold, args.critic_epochs, args.clip_coef, args.critic_learning_rate) == (
        HARL_HATRPO_KL[env_id], 5, 0.2, 5e-4,
    )  # fmt: skip


@pytest.mark.parametrize(
    "flags", [["--clip-coef", "0.2"], ["--clip-coef=0.2"], ["--ppo-epochs", "5", "--no-anneal-lr"]],
    ids=["space", "equals", "bool"],
)  # fmt: skip
def test_a_flag_on_the_command_line_wins_over_the_table_even_at_the_default(flags):
    """0.2 and 5 are the general defaults: given explicitly, they still override HalfCheetah's 0.05 and 15."""
    args = parsed_args(load_script("happo_mamujoco.py"), ["--env-id", "HalfCheetah-2x3", *flags])
    given = {"clip_coef": 0.2} if "0.2" in " ".join(flags) else {"ppo_epochs": 5, "anneal_lr": False}
    tuned = {"clip_coef": 0.05, "ppo_epochs": 15, "critic_epochs": 15, "ent_coef": 0.01}
    for field, value in (tuned | given).items():
        assert getattr(args, field) == value, field


def test_the_first_line_and_args_json_tell_the_values_from_the_table_and_the_flags_that_overrode_one(tmp_path):
    result = run_ok("happo_mamujoco.py", "--env-id", "HalfCheetah-2x3", "--clip-coef", "0.2", *TINY, cwd=tmp_path)
    assert result.stdout.splitlines()[0] == (
        "HalfCheetah-2x3: from HARL's tuned values (TUNED) ppo_epochs=15 critic_epochs=15 ent_coef=0.01; "
        "overridden by a flag: clip_coef=0.2"
    )
    (run_dir,) = run_dirs(tmp_path)
    args = json.loads((run_dir / "args.json").read_text())
    assert (args["clip_coef"], args["ppo_epochs"], args["critic_epochs"], args["ent_coef"]) == (0.2, 15, 15, 0.01)
    assert args["from_tuned_table"] == {"ppo_epochs": 15, "critic_epochs": 15, "ent_coef": 0.01}


@pytest.mark.parametrize(
    "script, env_id, line",
    [("hatrpo_mamujoco.py", "Hopper-3x1", "Hopper-3x1: from HARL's tuned values (TUNED) kl_threshold=0.001; overridden "
      "by a flag: none"),
     ("happo_mamujoco.py", "HalfCheetah-6x1", "HalfCheetah-6x1: from HARL's tuned values (TUNED) none; overridden by a "
      "flag: none")],
)  # fmt: skip
def test_the_help_and_the_first_line_say_which_tuned_values_a_task_takes(script, env_id, line):
    m = load_script(script)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        m.apply_tuned_values(tyro.cli(m.Args, args=["--env-id", env_id]), ["--env-id", env_id], m.TUNED.get(env_id, {}))
    assert out.getvalue() == line + "\n"
    help_text = subprocess.run(script_command(script, "--help"), capture_output=True, text=True).stdout
    assert "first line lists the tuned values" in " ".join(help_text.replace("│", " ").split())  # without tyro's box
