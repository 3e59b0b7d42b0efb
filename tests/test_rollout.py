"""The rollout framework without a simulator: episode records, the results store (and its integrity checks),
statistics, conditions (registry, syntax), the one sweep loop with each executor, and plots.

References are independent of the code under test: analytic trajectories, hand-written Welch formulas, files
inspected with pyarrow/json/PIL directly.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

from nnsight_vla.errors import ConfigMismatchError, ResultsError
from nnsight_vla.rollout import conditions as C
from nnsight_vla.rollout.records import EpisodeKey, EpisodeRecorder
from nnsight_vla.rollout.stats import compare_conditions, success_rates
from nnsight_vla.rollout.store import ResultsStore

CONFIG = {"simulator": "test", "suite": "s", "max_steps": 50, "camera_size": 64}


class Knob:
    """A minimal steering object (the real one is nnsight_vla.Steering): scales a policy's `gain`."""

    def __init__(self, scale):
        self.scale = scale

    def apply(self, policy):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            old = policy.gain
            policy.gain = old * self.scale
            try:
                yield
            finally:
                policy.gain = old

        return ctx()

    def to_dict(self):
        return {"knob": self.scale}


def line_episode(key, speed, steps=20, start=(0.1, -0.2, 0.8), direction=(3.0, 0.0, 4.0), success=True, jitter=None):
    """An episode moving at constant `speed` (m/step) along `direction`; the reference values are analytic."""
    d = np.asarray(direction) / np.linalg.norm(direction)
    rec = EpisodeRecorder(key, start, meta={"note": "synthetic"})
    for t in range(steps):
        s = speed if jitter is None else speed + jitter[t]
        pos = np.asarray(start) + d * (speed * (t + 1) if jitter is None else np.sum(speed + jitter[: t + 1]))
        action = np.concatenate([d * s * 10, np.zeros(3), [-1.0]])
        rec.record(pos, action, raw_action=action, gripper_state=0.04, policy_call=(t % 5 == 0), policy_s=0.001,
                   env_s=0.002, reward=0.0, done=(success and t == steps - 1))
    return rec.finish(success)


def test_step_metrics_match_analytic_trajectory():
    ep = line_episode(EpisodeKey("baseline", 0, 0), speed=0.01, steps=20)
    cols = ep.columns
    n = np.arange(1, 21)
    np.testing.assert_allclose(cols["disp"], 0.01, rtol=1e-9)
    np.testing.assert_allclose(cols["cum_disp"], 0.01 * n, rtol=1e-9)
    np.testing.assert_allclose(cols["dz"], 0.01 * 0.8, rtol=1e-9)  # direction (3,0,4)/5: z share 0.8
    np.testing.assert_allclose(cols["height"], 0.8 + 0.008 * n, rtol=1e-9)
    np.testing.assert_allclose(cols["height_rel"], 0.008 * n, atol=1e-12)
    np.testing.assert_allclose(cols["action_disp"], 0.1, rtol=1e-6)  # |a_xyz| = 10 * speed
    np.testing.assert_allclose(cols["action_dz"], 0.08, rtol=1e-6)
    s = ep.summary
    assert s["steps"] == 20 and s["success"] is True and s["policy_calls"] == 4
    assert s["total_disp"] == pytest.approx(0.2)
    assert s["mean_disp"] == pytest.approx(0.01)
    assert s["max_height_gain"] == pytest.approx(0.16)
    assert s["policy_s"] == pytest.approx(0.02) and s["env_s"] == pytest.approx(0.04)


