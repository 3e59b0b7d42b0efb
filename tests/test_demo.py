"""The README's first command, ``nnsight-vla demo``, through the real CLI on the shipped model (short run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("robosuite")


def test_demo_runs_the_pipeline_and_writes_its_outputs(tmp_path):
    from typer.testing import CliRunner

    from nnsight_vla.cli import app
    from nnsight_vla.envs.episodes import ResultsStore
    from nnsight_vla.neurons import NeuronSet

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--trials", "1", "--max-steps", "4",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "disp/step (mm)" in result.output and "baseline" in result.output
    for name in ("RESULTS.md", "results.csv", "results.json", "plots/key_effects.png", "plots/action_share.png",
                 "plots/tokens_fast.png", "plots/displacement_eef.png", "plots/height.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert [r["condition"] for r in results["rows"]] == ["baseline", "fast@a10/all", "slow@a10/all",
                                                        "random[fast]@a10/all", "prompt:fast"]
    # the saved neuron sets are the ones reported, disjoint, and the control avoids both
    fast = NeuronSet.load(out / "neurons" / "fast.json")
    slow = NeuronSet.load(out / "neurons" / "slow.json")
    assert [list(p) for p in fast.pairs] == results["neurons"]["fast"]
    assert not set(fast.pairs) & set(slow.pairs)
    assert not {tuple(p) for p in results["control"]} & (set(fast.pairs) | set(slow.pairs))

    # same scene seed, same instruction: a steered run's actions differ from the baseline's only through the
    # edit, and the prompt baseline's instruction carries the word
    store = ResultsStore(out / "episodes")
    actions = {}
    for cond in ("baseline", "fast@a10/all", "slow@a10/all"):
        table = store.steps(conditions=[cond]).to_pandas()
        actions[cond] = np.stack(table["action"].to_numpy())
    # (actions are binned: at this alpha the "slow" set changes them from the first step on; see the README)
    assert not np.allclose(actions["baseline"][0], actions["slow@a10/all"][0])
    assert not np.allclose(actions["fast@a10/all"], actions["slow@a10/all"])
    records = {r["condition"]: r for r in store.records()}
    assert records["prompt:fast"]["meta"]["instruction"] == records["baseline"]["meta"]["instruction"] + " fast"

    # a second run with the same arguments resumes: nothing is rerun, the same table comes back
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--trials", "1", "--max-steps", "4",
                                     "--no-progress"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
