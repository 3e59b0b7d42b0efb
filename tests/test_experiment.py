"""The experiment around the trained VLA: the replication report (a pre-registered criterion counts as met only
where every training seed meets it) and the order its conditions run in."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nnsight_vla.cli import app
from nnsight_vla.training.report import replication_markdown

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "trained_vla" / "results.json"


@pytest.fixture(scope="module")
def seed0() -> dict:
    return json.loads(RESULTS.read_text())


def _row(text: str, section: str, concept: str) -> list[str]:
    body = text.split(section, 1)[1]
    line = next(l for l in body.splitlines() if l.startswith(f"| {concept} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_a_criterion_holds_only_if_it_holds_on_every_run(seed0):
    other = copy.deepcopy(seed0)
    # seed 0 measured: fast meets direction/size and misses growth with alpha. Make the second run the opposite.
    other["analysis"]["criteria"]["fast"]["direction_and_size"] = False
    other["analysis"]["criteria"]["fast"]["grows_with_alpha"] = True
    text = replication_markdown({"seed 0": seed0, "seed 1": other})
    assert "INTERIM" not in text
    other["complete"] = False
    text = replication_markdown({"seed 0": seed0, "seed 1": other})
    assert "**seed 1 is INTERIM**" in text and "seed 0 is INTERIM" not in text
    cells = _row(text, "## Criteria", "fast")
    assert cells[1] == "**no** (seed 0 only)"          # direction and size
    assert cells[2] == "yes"                           # significance: both runs
    assert cells[6] == "**no** (seed 1 only)"          # grows with alpha
    assert cells[7] == "**no**"                        # success: neither
    # the same report from identical runs equals seed 0's own verdicts
    same = _row(replication_markdown({"a": seed0, "b": seed0}), "## Criteria", "low")
    own = seed0["analysis"]["criteria"]["low"]
    assert [c == "yes" for c in same[1:]] == [own[k] for k in ("direction_and_size", "significant_holm",
                                                               "other_metric_unchanged", "beyond_every_random_set",
                                                               "random_median_small", "grows_with_alpha",
                                                               "success_within_20_points")]


def test_runs_with_different_preregistered_settings_are_refused(seed0):
    other = copy.deepcopy(seed0)
    other["config"]["alpha"] = 8.0
    with pytest.raises(ValueError, match="same pre-registered settings"):
        replication_markdown({"seed 0": seed0, "seed 1": other})
    with pytest.raises(ValueError, match="at least two"):
        replication_markdown({"seed 0": seed0})


def test_replication_command(tmp_path, seed0):
    for name in ("s0", "s1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(seed0))
    out = tmp_path / "REPLICATION.md"
    result = CliRunner().invoke(app, ["replication", f"seed 0={tmp_path / 's0'}", f"seed 1={tmp_path / 's1'}",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("# Replication across training seeds")
    bad = CliRunner().invoke(app, ["replication", f"seed 0={tmp_path / 's0'}", f"{tmp_path / 's1'}"])
    assert bad.exit_code != 0 and "LABEL=FOLDER" in bad.output
    missing = CliRunner().invoke(app, ["replication", f"a={tmp_path / 's0'}", f"b={tmp_path / 'none'}"])
    assert missing.exit_code != 0 and "does not exist" in missing.output


def test_the_primary_comparison_is_a_first_stage_and_nothing_is_lost():
    """Sweeps are trial-major, so the primary comparison (no steering, or the declared alpha on all layers) must be
    its own first stage to be complete when a run is interrupted; the two stages hold every condition once."""
    from nnsight_vla.neurons import NeuronSet
    from nnsight_vla.rollout.conditions import baseline
    from nnsight_vla.training.experiment import CONCEPTS, ExperimentConfig, build_conditions, primary_first

    config = ExperimentConfig(alpha=4.0, sweep=(1.0, 2.0, 8.0), random_sets=3, layer_subsets=("early", "late"))
    sets = {layers: {c: NeuronSet(((1, i), (6, 10 + i)), d_mlp=512, num_layers=8, name=c)
                     for i, c in enumerate(CONCEPTS)} for layers in ("all", "early", "late")}
    main, controls = build_conditions(sets, 1.0, config)
    first, rest = primary_first(main, config)
    assert sorted(c.name for c in first) == sorted(["baseline", *(f"prompt:{c}" for c in CONCEPTS),
                                                    *(f"{c}@a4/all" for c in CONCEPTS)])
    assert len(rest) == 4 * 3 + 2 * 4 and not {c.name for c in first} & {c.name for c in rest}
    first, rest = primary_first([baseline()] + controls, config)
    assert first[0].name == "baseline" and len(first) == 1 + 4 * 3
    assert all(c.alpha == 4.0 for c in first[1:]) and all(c.alpha != 4.0 for c in rest)
    assert len(first) + len(rest) == 1 + 4 * 4 * 3
    short = ExperimentConfig(alpha=4.0, sweep=(), layer_subsets=())  # nothing but the primary comparison
    assert len(primary_first(build_conditions(sets, 1.0, short)[0], short)) == 1


def test_analysing_a_folder_of_another_setup_is_refused(tmp_path):
    """--analyse-only runs nothing, so it must check itself that the folder's episodes are this experiment's:
    another environment/model config or another definition of a condition is a clear error; a match counts the
    episodes present."""
    from types import SimpleNamespace

    from nnsight_vla.errors import ResultsError
    from nnsight_vla.rollout.conditions import baseline, prompt_baseline
    from nnsight_vla.rollout.store import ResultsStore
    from nnsight_vla.training.experiment import _episodes_present

    env = SimpleNamespace(kind="arm_scene", identity=lambda: {"scene": 1},
                          episodes=lambda: [("arm_reach", 0), ("arm_reach", 1)])
    policy = SimpleNamespace(identity=lambda: {"model": "seed 1"})
    ResultsStore.create(tmp_path, {"scene": 1, "policy": {"model": "seed 1"}},
                        [baseline().to_dict(), prompt_baseline("fast").to_dict()], kind="arm_scene")
    report = _episodes_present(tmp_path, env, policy, [baseline(), prompt_baseline("fast")])
    assert (report["total"], report["skipped"], report["completed"]) == (4, 0, 0)
    other_model = SimpleNamespace(identity=lambda: {"model": "seed 0"})
    with pytest.raises(ResultsError, match="another model or setup"):
        _episodes_present(tmp_path, env, other_model, [baseline()])
    with pytest.raises(ResultsError, match="another model or setup"):
        _episodes_present(tmp_path, SimpleNamespace(**{**vars(env), "kind": "libero"}), policy, [baseline()])
    with pytest.raises(ResultsError, match="another definition"):
        _episodes_present(tmp_path, env, policy, [prompt_baseline("slow", name="prompt:fast")])
