"""The README's first command, ``nnsight-vla demo``, through the real CLI on the shipped model (short run)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("robosuite")


def test_demo_runs_the_pipeline_and_writes_its_outputs(tmp_path):
    from typer.testing import CliRunner

    from nnsight_vla.cli import app
    from nnsight_vla.neurons import NeuronSet
    from nnsight_vla.rollout.store import ResultsStore

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--trials", "1", "--max-steps", "4",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "disp/step (mm)" in result.output and "baseline" in result.output
    for name in ("RESULTS.md", "results.csv", "results.json", "activation_scale.json", "plots/action_share.png",
                 "plots/tokens_fast.png", "plots/tokens_low.png", "plots/displacement_eef.png", "plots/height.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    alpha = f"{results['alpha']:g}"
    concepts = ("fast", "slow", "high", "low")
    # every steered concept has its own random control and its own prompt baseline (issue 17: controls match)
    assert [r["condition"] for r in results["rows"]] == (
        ["baseline"] + [f"{c}@a{alpha}" for c in concepts] + [f"random[{c}]@a{alpha}" for c in concepts]
        + [f"prompt:{c}" for c in concepts])
    sets = {c: NeuronSet.load(out / "neurons" / f"{c}.json") for c in concepts}
    for c in concepts:
        assert [list(p) for p in sets[c].pairs] == results["neurons"][c]
        control = {tuple(p) for p in results["controls"][c]}
        assert not control & set(sets[c].pairs)
        assert sorted(l for l, _ in control) == sorted(l for l, _ in sets[c].pairs)  # matched per layer
    assert not set(sets["fast"].pairs) & set(sets["slow"].pairs)
    assert not set(sets["high"].pairs) & set(sets["low"].pairs)
    store = ResultsStore.open(out / "episodes")
    records = {r["condition"]: r for r in store.records()}
    assert records["prompt:fast"]["meta"]["instruction"] == records["baseline"]["meta"]["instruction"] + " fast"

    # a second run with the same arguments resumes: nothing is rerun, the same table comes back
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--trials", "1", "--max-steps", "4",
                                     "--no-progress"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
