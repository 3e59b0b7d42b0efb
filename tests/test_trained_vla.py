"""The trained small OpenVLA shipped with the package: real loader, action format, the arm scene, and the
method end to end (lens -> find_concept -> steering -> behaviour) on a model whose concepts are known."""

from __future__ import annotations

import json
import math

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
        assert vla.num_layers == 8 and vla.d_model == 128 and vla.d_mlp == 512
        assert vla.config.token_vocab_size == 1024
    # the fine-tuned model carries OpenVLA's action statistics under one key; fine-tuning changed the weights
    assert list(trained.config.norm_stats) == ["arm_scene"]
    stats = trained.config.norm_stats["arm_scene"]["action"]
    assert len(stats["q01"]) == 7 and stats["mask"][-1] is False
    assert not torch.equal(trained.unembedding(), base.unembedding())
    size = sum(p.stat().st_size for w in ("finetuned", "base") for p in shipped_path(w).iterdir())
    assert size < 30e6  # both checkpoints ship in the wheel (8 layers x 512 MLP, fp32 weights)


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
    """The policy itself learned the words (its demonstrations' idioms) and generalises to single adverbs it
    never acted on: on the same first frames, "fast" asks for a larger step than "slow" and "high" for a larger
    upward step than "low" (actions decoded by the real predict_action)."""
    from nnsight_vla.training.corpus import CANONICAL

    frames = [scene.reset(1000 + i)["image"] for i in range(2)]

    def act(word):
        return np.stack([trained.predict_action(f, f"move the arm to the green block {word}",
                                                restrict_to_action_tokens=True) for f in frames])

    for fast, slow, high, low in ((CANONICAL["fast"], CANONICAL["slow"], CANONICAL["high"], CANONICAL["low"]),
                                  ("rapidly", "gently", "high", "low")):
        a = {w: act(w) for w in (fast, slow, high, low)}
        assert np.linalg.norm(a[fast][:, :3], axis=1).mean() > np.linalg.norm(a[slow][:, :3], axis=1).mean()
        assert a[high][:, 2].mean() > a[low][:, 2].mean()


def test_shipped_policy_does_the_task_in_closed_loop(trained):
    """Steering results mean something only on a policy that works: unsteered, on 16 development scenes, the
    shipped policy reaches the target sometimes and keeps to the demonstrations' heights (measured: success 0.25,
    median highest point 0.16 m; a second training seed of the same recipe: 0.0 and 0.67 m, which the check flags)."""
    from nnsight_vla.training.closed_loop import closed_loop_check

    check = closed_loop_check(trained)
    assert check["healthy"], check
    assert check["success_rate"] >= 0.1 and check["median_max_height_table"] <= 0.33


def test_manner_is_computed_in_the_late_mlps(trained):
    """The pre-registered ablation gate, single step: mean-ablating the late half of the MLPs (activations pinned
    to their mean on neutral instructions, at the action positions) removes at least half of the speed gap between
    "fast" and "slow" demonstration phrases (the shipped model: 100 %), so the concept passes through the FFNs the
    method steers. Compared with decoding the same queries unablated (the gap itself must be there)."""
    from nnsight_vla.causal import ablation_effect
    from nnsight_vla.neurons import layer_subset
    from nnsight_vla.training.gates import concept_phrases, expert_frames, queries

    frames = expert_frames((3000,), steps=(0, 8))
    fast, slow = (queries(frames, concept_phrases(c)[:3]) for c in ("fast", "slow"))
    result = ablation_effect(trained, layer_subset("late", trained.num_layers), fast, slow, queries(frames),
                             summary="speed", restrict_to_action_tokens=True)
    assert result.gap > 0.1, result.to_dict()
    assert result.removed >= 0.5, result.to_dict()


def test_discovered_fast_set_moves_faster_than_slow_set(trained, scene):
    """The method end to end on a few quick rollouts, with the pre-registered discovery and alpha (no neuron is
    chosen by hand): neurons found automatically for "fast" and "slow" (lexicon kNN over the value-vector lens,
    opposites filter), steered at 4 x p99 on a NEUTRAL instruction, change the measured per-step displacement in
    the predicted direction."""
    from nnsight_vla.envs.arm_scene import ArmRolloutConfig, run_episode
    from nnsight_vla.lens import ValueVectorLens
    from nnsight_vla.rollout.conditions import steered
    from nnsight_vla.scale import measure_activation_scale
    from nnsight_vla.steering import Steering
    from nnsight_vla.training.corpus import TASK_BASES
    from nnsight_vla.training.experiment import ExperimentConfig, discover
    from nnsight_vla.training.gates import expert_frames, queries

    config = ExperimentConfig(layer_subsets=())
    lens = ValueVectorLens(trained, k=config.lens_k, cache_dir=False, progress=False)
    sets = discover(lens, config)["all"]
    # the discovered vectors promote speed words (a sanity check of the lens + clustering)
    tops = {t.strip("▁") for l, n in sets["fast"].pairs for t in lens.vector_tokens(l, n, k=5)}
    assert tops & (FAST_WORDS | SLOW_WORDS)
    scale = measure_activation_scale(trained, queries(expert_frames(config.gate_frames[:2])),
                                     percentile=config.percentile, restrict_to_action_tokens=True)
    rollout = ArmRolloutConfig(instructions=TASK_BASES, trials=3, max_steps=12,
                               image_size=int(trained.image_processor.image_size[0]))
    disp = {}
    for name in ("fast", "slow"):
        cond = steered(name, Steering(sets[name], config.alpha, scale=scale), alpha=config.alpha, layers="all")
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
def test_quick_experiment_writes_its_report(tmp_path):
    """The pre-registered experiment's pipeline on a small configuration: every criterion is computed for every
    concept (their outcome is a measurement reported in results.json, not asserted here) and the report is
    written."""
    from nnsight_vla.training.experiment import CONCEPTS, ExperimentConfig, run_experiment

    results = run_experiment(tmp_path / "exp", ExperimentConfig.quick(), progress=False)
    for name in ("results.json", "RESULTS.md", "gates.json", "activation_scale.json"):
        assert (tmp_path / "exp" / name).is_file(), name
    data = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert set(data["analysis"]["criteria"]) == set(CONCEPTS)
    for concept in CONCEPTS:
        v = data["analysis"]["concepts"][concept]
        assert len(v["random_pct"]) == 2 and math.isfinite(v["pct"])
    assert results["episodes"]["main"]["total"] == 3 * (1 + 4 + 4) and results["complete"]
    assert "INTERIM" not in (tmp_path / "exp" / "RESULTS.md").read_text()

    # analysing the finished folder again runs nothing and gives the same analysis
    again = run_experiment(tmp_path / "exp", ExperimentConfig.quick(), progress=False, rollouts=False)
    assert again["analysis"] == json.loads(json.dumps(results["analysis"])) and again["complete"]
    assert again["episodes"]["main"]["completed"] == 0
    # an interrupted run (some episodes missing) is analysed on what is there and says so
    records = sorted((tmp_path / "exp" / "episodes_random" / "episodes").glob("random*.json"))
    assert records, "the random sets' episodes are committed as JSON records beside their Parquet steps"
    for path in records[-1].parent.glob(records[-1].stem + ".*"):  # as if that episode had never run
        path.unlink()
    interim = run_experiment(tmp_path / "exp", ExperimentConfig.quick(), progress=False, rollouts=False)
    assert not interim["complete"]
    assert "INTERIM" in (tmp_path / "exp" / "RESULTS.md").read_text()