def test_store_roundtrip_files_and_resume(tmp_path):
    store = ResultsStore.create(tmp_path / "r", CONFIG, [C.baseline().to_dict()], kind="test")
    ep = line_episode(EpisodeKey("baseline", 3, 1), speed=0.02, steps=7)
    path = store.write_episode(ep)
    record = json.loads(path.read_text())
    steps_file = path.with_name(record["steps_file"])
    table = pq.read_table(steps_file)
    assert table.num_rows == 7 == record["steps_rows"]
    np.testing.assert_allclose(table.column("disp").to_numpy(), 0.02)
    assert table.column("condition").to_pylist() == ["baseline"] * 7
    assert table.column("action").to_pylist()[0][-1] == -1.0
    assert record["summary"]["steps"] == 7 and record["meta"]["note"] == "synthetic"
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["config"] == CONFIG and "numpy" in manifest["versions"]
    # the same config reopens; committed episodes are what a resume skips; writing again is a no-op
    again = ResultsStore.create(tmp_path / "r", CONFIG, [C.baseline().to_dict()], kind="test")
    assert again.completed() == {ep.key.id}
    mtime = os.stat(path).st_mtime_ns
    again.write_episode(line_episode(EpisodeKey("baseline", 3, 1), speed=0.5, steps=3))
    assert os.stat(path).st_mtime_ns == mtime
    assert pq.read_table(steps_file).num_rows == 7
    assert again.verify() == []


def test_partial_episodes_never_count(tmp_path):
    store = ResultsStore.create(tmp_path / "r", CONFIG, [C.baseline().to_dict()], kind="test")
    good = line_episode(EpisodeKey("baseline", 0, 0), speed=0.01)
    store.write_episode(good)
    # a kill between the Parquet and the JSON commit: Parquet only
    orphan = line_episode(EpisodeKey("baseline", 0, 1), speed=0.01)
    pq.write_table(orphan.table(), store.episodes_dir / f"{orphan.key.id}.parquet")
    # a JSON whose Parquet is shorter than recorded (corrupt) and a temp file of a write in progress
    torn = line_episode(EpisodeKey("baseline", 0, 2), speed=0.01)
    store.write_episode(torn)
    pq.write_table(torn.table().slice(0, 5), store.episodes_dir / f"{torn.key.id}.parquet")
    (store.episodes_dir / f".{good.key.id}.json.999.tmp").write_text("{")
    assert store.completed() == {good.key.id}
    with store.lock():
        removed = store.clean_partial()
    assert removed == 3  # orphan parquet, torn parquet (its JSON is then ignored), temp file
    assert not any(p.name.endswith(".tmp") for p in store.episodes_dir.iterdir())
    assert store.completed() == {good.key.id}


def test_config_mismatch_is_refused_with_reasons(tmp_path):
    ResultsStore.create(tmp_path / "r", CONFIG, [C.baseline().to_dict()], kind="test")
    other = {**CONFIG, "camera_size": 128, "max_steps": 60}
    with pytest.raises(ConfigMismatchError) as err:
        ResultsStore.create(tmp_path / "r", other, [C.baseline().to_dict()], kind="test")
    msg = str(err.value)
    assert "camera_size: 64 in the folder, 128 now" in msg and "max_steps: 50 in the folder, 60 now" in msg
    # a condition name reused with another definition is refused too; new conditions may be added
    changed = C.Condition("baseline", prompt="{instruction} fast")
    with pytest.raises(ConfigMismatchError, match="condition 'baseline'"):
        ResultsStore.create(tmp_path / "r", CONFIG, [changed.to_dict()], kind="test")
    store = ResultsStore.create(tmp_path / "r", CONFIG, [C.prompt_baseline("slow").to_dict()], kind="test")
    assert set(store.manifest["conditions"]) == {"baseline", "prompt:slow"}
    with pytest.raises(ConfigMismatchError, match="kind"):
        ResultsStore.create(tmp_path / "r", CONFIG, [], kind="other")


def test_bad_results_folders(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ResultsError, match="cannot write to results folder"):
        ResultsStore.create(blocker / "sub", CONFIG, [], kind="test")
    with pytest.raises(ResultsError, match="not a folder"):
        ResultsStore.create(blocker, CONFIG, [], kind="test")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ResultsError, match="not an nnsight-vla results folder"):
        ResultsStore.create(foreign, CONFIG, [], kind="test")
    with pytest.raises(ResultsError, match="no manifest.json"):
        ResultsStore.open(foreign)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(ResultsError, match="cannot write"):
            ResultsStore.create(ro / "r", CONFIG, [], kind="test")


