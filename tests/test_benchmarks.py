"""benchmarks/run_all.py: the summary reports exactly what the benchmark files say, the markdown carries every
section, the GPU branch's code path runs (on a CPU, tiny models), and bench_memory measures a planted allocation.

The benchmarks themselves take minutes; ``python benchmarks/run_all.py --quick`` is the smoke run (slow suite).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run_all  # noqa: E402


def _steering_json() -> dict:
    def entry(plain, hook, steer, model):
        return {
            "model": model, "median_ms": {"plain": plain, "hook": hook, "steer": steer, "edit": steer + 0.1},
            "paired_ratios": {"steer_over_hook": steer / hook + 0.001, "steer_over_plain": steer / plain + 0.002,
                              "hook_over_plain": hook / plain, "edit_over_hook": 1.0},
            "ratios_cpu": {"steer_over_hook": 1.01, "steer_over_plain": 1.02},
            "overhead_ms": {"steer_minus_hook": steer - hook, "edit_minus_hook": 0.0},
        }

    return {"reps": 7, "machine": {"loadavg_before": [1, 1, 1], "loadavg_after": [2, 2, 2]},
            "families": {"openvla": {"medium/backbone": entry(100.0, 101.0, 103.0, "m"),
                                     "tiny/backbone": entry(10.0, 10.2, 11.0, "t")}},
            "targets": {"steer_over_hook": 1.05}, "targets_met": {"openvla/medium/backbone": {"steer_over_hook": True}}}


def _libero_json(steps, ratio) -> dict:
    return {"date": "2026-01-01T00:00:00+00:00", "policy_steps": steps, "settle_steps": 15, "reps": 3,
            "policy": "tiny", "camera_size": 128, "ratio": ratio, "ratio_wall": ratio + 0.01,
            "runner_policy_steps_per_s": 9.5, "policy_s_per_call": 0.03, "env_s_per_step": 0.05,
            "machine": {"load_avg_1min": 1.5}}


def test_summary_reports_the_files_figures(tmp_path):
    (tmp_path / "steering.json").write_text(json.dumps(_steering_json()))
    (tmp_path / "libero.json").write_text(json.dumps(_libero_json(80, 1.012)))
    (tmp_path / "libero_short.json").write_text(json.dumps(_libero_json(20, 1.031)))
    summary = run_all.summarize(tmp_path, runs={"steering": {"peak_rss_mb": 321.0}}, ran=["steering"])
    rows = {(r["family"], r["size"]): r for r in summary["steering"]["rows"]}
    assert rows["openvla", "medium"]["steer_over_hook"] == round(103.0 / 101.0 + 0.001, 3)
    assert rows["openvla", "tiny"]["overhead_ms"] == round(11.0 - 10.2, 2)
    assert [r["policy_steps"] for r in summary["libero"]["rows"]] == [20, 80]
    assert summary["libero"]["rows"][1]["runner_over_bare_cpu"] == 1.012
    assert "lens" not in summary and summary["sources"]["lens"]["measured"] is None  # missing file: said so
    assert summary["gpu"]["run"] is False and "not run" in summary["gpu"]["reason"]
    text = run_all.markdown(summary)
    assert "| openvla | backbone | medium | 100.0 | 101.0 | 103.0 | 1.021 |" in text
    assert "| 20 | 3 | 1.031 |" in text and "Not run:" in text and "steering 321 MB" in text
    assert "steering.json` |" in text and "(this run)" in text


def test_summarize_command_writes_both_files(tmp_path):
    (tmp_path / "steering.json").write_text(json.dumps(_steering_json()))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--summarize", "--out",
                           str(tmp_path)], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steering"]["reps"] == 7 and summary["ran_now"] == []
    assert (tmp_path / "summary.md").read_text().startswith("# Benchmark summary")


def test_gpu_branch_code_path_on_cpu():
    """The GPU figures' code path, exercised on the CPU with a tiny model (the figures mean nothing here)."""
    import logging

    level = logging.getLogger("nnsight_vla").level
    out = run_all.gpu_figures(device="cpu", families=("openvla",), reps=2, sizes={}, dtype="float32")
    assert logging.getLogger("nnsight_vla").level == level  # it silences the package's warnings only while it runs
    entry = out["families"]["openvla"]["backbone"]
    assert set(entry["median_ms"]) == {"plain", "hook", "steer", "edit"}
    assert all(math.isfinite(v) and v > 0 for v in entry["median_ms"].values())


def test_bench_memory_sees_a_planted_allocation():
    """The fork-and-measure method reports a 40 MB allocation made inside the measured window."""
    import bench_memory as bm
    import numpy as np

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        bm._reset_peak()
        start = bm._status_kb("VmRSS")
        block = np.ones(40 * 2**20 // 8)  # 40 MB, touched
        del block
        with os.fdopen(write, "w") as pipe:
            pipe.write(json.dumps((bm._status_kb("VmHWM") - start) / 1024))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        grown = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert 38 <= grown <= 60


@pytest.mark.slow
def test_run_all_quick(tmp_path):
    """The one command, end to end, with few repetitions (several minutes)."""
    env = {**os.environ, "MUJOCO_GL": "egl"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"steering", "lens", "libero", "memory"} <= set(summary)
    assert set(summary["ran_now"]) == {"steering", "lens", "libero", "libero_short", "memory"}
