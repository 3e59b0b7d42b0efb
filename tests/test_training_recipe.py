"""Training-recipe options of the small OpenVLA: teacher-forcing input noise in phase 2 and starting phase 2 from a
saved base (checked against the whole run in the slow suite)."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from nnsight_vla.errors import InputError
from nnsight_vla.training import shipped_model
from nnsight_vla.training.actions import dataset_statistics, normalize, to_tokens
from nnsight_vla.training.language import IGNORE
from nnsight_vla.training.train import BASE_NAME, TrainConfig, check_base_run, weights_digest


@pytest.fixture(scope="module")
def vla():
    return shipped_model("finetuned", dispatch=True)


def _demos(vla, steps: int = 40) -> dict:
    rng = np.random.default_rng(0)
    size = int(vla.image_processor.image_size[0])
    actions = rng.normal(0, 0.4, size=(steps, 7)).astype(np.float32)
    actions[:, 3:6] = 0.0
    actions[:, 6] = -1.0
    return {"images": rng.integers(0, 255, (steps, size, size, 3), dtype=np.uint8), "actions": actions,
            "episode": np.repeat(np.arange(4), steps // 4).astype(np.int32),
            "episodes": [{"instruction": "reach the green block"} for _ in range(4)]}


def _action_positions(labels):
    """(row, column) of the 7 labelled action tokens of each row (the </s> label after them excluded)."""
    first = (labels != IGNORE).float().argmax(1)
    return first[:, None] + np.arange(7)[None]


@pytest.mark.parametrize("noise", [0.0, 0.6])
def test_input_noise_replaces_inputs_with_other_steps_tokens_and_keeps_labels(vla, noise):
    from nnsight_vla.training.finetune import ActionBatches

    demos = _demos(vla)
    stats = dataset_statistics(demos["actions"], 4)
    tokens = to_tokens(normalize(demos["actions"], stats), vla.config.token_vocab_size)  # reference, per step
    data = ActionBatches(vla, demos, stats, seed=1, input_noise=noise)
    ids, _, labels = data.batch(64)
    cols = _action_positions(labels)
    given = ids.gather(1, cols).numpy()
    wanted = labels.gather(1, cols).numpy()
    assert {tuple(r) for r in wanted} <= {tuple(r) for r in tokens}  # the labels are whole, real steps
    if noise == 0:
        assert np.array_equal(given, wanted)
        return
    varying = [d for d in range(7) if len(set(tokens[:, d])) > 1]
    changed = (given != wanted)[:, varying]
    assert 0.35 < changed.mean() < 0.7, changed.mean()  # ~noise, less the donors that carry the same token
    for d in range(7):
        assert set(given[:, d]) <= set(tokens[:, d]), d  # a replacement is that dimension's token of some step


def test_input_noise_leaves_evaluation_batches_alone(vla):
    from nnsight_vla.training.finetune import ActionBatches

    demos = _demos(vla)
    data = ActionBatches(vla, demos, dataset_statistics(demos["actions"], 4), input_noise=0.9)
    ids, _, labels = data.batch(0, rows=np.arange(10))
    cols = _action_positions(labels)
    assert np.array_equal(ids.gather(1, cols).numpy(), labels.gather(1, cols).numpy())


def test_input_noise_must_be_a_probability(vla):
    from nnsight_vla.training.finetune import ActionBatches

    demos = _demos(vla)
    with pytest.raises(ValueError, match="probability"):
        ActionBatches(vla, demos, dataset_statistics(demos["actions"], 4), input_noise=1.0)


def _finished_run(folder, config: TrainConfig):
    base = folder / BASE_NAME
    base.mkdir(parents=True)
    (base / "model.safetensors").write_bytes(b"weights")
    log = {"config": asdict(config), "final": {"digests": {"base": weights_digest(base)}}}
    (folder / "training_log.json").write_text(json.dumps(log))
    return folder


def test_starting_from_a_saved_base_is_refused_unless_it_is_this_runs_base(tmp_path):
    saved = _finished_run(tmp_path / "run", TrainConfig(seed=1))
    mine = TrainConfig(seed=1, phase2_seed=1, action_input_noise=0.5, phase2_steps=10)
    assert check_base_run(saved, mine)["config"]["seed"] == 1  # differs in phase-2 fields only: accepted

    with pytest.raises(InputError, match="phase2-seed"):
        check_base_run(saved, TrainConfig(seed=1))
    with pytest.raises(InputError, match="seed"):
        check_base_run(saved, TrainConfig(seed=2, phase2_seed=1))
    with pytest.raises(InputError, match="phase1_steps"):
        check_base_run(saved, TrainConfig(seed=1, phase2_seed=1, phase1_steps=10))
    (saved / BASE_NAME / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(InputError, match="changed"):
        check_base_run(saved, mine)
    with pytest.raises(InputError, match="no finished training run"):
        check_base_run(tmp_path / "nothing", mine)


@pytest.mark.slow
def test_phase2_from_a_saved_base_equals_the_whole_run(tmp_path):
    """With a phase-2 seed, a run that takes phases 0-1b from a finished run writes the same fine-tuned weights,
    bit for bit, as the whole run."""
    from nnsight_vla.training.train import train

    config = TrainConfig.quick(seed=0)
    config.phase2_seed, config.action_input_noise, config.closed_loop_trials = 3, 0.5, 0
    whole = train(tmp_path / "whole", config, work=tmp_path / "work", progress=False)
    resumed = train(tmp_path / "resumed", config, work=tmp_path / "work", progress=False,
                    from_base=tmp_path / "whole")
    assert resumed["from_base"]["digest"] == whole["final"]["digests"]["base"]
    assert resumed["final"]["digests"] == whole["final"]["digests"]
    assert resumed["manner_accuracy"] == whole["manner_accuracy"]  # measured on the base, not on fresh weights
    assert [r for r in resumed["records"] if r.get("phase") == 0] == [r for r in whole["records"]
                                                                        if r.get("phase") == 0]


def test_ordinary_demonstrations_keep_their_cache_key():
    """Adding the recovery field left the ordinary plans' rendered cache valid: the key of the shipped run's
    demonstrations is the one its training log recorded (demos_e4a0fc6ebd77.npz, seed 0, 360 episodes)."""
    from nnsight_vla.training.demos import physical_plan, plan_demos
    from nnsight_vla.training.train import _demo_cache_key

    plans = plan_demos(360, seed=0, noise=0.3)
    assert all("lift" not in physical_plan(p) for p in plans)
    assert _demo_cache_key(plans, 64, 60) == "e4a0fc6ebd77"


def test_recovery_plans_start_above_and_follow_the_ordinary_ones():
    from nnsight_vla.training.demos import physical_plan, plan_demos, plan_recovery_demos
    from nnsight_vla.training.train import _demo_cache_key

    plans = plan_recovery_demos(30, seed=1, first_index=360, lift=(0.15, 0.5))
    assert [p.index for p in plans] == list(range(360, 390))
    assert all(0.15 <= p.lift <= 0.5 for p in plans) and len({p.lift for p in plans}) == 30
    assert {(p.speed, p.height) for p in plans[:9]} == {(s, h) for s in ("slow", "medium", "fast")
                                                         for h in ("low", "medium", "high")}
    assert all("lift" in physical_plan(p) for p in plans)
    assert _demo_cache_key(plans, 64, 60) != _demo_cache_key(plan_demos(30, seed=1), 64, 60)


def test_the_expert_comes_down_from_a_lifted_start():
    """A recovery episode starts ``lift`` above the ordinary start (measured by the scene, not the plan), the
    expert's first commands go down, and it still reaches the target."""
    pytest.importorskip("robosuite")
    from nnsight_vla.envs.arm_scene import ArmScene, SceneConfig
    from nnsight_vla.training.demos import _run_episode, plan_recovery_demos

    plan = plan_recovery_demos(1, seed=0, lift=(0.3, 0.3001))[0]
    scene = ArmScene(SceneConfig(image_size=64))
    try:
        usual = scene.reset(plan.scene_seed)["eef_pos"]
        lifted = scene.reset(plan.scene_seed, lift=plan.lift)["eef_pos"]
        assert lifted[2] - usual[2] == pytest.approx(plan.lift, abs=5e-3)
        assert lifted[:2] == pytest.approx(usual[:2], abs=5e-3)
        episode = _run_episode(scene, plan, max_steps=80)
    finally:
        scene.close()
    assert (episode["actions"][:5, 2] < 0).all()
    assert episode["eef"][0][2] == pytest.approx(lifted[2], abs=1e-6)
    assert episode["success"]