def test_lock_refuses_a_second_writer(tmp_path):
    store = ResultsStore.create(tmp_path / "r", CONFIG, [], kind="test")
    with store.lock():
        with pytest.raises(ResultsError, match="another sweep is writing"):
            with ResultsStore(tmp_path / "r").lock():
                pass
    with store.lock():  # released
        pass


def welch_reference(a, b):
    """Welch's t-test written out by hand (the independent reference)."""
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, 2 * stats.t.sf(abs(t), df)


def test_statistics_planted_effect(tmp_path):
    rng = np.random.default_rng(0)
    conds = [C.baseline(), C.steered("fast", Knob(2.0), alpha=10, layers="late")]
    store = ResultsStore.create(tmp_path / "r", CONFIG, [c.to_dict() for c in conds], kind="test")
    truth = {}
    for task in (0, 1):
        for trial in range(4):
            for cond, speed in (("baseline", 0.010), ("fast@a10/late", 0.013)):  # planted +30 %
                jitter = rng.normal(0, 0.001, 30)
                ep = line_episode(EpisodeKey(cond, task, trial), speed, steps=30, jitter=jitter,
                                  success=(trial % 2 == 0))
                store.write_episode(ep)
                truth.setdefault((cond, str(task)), []).append(speed + jitter)
    rows = compare_conditions(store, "disp", "baseline", level="step")
    by = {(r["task"], r["condition"]): r for r in rows}
    for task in ("0", "1", "all"):
        tasks = ("0", "1") if task == "all" else (task,)
        fast = np.concatenate([np.concatenate(truth[("fast@a10/late", t)]) for t in tasks])
        base = np.concatenate([np.concatenate(truth[("baseline", t)]) for t in tasks])
        row = by[(task, "fast@a10/late")]
        assert row["n"] == fast.size and row["n_episodes"] == 4 * len(tasks)
        assert row["mean"] == pytest.approx(fast.mean(), rel=1e-9)
        assert row["pct_change"] == pytest.approx((fast.mean() / base.mean() - 1) * 100, rel=1e-9)
        t, p = welch_reference(fast, base)
        assert row["t_stat"] == pytest.approx(t, rel=1e-9) and row["p_value"] == pytest.approx(p, rel=1e-6)
        assert row["pct_change"] == pytest.approx(30, abs=3) and row["p_value"] < 1e-6
        assert by[(task, "baseline")]["pct_change"] == 0
    # episode level: one sample per episode (the episode mean)
    ep_rows = {(r["task"], r["condition"]): r for r in compare_conditions(store, "disp", level="episode")}
    per_episode = [a.mean() for a in truth[("fast@a10/late", "0")]]
    assert ep_rows[("0", "fast@a10/late")]["n"] == 4
    assert ep_rows[("0", "fast@a10/late")]["mean"] == pytest.approx(np.mean(per_episode), rel=1e-9)
    # success rates: trials 0 and 2 succeed
    sr = {(r["task"], r["condition"]): r for r in success_rates(store)}
    assert sr[("all", "baseline")]["success_rate"] == 0.5 and sr[("0", "baseline")]["episodes"] == 4
    with pytest.raises(ValueError, match="reference condition 'nope'"):
        compare_conditions(store, "disp", "nope")
    with pytest.raises(ValueError, match="unknown metric"):
        compare_conditions(store, "velocity")


