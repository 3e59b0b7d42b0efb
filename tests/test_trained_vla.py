"""The trained small OpenVLA shipped with the package: real loader, action format, the arm scene, and the
method end to end (lens -> find_concept -> steering -> behaviour) on a model whose concepts are known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnsight_vla.training import shipped_model, shipped_path

pytest.importorskip("robosuite")

FAST_WORDS = {"fast", "quick", "quickly", "rapid", "rapidly", "swift", "swiftly", "speedy", "speedily"}
SLOW_WORDS = {"slow", "slowly", "careful", "carefully", "gentle", "gently", "steady", "steadily", "calm"}


@pytest.fixture(scope="module")
def trained():
    return shipped_model("finetuned", dispatch=True)


@pytest.fixture(scope="module")
def scene(trained):
    from nnsight_vla.envs.arm_scene import ArmScene, SceneConfig

    s = ArmScene(SceneConfig(image_size=int(trained.image_processor.image_size[0])))
    yield s
    s.close()


def test_shipped_weights_load_through_the_real_loader(trained):
    """Both checkpoints load with nv.load; their tensors equal the raw safetensors files (read independently)."""
    from safetensors.torch import load_file

    base = shipped_model("base", dispatch=True)
    for vla, which in ((trained, "finetuned"), (base, "base")):
        folder = shipped_path(which)
        raw = {}
        for f in sorted(folder.glob("*.safetensors")):
            raw.update(load_file(str(f)))
        # the language model keeps its names in the published layout: compare a few tensors exactly
        for name in ("language_model.lm_head.weight", "language_model.model.layers.0.mlp.down_proj.weight",
                     "language_model.model.embed_tokens.weight"):
            loaded = vla._module.get_parameter(name)
            assert loaded.dtype == torch.float32
            assert torch.equal(loaded, raw[name].float()), name
        assert vla.num_layers == 6 and vla.d_model == 128 and vla.d_mlp == 384
        assert vla.config.token_vocab_size == 1024
    # the fine-tuned model carries OpenVLA's action statistics under one key; fine-tuning changed the weights
    assert list(trained.config.norm_stats) == ["arm_scene"]
    stats = trained.config.norm_stats["arm_scene"]["action"]
    assert len(stats["q01"]) == 7 and stats["mask"][-1] is False
    assert not torch.equal(trained.unembedding(), base.unembedding())
    size = sum(p.stat().st_size for w in ("finetuned", "base") for p in shipped_path(w).iterdir())
    assert size < 20e6


def test_concept_words_are_single_tokens(trained):
    from nnsight_vla.training.corpus import all_concept_words, check_single_tokens

    assert check_single_tokens(trained.tokenizer, all_concept_words()) == {}
    # and OpenVLA's prompt tokenizes word by word (the last word is not fused with "?\nOut:")
    ids, _ = trained.prepare(np.zeros((64, 64, 3), np.uint8), "move the arm to the green block fast")
    tokens = trained.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert "▁fast" in tokens and tokens[-1] == "▁"


def test_action_tokens_round_trip_through_the_model_decoder(trained):
    """Training-side normalisation + tokenisation, decoded by the model's own ActionBins, returns the action
    within one bin (computed here from q01/q99 directly)."""
    from nnsight_vla.training.actions import normalize, to_tokens

    stats = trained.config.norm_stats["arm_scene"]
    s = stats["action"]
    rng = np.random.default_rng(0)
    low, high = np.asarray(s["q01"]), np.asarray(s["q99"])
    actions = low + rng.uniform(0, 1, (50, 7)) * (high - low)
    actions[:, 6] = -1.0  # gripper open, as in the scene
    tokens = to_tokens(normalize(actions, stats), trained.config.token_vocab_size)
    assert np.all(np.isin(tokens, trained.action_token_ids))
    decoded = np.stack([trained.bins.decode(t, "arm_scene") for t in tokens])
    bin_width = (high - low) * (2 / 255) / 2
    assert np.all(np.abs(decoded[:, :6] - actions[:, :6]) <= bin_width[:6] + 1e-9)
    assert np.allclose(decoded[:, 6], -1.0, atol=2 / 255)


def test_scripted_expert_behaviour_matches_the_words():
    """The demonstrator (no model): fast > slow per-step displacement, high > low transport height."""
    from nnsight_vla.envs.arm_scene import HEIGHTS, SPEEDS, ArmScene, ScriptedExpert, SceneConfig, run_expert_episode

    scene = ArmScene(SceneConfig(), render=False)
    try:
        out = {}
        for name, speed, height in (("fast", "fast", "medium"), ("slow", "slow", "medium"),
                                    ("high", "medium", "high"), ("low", "medium", "low")):
            r = run_expert_episode(scene, ScriptedExpert(speed=SPEEDS[speed], height=HEIGHTS[height]), seed=3)
            assert r["success"], name
            p = r["positions"]
            out[name] = (np.linalg.norm(np.diff(p, axis=0), axis=1).mean(), p[:, 2].max() - scene.table_z)
    finally:
        scene.close()
    assert out["fast"][0] > 1.8 * out["slow"][0]
    assert out["high"][1] > out["low"][1] + 0.1


def test_trained_policy_follows_instruction_words(trained, scene):
    """The policy itself learned the words: on the same first frame, 'fast' asks for a larger step than
    'slow' and 'high' for a larger upward step than 'low' (actions decoded by the real predict_action)."""
    frame = scene.reset(1000)["image"]
    act = {w: trained.predict_action(frame, f"move the arm to the green block {w}", restrict_to_action_tokens=True)
           for w in ("fast", "slowly", "up high", "low")}
    assert np.linalg.norm(act["fast"][:3]) > np.linalg.norm(act["slowly"][:3])
    assert act["up high"][2] > act["low"][2]


def test_discovered_fast_set_moves_faster_than_slow_set(trained, scene, tmp_path):
    """The method end to end on a few quick rollouts: neurons found automatically for "fast" and "slow"
    (kNN over the value-vector lens), steered on a NEUTRAL instruction, change the measured per-step
    displacement in the predicted direction."""
    from nnsight_vla.concepts import find_opposites
    from nnsight_vla.envs.arm_scene import ArmRolloutConfig, run_episode
    from nnsight_vla.rollout.conditions import steered
    from nnsight_vla.lens import ValueVectorLens
    from nnsight_vla.steering import Steering
    from nnsight_vla.training.experiment import ExperimentConfig
    from nnsight_vla.training.corpus import TASK_BASES

    config = ExperimentConfig()
    lens = ValueVectorLens(trained, k=10, cache_dir=False, progress=False)
    fast, slow = find_opposites(lens, ("fast", "slow"), size=config.size, k_neighbors=config.k_neighbors)
    # the discovered vectors promote speed words (a sanity check of the lens + clustering)
    tops = {t.strip("▁") for l, n in fast.pairs for t in lens.vector_tokens(l, n, k=5)}
    assert tops & (FAST_WORDS | SLOW_WORDS)
    rollout = ArmRolloutConfig(instructions=TASK_BASES, trials=3, max_steps=12,
                               image_size=int(trained.image_processor.image_size[0]))
    disp = {}
    for name, nset in (("fast", fast), ("slow", slow)):
        cond = steered(name, Steering(nset, alpha=config.alpha), alpha=config.alpha, layers="all")
        disp[name] = [run_episode(trained, scene, cond, trial, rollout).summary["mean_disp"] for trial in range(3)]
    assert np.mean(disp["fast"]) > np.mean(disp["slow"]), disp


@pytest.mark.slow
def test_training_is_reproducible(tmp_path):
    """Two quick trainings with the same seed give bit-identical checkpoints."""
    from nnsight_vla.training.train import TrainConfig, train

    digests = []
    for run in range(2):
        log = train(tmp_path / f"run{run}", TrainConfig.quick(seed=0), work=tmp_path / "work", progress=False)
        digests.append(log["final"]["digests"])
    assert digests[0] == digests[1]


@pytest.mark.slow
def test_full_experiment(tmp_path):
    """The whole experiment (all conditions, 20 episodes each) writes its tables and plots; the criteria are
    computed (their outcome is a measurement, reported in results.json, not asserted here) and the key
    fast-vs-slow effect has the predicted sign."""
    from nnsight_vla.training.experiment import ExperimentConfig, run_experiment

    results = run_experiment(tmp_path / "exp", ExperimentConfig(), progress=False)
    for name in ("results.json", "results.csv", "RESULTS.md", "plots/key_effects.png"):
        assert (tmp_path / "exp" / name).is_file(), name
    data = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert {"fast_vs_slow", "high_vs_low", "random_controls_null"} <= set(data["criteria"])
    assert all(r["episodes"] == 20 for r in data["rows"])
    assert results["tests"]["fast_vs_slow"]["diff"] > 0
