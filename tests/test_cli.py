"""The command line: every option described, one-line errors with their branch's exit code, bad input refused
before any work, the lens / concepts / LIBERO commands end to end on tiny models, and a quick ``--help``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from nnsight_vla.cli import app
from nnsight_vla.neurons import NeuronSet

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _commands(group, prefix: str = ""):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer ships its own click)
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_command_and_option_is_described():
    root = typer.main.get_command(app)
    commands = list(_commands(root))
    assert {"lens", "concepts", "demo", "libero run", "libero report", "ur5 run", "remote check", "train"} <= \
        {name for name, _ in commands}
    for name, command in commands:
        assert command.help, f"{name} has no description"
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help and param.help.strip(), f"{name} --{param.name} has no description"
            if param.param_type_name == "argument":
                assert getattr(param, "help", None), f"{name} {param.name} has no description"
    help_text = invoke("demo", "--help").output
    assert "--no-progress" in help_text and "--no-no-progress" not in help_text


def test_every_command_renders_its_help():
    """--help of every command and group renders (a bracket in a help text once broke rich's markup)."""
    root = typer.main.get_command(app)
    for name, _ in _commands(root):
        result = invoke(*name.split(), "--help")
        assert result.exit_code == 0, (name, result.output, result.exception)
        assert "Usage:" in result.output


def test_help_is_quick_and_python_m_is_the_same_app():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "nnsight_vla", "--help"], capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0 and "lens-diff" in out.stdout and "libero" in out.stdout
    # nothing heavy is imported for --help (torch / nnsight load inside the commands)
    probe = subprocess.run([sys.executable, "-c", "import sys, nnsight_vla.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr
    print(f"\npython -m nnsight_vla --help: {elapsed:.2f} s")


def test_errors_are_one_line_with_their_exit_code(tmp_path):
    result = invoke("info", "--family", "rt-2")
    assert result.exit_code == 2 and result.output.startswith("error: unknown VLA family")
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = invoke("info", "--source", str(tmp_path / "missing"))
    assert result.exit_code == 3 and "error:" in result.output and "Traceback" not in result.output


def test_bad_input_is_refused_before_any_work(tmp_path):
    result = invoke("lens", "--neuron", "-5")
    assert result.exit_code == 2 and "--neuron" in result.output and "greater than or equal to 0" in result.output
    result = invoke("demo", "--alpha", "nan", "--out", str(tmp_path / "d"))
    assert result.exit_code == 2 and "--alpha must be a finite number" in result.output
    assert not (tmp_path / "d").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("do not touch")
    result = invoke("demo", "--out", str(mine))
    assert result.exit_code == 2 and "not written by the demo" in result.output
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    result = invoke("concepts", "fast", "--out", str(tmp_path / "fast.txt"))
    assert result.exit_code == 2 and "must end in .json or .yaml" in result.output
    result = invoke("libero", "run", str(tmp_path / "r"), "--tiny", "--scripted")
    assert result.exit_code == 2 and "choose exactly one policy" in result.output


def test_lens_and_lens_diff(tmp_path):
    out = tmp_path / "top.parquet"
    result = invoke("lens", "--layer", "1", "--show", "2", "--out", str(out), "--plot", str(tmp_path / "share.png"),
                    "--cache-dir", str(tmp_path / "c"), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "tiny RANDOM openvla" in result.output  # the banner says which model this is
    assert "L  1 N     0:" in result.output and "action-token share" in result.output
    assert out.exists() and (tmp_path / "share.png").exists()
    result = invoke("lens-diff", "--no-progress")
    assert result.exit_code == 2 and "--base" in result.output


def test_concepts_writes_sets_and_warns_on_a_random_model(tmp_path):
    out = tmp_path / "sets" / "up.yaml"
    with pytest.warns(UserWarning, match="RANDOM model"):
        result = invoke("concepts", "up", "--opposite", "down", "--method", "keyword", "--size", "3", "--layers",
                        "2,3", "--control", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                        "--no-progress")
    assert result.exit_code == 0, result.output
    sets = [NeuronSet.load(out.with_name(name)) for name in ("up.yaml", "up_down.yaml", "up_random.yaml")]
    assert [len(s) for s in sets] == [3, 3, 3] and all(set(s.layers) <= {2, 3} for s in sets)
    assert not set(sets[0].pairs) & set(sets[1].pairs)


def test_conditions_syntax_is_printed():
    result = invoke("conditions")
    assert result.exit_code == 0 and "steer:FILE[#KEY]@ALPHA" in result.output


@pytest.mark.skipif(not os.environ.get("MUJOCO_GL"), reason="LIBERO needs MUJOCO_GL (egl) for headless rendering")
def test_libero_run_and_report(tmp_path):
    pytest.importorskip("libero.libero")
    result = invoke("libero", "run", str(tmp_path / "r"), "--tasks", "0", "--trials", "1", "--scripted",
                    "--condition", "prompt:fast", "--max-steps", "5", "--camera-size", "64", "--offsamples", "0",
                    "--no-hard-reset", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "2 episodes run" in result.output
    result = invoke("libero", "report", str(tmp_path / "r"), "--metric", "disp")
    assert result.exit_code == 0, result.output
    assert "success rate" in result.output and "prompt:fast" in result.output and "pct_change" in result.output
    assert list((tmp_path / "r" / "plots").glob("*.png"))


def test_libero_paper_dry_run_counts_the_grid(tmp_path):
    """The paper's sweep (3 concepts x 2 sizes x 6 alphas on all layers + baseline) is 37 conditions, 3700
    episodes over LIBERO-Long's 10 tasks x 10 trials; nothing is created by a dry run."""
    result = invoke("libero", "paper", str(tmp_path / "r"), "--tiny", "--dry-run", "--random-sets", "0",
                    "--layers", "all", "--no-prompts", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "37 conditions x 10 tasks x 10 trials = 3700 episodes" in result.output
    result = invoke("libero", "paper", str(tmp_path / "r"), "--tiny", "--dry-run", "--no-progress",
                    "--sim-step-s", "0.1", "--policy-call-s", "0.05", "--workers", "4", "--max-batch", "8",
                    "--policy-server")
    assert result.exit_code == 0 and "70 conditions" in result.output and "4 worker(s)" in result.output
    assert not (tmp_path / "r").exists()


def test_libero_paper_reads_the_authors_dictionaries(tmp_path):
    import nnsight_vla as nv

    d_mlp, n_layers = nv.tiny("openvla").d_mlp, nv.tiny("openvla").num_layers
    flat = {key: {str(layer * d_mlp + neuron): ["x"] for layer, neuron in pairs}
            for key, pairs in (("fast_10", [(2, 1), (3, 4)]), ("slow_10", [(1, 7)]), ("up_10", [(3, 9), (2, 2)]))}
    import yaml

    (tmp_path / "dictionaries.yaml").write_text(yaml.safe_dump({**flat, "blank": {}}))
    result = invoke("libero", "paper", str(tmp_path / "r"), "--tiny", "--dry-run", "--no-progress",
                    "--neurons", str(tmp_path / "dictionaries.yaml"), "--alphas", "4", "--layers", "all,late",
                    "--layer-alpha", "4", "--random-sets", "2")
    assert result.exit_code == 0, result.output
    # baseline + 5 steered (3 sets x (all, late); slow_10 has no late neuron: layer 1 of 4) + 2 random controls of
    # each steered one (alpha 4 = the layer alpha) + 3 prompts = 1 + 5 + 10 + 3
    assert "19 conditions" in result.output, result.output
    assert n_layers == 4


@pytest.mark.slow
def test_libero_paper_end_to_end_on_one_task(tmp_path):
    pytest.importorskip("libero.libero")
    result = invoke("libero", "paper", str(tmp_path / "r"), "--tiny", "--tasks", "0", "--trials", "1",
                    "--max-steps", "8", "--camera-size", "64", "--alphas", "2,20", "--sizes", "4",
                    "--layers", "early,late,all", "--layer-alpha", "20", "--random-sets", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "paper.md").read_text().startswith("# The paper's LIBERO comparison")
    import json

    report = json.loads((tmp_path / "r" / "paper.json").read_text())
    assert report["fast_vs_slow"] and report["up_vertical"]


@pytest.mark.skipif(not os.environ.get("MUJOCO_GL"), reason="LIBERO needs MUJOCO_GL (egl) for headless rendering")
def test_scale_measures_percentiles_on_libero_prompts(tmp_path):
    """`nnsight-vla scale`: per-layer percentiles on LIBERO task prompts, and an ActivationScale usable as the
    unit of alpha (read back, percentiles increasing)."""
    pytest.importorskip("libero.libero")
    from nnsight_vla.scale import ActivationScale

    result = invoke("scale", "--out", str(tmp_path / "scale.json"), "--tasks", "0", "--percentiles", "50,99.9")
    assert result.exit_code == 0, result.output
    unit = ActivationScale.load(tmp_path / "scale.json")
    assert unit.percentile == 99.0 and unit.queries == 1 and unit.num_layers == 4
    import json

    table = json.loads((tmp_path / "scale.percentiles.json").read_text())["percentiles"]
    assert all(a <= b <= c for a, b, c in zip(table["50"], table["99"], table["99.9"]))