def test_plots_from_saved_results(tmp_path):
    from PIL import Image

    from nnsight_vla.reports import plots

    conds = [C.baseline()] + [C.steered("up", Knob(a), alpha=a, layers=l)
                              for a in (2, 8) for l in ("early", "late", "all")]
    store = ResultsStore.create(tmp_path / "r", CONFIG, [c.to_dict() for c in conds], kind="test")
    for i, cond in enumerate(conds):
        for trial in range(2):
            store.write_episode(line_episode(EpisodeKey(cond.name, 0, trial), 0.01 * (1 + i / 4), steps=12 + trial))
    files = plots.plot_all(store, tmp_path / "plots")
    names = {f.name for f in files}
    assert {"displacement_action.png", "displacement_eef.png", "height.png", "alpha_sweep.png",
            "layers_vertical.png"} <= names
    for f in files:
        assert f.stat().st_size > 5000
        img = np.asarray(Image.open(f).convert("L"))
        assert img.std() > 5  # something was drawn
    fig = plots.plot_alpha_sweep(store)  # no path: a Figure comes back
    assert len(fig.axes[0].lines) >= 1


def test_plots_are_never_degenerate_and_say_how_many_episodes_run(tmp_path):
    """One alpha and one layer subset: no alpha-sweep or layer figure (issue 17: a sweep with one alpha is a dot);
    the per-step panel counts the episodes still running; displacement is drawn in mm (stored in metres)."""
    from nnsight_vla.reports import plots

    conds = [C.baseline(), C.steered("up", Knob(2), alpha=2, layers="all")]
    store = ResultsStore.create(tmp_path / "r", CONFIG, [c.to_dict() for c in conds], kind="test")
    for cond in conds:
        for trial, steps in enumerate((8, 12)):
            store.write_episode(line_episode(EpisodeKey(cond.name, 0, trial), 0.01, steps=steps))
    names = {f.name for f in plots.plot_all(store, tmp_path / "plots")}
    assert "alpha_sweep.png" not in names and not any(n.startswith("layers_") for n in names)
    fig = plots.plot_displacement(store, metric="disp")
    twin = [ax for ax in fig.axes if "still running" in ax.get_ylabel()]
    assert twin, "no running-episodes axis"
    running = twin[0].lines[0].get_ydata()
    assert list(running[:8]) == [4] * 8 and list(running[8:12]) == [2] * 4  # 4 episodes, two end at step 8
    mean_line = fig.axes[0].lines[0]
    np.testing.assert_allclose(mean_line.get_ydata()[1:5], 10.0, rtol=1e-6)  # 1 cm per step = 10 mm


def test_action_share_plot_has_the_chance_line_and_the_base(tmp_path):
    import nnsight_vla as nv
    from nnsight_vla.lens import ValueVectorLens
    from nnsight_vla.reports.lens_plots import plot_action_share

    tuned = ValueVectorLens(nv.tiny("openvla", seed=0), k=5, cache_dir=False, progress=False)
    base = ValueVectorLens(nv.tiny("openvla", seed=1), k=5, cache_dir=False, progress=False)
    fig = plot_action_share(tuned, base=base)
    ax = fig.axes[0]
    chance = len(tuned.action_ids) / tuned.vocab_rows
    assert any(np.allclose(l.get_ydata(), chance) for l in ax.lines)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "base checkpoint" in labels and any(l.startswith("chance") for l in labels)


