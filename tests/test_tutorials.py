"""Every tutorial in tutorials/ runs top to bottom, offline, as a plain script (and is a valid jupytext notebook).

Default suite: ``python tutorials/0X_*.py`` in a subprocess (stdin closed, MUJOCO_GL=egl, outputs and caches in a
temporary folder via NNSIGHT_VLA_TUTORIAL_OUT / NNSIGHT_VLA_CACHE), each with a timeout; a tutorial that raises,
hangs or fails one of its own checks fails CI. Tutorials whose optional extras are not installed (the simulator,
ur_rtde) are skipped with the reason.

Slow suite (``pytest -m slow tests/test_tutorials.py``): the slow parts (NNSIGHT_VLA_TUTORIAL_SLOW=1, e.g. the real
NDIF server of tutorial 6), and every tutorial executed as a Jupyter notebook through jupytext + nbclient.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
NAMES = [path.stem for path in TUTORIALS]

#: seconds each tutorial may take in the default suite (generous: CI machines are shared; see each header for the
#: time measured on 2 cores)
TIMEOUT = {"01_tracing": 240, "02_lens": 300, "03_concepts_and_steering": 420, "04_libero": 420, "05_ur5": 300,
           "06_remote": 240}
#: the optional modules each tutorial imports (skipped, with the reason, when missing)
NEEDS = {"03_concepts_and_steering": ("robosuite", "mujoco", "nnsight_vla.training", "nnsight_vla.envs.arm_scene"),
         "04_libero": ("libero.libero", "robosuite", "mujoco"),
         "05_ur5": ("rtde_control", "mujoco", "robosuite")}
#: tutorials with a part that runs only in the slow suite
SLOW_PARTS = ("06_remote",)


def _missing(name: str) -> list[str]:
    missing = []
    for module in NEEDS.get(name, ()):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(module)
    return missing


def run_tutorial(name: str, out: Path, *, slow: bool = False, timeout: float | None = None) -> tuple[float, str]:
    """Run one tutorial as a script; return (seconds, output). Fails the test on a non-zero exit or a timeout."""
    path = ROOT / "tutorials" / f"{name}.py"
    env = dict(os.environ)
    env.update(MUJOCO_GL="egl", HF_HUB_OFFLINE="1", NNSIGHT_VLA_TUTORIAL_OUT=str(out / "out"),
               NNSIGHT_VLA_CACHE=str(out / "cache"), PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    env.pop("NNSIGHT_VLA_TUTORIAL_SLOW", None)
    if slow:
        env["NNSIGHT_VLA_TUTORIAL_SLOW"] = "1"
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(path)], cwd=str(out), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout or TIMEOUT.get(name, 300))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the tutorial and anything it started (e.g. the UR5 twin)
        output, _ = proc.communicate()
        pytest.fail(f"{name} did not finish within {timeout or TIMEOUT.get(name, 300)} s; last output:\n"
                    f"{output[-4000:]}")
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        pytest.fail(f"{name} failed (exit {proc.returncode}) after {seconds:.0f} s:\n{output[-6000:]}")
    return seconds, output


def test_every_tutorial_is_listed():
    assert NAMES == ["01_tracing", "02_lens", "03_concepts_and_steering", "04_libero", "05_ur5", "06_remote"]
    assert set(TIMEOUT) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_is_a_notebook_with_a_header(name):
    """Each file is a jupytext percent script that opens as a notebook, and says what it needs and how long it takes."""
    jupytext = pytest.importorskip("jupytext")
    notebook = jupytext.read(ROOT / "tutorials" / f"{name}.py")
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds[0] == "markdown" and kinds.count("code") >= 3 and kinds.count("markdown") >= 3
    header = notebook.cells[0].source
    assert "**Needs:**" in header and "**Time:**" in header, f"{name}: the first cell must state Needs and Time"


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_runs(name, tmp_path):
    missing = _missing(name)
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}, missing here (see the extras named in its header)")
    seconds, output = run_tutorial(name, tmp_path)
    print(f"\n{name}: {seconds:.1f} s")
    assert (tmp_path / "out" / name / "done.txt").is_file(), f"{name} did not reach its last cell:\n{output[-2000:]}"
    assert "Traceback" not in output, output[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_PARTS)
def test_tutorial_slow_part(name, tmp_path):
    seconds, output = run_tutorial(name, tmp_path, slow=True, timeout=900)
    print(f"\n{name} with its slow part: {seconds:.1f} s")
    done = (tmp_path / "out" / name / "done.txt").read_text()
    assert "slow part: True" in done, output[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_tutorial_runs_as_a_notebook(name, tmp_path, monkeypatch):
    """The same file executed cell by cell in a Jupyter kernel (jupytext -> nbclient)."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    missing = _missing(name)
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}")
    for key, value in dict(MUJOCO_GL="egl", HF_HUB_OFFLINE="1", NNSIGHT_VLA_TUTORIAL_OUT=str(tmp_path / "out"),
                           NNSIGHT_VLA_CACHE=str(tmp_path / "cache")).items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    monkeypatch.delenv("NNSIGHT_VLA_TUTORIAL_SLOW", raising=False)
    notebook = jupytext.read(ROOT / "tutorials" / f"{name}.py")
    started = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=TIMEOUT[name], kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"\n{name} as a notebook: {time.perf_counter() - started:.1f} s")
    assert (tmp_path / "out" / name / "done.txt").is_file()