def test_plots_keep_many_conditions_apart(tmp_path):
    """A sweep of 24 conditions: every curve gets its own (colour, dash) style, and the legend does not squeeze
    the axes away (matplotlib warns when constrained layout collapses them: an error here)."""
    import warnings

    from nnsight_vla.reports import plots

    conds = [C.baseline()] + [C.steered(c, Knob(a), alpha=a, layers="all") for c in ("up", "down", "fast", "slow")
                              for a in (1, 2, 4, 8, 10, 16)][:23]
    store = ResultsStore.create(tmp_path / "r", CONFIG, [c.to_dict() for c in conds], kind="test")
    for i, cond in enumerate(conds):
        store.write_episode(line_episode(EpisodeKey(cond.name, 0, 0), 0.01 * (1 + i / 4), steps=10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for plot in (plots.plot_displacement, plots.plot_height):
            fig = plot(store)
            lines = [l for l in fig.axes[0].lines if l.get_label() and not l.get_label().startswith("_")]
            styles = {(tuple(np.round(np.atleast_1d(l.get_color()), 3)) if not isinstance(l.get_color(), str)
                       else l.get_color(), l.get_linestyle()) for l in lines}
            assert len(lines) == len(conds) and len(styles) == len(conds)
            fig.savefig(tmp_path / "p.png")
            assert all(ax.get_position().width > 0.2 for ax in fig.axes)


def test_conditions_behaviour():
    c = C.prompt_baseline("fast")
    assert c.name == "prompt:fast" and c.kind == "prompt"
    assert c.instruction("open the drawer") == "open the drawer fast"
    assert C.baseline().instruction("x") == "x" and C.baseline().kind == "baseline"

    class P:
        gain = 1.0

    p = P()
    s = C.steered("fast", Knob(3.0), alpha=4, layers="late")
    assert s.name == "fast@a4/late" and s.kind == "steered"
    with s.context(p):
        assert p.gain == 3.0
    assert p.gain == 1.0
    with C.baseline().context(p):
        assert p.gain == 1.0
    assert s.to_dict()["steering"] == {"knob": 3.0} and json.dumps(s.to_dict())
    # slugs stay unique for names differing only in characters a file name cannot hold
    assert C.Condition("a/b").slug != C.Condition("a:b").slug
    assert "/" not in C.Condition("fast@a10/late").slug


def test_sweep_grid_and_bad_conditions():
    made = []

    def make(neurons, alpha, layers):
        made.append((neurons, alpha, layers))
        return Knob(alpha)

    grid = C.sweep_grid({"fast": "F", "slow": "S"}, alphas=[2, 10], layers=["early", "late", "all"],
                        controls={"random": "R"}, prompts=["fast"], make_steering=make)
    names = [c.name for c in grid]
    assert names[0] == "baseline" and len(grid) == 1 + 2 * 6 + 6 + 1
    assert "fast@a10/late" in names and "random@a2/early" in names and names[-1] == "prompt:fast"
    assert {c.kind for c in grid} == {"baseline", "steered", "control", "prompt"}
    assert ("R", 10.0, "all") in made
    with pytest.raises(C.ConditionError, match="named 'baseline'"):
        C.check_unique([C.baseline(), C.baseline()])
    with pytest.raises(C.ConditionError, match="template containing"):
        C.Condition("p", prompt="go fast")
    with pytest.raises(C.ConditionError, match=r"not a valid template"):
        C.Condition("p", prompt="{instruction} {speed}")
    with pytest.raises(C.ConditionError, match="lacks apply"):
        C.Condition("s", steering=object())
    with pytest.raises(C.ConditionError, match="non-empty name"):
        C.Condition("")
    with pytest.raises(C.ConditionError, match="no conditions"):
        C.check_unique([])


# -- integrity of stored episodes (issue 15, item 7) ------------------------------------------------------------


def _one_episode_store(tmp_path, trial=0):
    store = ResultsStore.create(tmp_path / "r", CONFIG, [C.baseline().to_dict()], kind="test")
    rec = EpisodeRecorder(EpisodeKey("baseline", 0, trial), (0, 0, 0))
    for i in range(5):
        rec.record((0.01 * (i + 1), 0, 0), [1, 0, 0, 0, 0, 0, -1])
    path = store.write_episode(rec.finish(True))
    return store, path


def test_edited_summary_is_refused(tmp_path):
    store, path = _one_episode_store(tmp_path)
    record = json.loads(path.read_text())
    record["summary"]["success"] = False  # a hand edit
    path.write_text(json.dumps(record))
    with pytest.raises(ResultsError, match="does not match its checksum"):
        store.records()
    assert any("checksum" in p for p in store.verify())


def test_copied_episode_is_not_counted_twice(tmp_path):
    store, path = _one_episode_store(tmp_path)
    copy = path.with_name(EpisodeKey("baseline", 0, 1).id + ".json")
    copy.write_text(path.read_text())
    copy.with_suffix(".parquet").write_bytes(path.with_suffix(".parquet").read_bytes())
    with pytest.raises(ResultsError, match="does not match its episode id"):
        store.summaries()


def test_episode_of_another_configuration_is_refused(tmp_path):
    store, path = _one_episode_store(tmp_path)
    other = ResultsStore.create(tmp_path / "other", {**CONFIG, "max_steps": 99}, [C.baseline().to_dict()],
                                kind="test")
    target = other.episodes_dir / path.name
    target.write_text(path.read_text())
    target.with_suffix(".parquet").write_bytes(path.with_suffix(".parquet").read_bytes())
    with pytest.raises(ResultsError, match="made with config"):
        other.records()


def test_edited_parquet_fails_verify_and_check(tmp_path):
    import pyarrow as pa

    store, path = _one_episode_store(tmp_path)
    steps = path.with_suffix(".parquet")
    table = pq.read_table(steps)
    disp = table.column("disp").to_numpy().copy()
    disp[0] = 9.0  # same number of rows: only the checksum can tell
    pq.write_table(table.set_column(table.schema.get_field_index("disp"), "disp", pa.array(disp)), steps)
    assert len(store.records()) == 1  # cheap reads check rows and records; the checksum needs verify()
    assert any("recorded checksum" in p for p in store.verify())
    with pytest.raises(ResultsError, match="cannot be trusted"):
        store.check()


# -- conditions: one registry of steering kinds, one syntax ---------------------------------------------------


def test_every_steering_kind_round_trips_through_condition_dicts(tmp_path):
    import nnsight_vla as nv
    from nnsight_vla.neurons import NeuronSet
    from nnsight_vla.steering import Steering, SteeringGroup

    vla = nv.tiny("openvla", seed=0)
    a = Steering(NeuronSet.for_model(vla, [(1, 3), (2, 5)], name="fast"), 4.0, layers="late")
    b = Steering(NeuronSet.for_model(vla, [(0, 7)], name="up"), 2.0, mode="add", scale=0.5)
    for steering in (a, SteeringGroup([a, b]), C.SpeedSteering(1.5)):
        cond = C.Condition("x", steering=steering, kind="steered", concept="c", alpha=4.0, layers="late")
        back = C.Condition.from_dict(json.loads(json.dumps(cond.to_dict())))
        assert back.to_dict() == cond.to_dict() and type(back.steering) is type(steering)
    (tmp_path / "conds.json").write_text(json.dumps([C.baseline().to_dict(),
                                                     C.Condition("g", steering=SteeringGroup([a, b])).to_dict()]))
    loaded = C.load_conditions(tmp_path / "conds.json")
    assert [c.name for c in loaded] == ["baseline", "g"] and isinstance(loaded[1].steering, SteeringGroup)
    with pytest.raises(C.ConditionError, match="unknown steering type 'nope'"):
        C.steering_from_dict({"type": "nope"})


def test_condition_syntax_from_the_command_line(tmp_path):
    import nnsight_vla as nv
    from nnsight_vla.errors import InputError
    from nnsight_vla.neurons import NeuronSet
    from nnsight_vla.steering import Steering

    vla = nv.tiny("openvla", seed=0)
    NeuronSet.for_model(vla, [(2, 3), (3, 9)], name="fast").save(tmp_path / "fast.json")
    (tmp_path / "dictionaries.yaml").write_text("up_2:\n  " + str(2 * vla.d_mlp + 4) + ": [up]\n  "
                                                + str(3 * vla.d_mlp + 1) + ": [high]\nblank: {}\n")
    conds = C.parse_conditions(["baseline,prompt:fast", f"steer:{tmp_path}/fast.json@10/late",
                                f"random:{tmp_path}/fast.json@10/late:3", "speed:1.5"])
    names = [c.name for c in conds]
    assert names == ["baseline", "prompt:fast", "fast@a10/late", "random[fast]@a10/late:3", "speed:1.5"]
    steer, control = conds[2].steering, conds[3].steering
    assert isinstance(steer, Steering) and steer.alpha == 10 and steer.layers == "late"
    assert steer.neurons.pairs == ((2, 3), (3, 9)) and control.neurons.pairs != steer.neurons.pairs
    assert [l for l, _ in control.neurons.pairs] == [2, 3]  # matched per layer
    (authors,) = C.parse_conditions([f"steer:{tmp_path}/dictionaries.yaml#up_2@4"], d_mlp=vla.d_mlp)
    assert authors.steering.neurons.pairs == ((2, 4), (3, 1))
    for bad, message in (("steer:x.json", "cannot read condition"), ("prompt:", "non-empty word"),
                         ("speed:fast", "bad speed"), (f"steer:{tmp_path}/fast.json@big", "alpha must be a number"),
                         ("baseline,baseline", "named 'baseline'")):
        with pytest.raises(InputError, match=message):
            C.parse_conditions([bad])


# -- the one sweep loop, every executor --------------------------------------------------------------------------


class LineEnv:
    """A deterministic one-dimensional environment (the gripper moves along x by 1 cm per unit of action)."""

    kind = "line"
    parallel = True

    def __init__(self, trials=2, steps=6):
        self.trials, self.steps = trials, steps

    def bind(self, surface):
        if surface.action_dim < 1:
            raise ValueError("needs actions")

    def identity(self):
        return {"env": "line", "steps": self.steps}

    def episodes(self):
        return [("line", t) for t in range(self.trials)]

    def run_episode(self, policy, condition, task, trial):
        from nnsight_vla.rollout.policy import condition_context

        x = 0.1 * trial
        rec = EpisodeRecorder(EpisodeKey(condition.name, task, trial), (x, 0, 0))
        with condition_context(policy, condition):
            for _ in range(self.steps):
                action = np.asarray(policy.predict_action({"primary": np.zeros((4, 4, 3), np.uint8)},
                                                          condition.instruction("go")))
                x += 0.01 * float(action[0])
                rec.record((x, 0, 0), action, policy_call=True)
        return rec.finish(True)

    def close(self):
        pass


class SpeedPolicy:
    """Action x = speed (1 + 1 if the instruction ends with 'fast'); deterministic, picklable."""

    family, camera_names, state_dim, action_dim, action_horizon = "line", ("primary",), None, 7, 1

    def __init__(self, speed=1.0):
        self.speed = speed

    def to_dict(self):
        return {"class": "SpeedPolicy", "speed": self.speed}

    def predict_action(self, images, instruction, state=None, **kwargs):
        if isinstance(instruction, list):  # a batch (the policy server's batched calls)
            return np.stack([self.predict_action(i, s) for i, s in zip(images, instruction)])
        boost = 2.0 if instruction.endswith("fast") else 1.0
        return np.array([self.speed * boost, 0, 0, 0, 0, 0, -1], np.float32)


@pytest.mark.parametrize("executor", ["inline", "processes", "server", "server-batched"])
def test_sweep_gives_the_same_episodes_under_every_executor(tmp_path, executor):
    from nnsight_vla.rollout.executors import Inline, Processes
    from nnsight_vla.rollout.sweep import run_sweep

    conds = [C.baseline(), C.prompt_baseline("fast"), C.Condition("x2", steering=C.SpeedSteering(2.0))]
    chosen = {"inline": Inline(), "processes": Processes(2), "server": Processes(2, policy_server=True),
              "server-batched": Processes(2, policy_server=True, max_batch=4, max_wait_s=0.02)}[executor]
    report = run_sweep(LineEnv(), SpeedPolicy(), conds, tmp_path / "r", executor=chosen, progress=False)
    assert report.completed == 6 and not report.failed
    store = ResultsStore.open(tmp_path / "r")
    final = {(r["condition"], r["trial"]): r["summary"]["final_pos"][0] for r in store.records()}
    # independent reference: x0 + steps * 1 cm * speed
    expected = {(c, t): 0.1 * t + 6 * 0.01 * k for c, k in (("baseline", 1), ("prompt:fast", 2), ("x2", 2))
                for t in range(2)}
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        assert final[key] == pytest.approx(value, abs=1e-9), key
    assert store.manifest["config"]["policy"] == {"class": "SpeedPolicy", "speed": 1.0}
    # a resume runs nothing; a tampered folder is refused before anything runs
    assert run_sweep(LineEnv(), SpeedPolicy(), conds, tmp_path / "r", progress=False).skipped == 6
    record = next(store.episodes_dir.glob("*.json"))
    record.write_text(record.read_text().replace('"success": true', '"success": false'))
    with pytest.raises(ResultsError, match="cannot be trusted|checksum"):
        run_sweep(LineEnv(), SpeedPolicy(), conds, tmp_path / "r", progress=False)


def test_sweep_refuses_bad_input_before_creating_anything(tmp_path):
    from nnsight_vla.errors import InputError
    from nnsight_vla.rollout.executors import Processes
    from nnsight_vla.rollout.sweep import run_sweep

    with pytest.raises(InputError, match="not a VLA policy"):
        run_sweep(LineEnv(), object(), [C.baseline()], tmp_path / "a", progress=False)
    broken = SpeedPolicy()
    broken.action_horizon = 0  # was silently read as 1
    with pytest.raises(InputError, match="action_horizon must be a positive"):
        run_sweep(LineEnv(), broken, [C.baseline()], tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(InputError, match="workers must be"):
        Processes(0)
    with pytest.raises(InputError, match="no episodes"):
        run_sweep(LineEnv(trials=0), SpeedPolicy(), [C.baseline()], tmp_path / "b", progress=False)
    env = LineEnv()
    env.parallel = False
    with pytest.raises(InputError, match="runs in this process only"):
        run_sweep(env, SpeedPolicy(), [C.baseline()], tmp_path / "c", executor=Processes(1), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_paired_statistics_match_independent_references():
    from nnsight_vla.rollout.stats import holm, paired_test

    rng = np.random.default_rng(3)
    control = rng.normal(10, 2, 40)
    treated = control * 1.2 + rng.normal(0, 0.5, 40)
    out = paired_test(treated, control)
    d = treated - control
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))  # the paired t statistic, by hand
    assert out["t"] == pytest.approx(t) and out["p"] == pytest.approx(2 * stats.t.sf(abs(t), d.size - 1))
    assert out["cohen_dz"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert out["pct"] == pytest.approx(100 * (treated.mean() - control.mean()) / control.mean())
    # a null intervention on a deterministic policy changes nothing: p = 1, not NaN
    same = paired_test(control, control)
    assert same["p"] == 1.0 and same["mean_diff"] == 0.0
    # Holm by hand: sorted p times (m - rank), made monotone
    p = {"fast": 0.001, "slow": 0.02, "high": 0.013, "low": 0.3}
    adjusted = holm(p)
    assert adjusted == pytest.approx({"fast": 0.004, "high": 0.039, "slow": 0.04, "low": 0.3})


def test_a_policy_spec_has_the_identity_of_the_model_it_builds(tmp_path):
    """A results folder must not depend on the executor: the same checkpoint run in-process (a model object) or in
    worker processes (a PolicySpec) is one policy, so a sweep started one way resumes the other way."""
    import nnsight_vla as nv
    from nnsight_vla.rollout.policy import PolicySpec, policy_identity

    model = nv.tiny("openvla", seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = nv.load("openvla", str(tmp_path / "ckpt"), dispatch=True)
    spec = PolicySpec("load", "openvla", source=str(tmp_path / "ckpt"))
    assert policy_identity(spec) == policy_identity(loaded)
    assert policy_identity(PolicySpec("tiny", "openvla", seed=3)) == policy_identity(model)
    assert policy_identity(PolicySpec("tiny", "openvla", seed=4)) != policy_identity(model)
    assert policy_identity(PolicySpec("load", "openvla", source=str(tmp_path / "ckpt"))) != policy_identity(model)
