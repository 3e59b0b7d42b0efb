"""The README's first command (``nnsight-vla demo``): the whole method on the shipped small OpenVLA, offline.

1. load the trained model through the real loader (``nv.load("openvla", folder)``);
2. the value-vector lens: top tokens of every FFN value vector, action-token share per layer;
3. automatic concept discovery: the "fast" and "slow" neuron sets (kNN over the lens, no hand-picking);
4. closed-loop rollouts in the MuJoCo arm scene on a neutral instruction: unsteered, steered with each set
   (``mlp.act.output[..., S] = alpha`` over every forward), a random-neuron control, and the prompt baseline;
5. a short results table (printed, and saved as CSV/JSON/Markdown) and the plots, in ``--out``.

A few minutes on 2 cores. Rerunning with the same arguments reuses the saved episodes and lens cache.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from . import files
from .errors import InputError

CONCEPTS = ("fast", "slow")
#: the paper's UR5 value; at its other value (4) the shipped model's binned actions barely move (README: results)
DEMO_ALPHA = 10.0


def _stage(message: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {message}", flush=True)


MARKER = ".nnsight-vla-demo"


def check_output_folder(out: str | os.PathLike) -> Path:
    """The demo writes into a new or empty folder, or one a previous demo wrote (it resumes there); never into
    someone else's files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; choose a folder for the demo's results")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(f"{out} is not empty and was not written by the demo; choose a new or empty folder")
    return out


def run_demo(
    seed: int = 0,
    out: str | os.PathLike = "results/demo",
    trials: int = 4,
    max_steps: int = 30,
    alpha: Optional[float] = None,
    model: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Run the pipeline and write its outputs to ``out``; returns the results dict (also in ``results.json``).

    Args:
        seed: the first scene seed (trial ``t`` uses scene ``1000 + seed + t``) and the random control's seed.
        out: output folder (lens cache, neuron sets, episodes, tables, plots).
        trials: episodes per condition.
        max_steps: policy steps per episode.
        alpha: the value written into the concept neurons (default: :data:`DEMO_ALPHA`).
        model: a fine-tuned checkpoint folder of the same kind (default: the shipped one).
        progress: progress bars.
    """
    import pandas as pd

    import nnsight_vla as nv

    from .concepts import find_opposites, random_control
    from .envs.arm_scene import ArmRolloutConfig, ArmSceneEnv
    from .rollout.conditions import baseline, prompt_baseline, steered
    from .rollout.store import ResultsStore
    from .rollout.sweep import run_sweep
    from .lens import ValueVectorLens
    from .reports.lens_plots import plot_action_share, plot_token_table
    from .reports.plots import plot_all
    from .steering import Steering
    from .training import shipped_path
    from .training.experiment import ExperimentConfig, episode_table, markdown_table, plot_key_effects, summary_rows
    from .training.corpus import TASK_BASES

    t0 = time.perf_counter()
    out = check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("results of `nnsight-vla demo`\n")
    defaults = ExperimentConfig()
    alpha = DEMO_ALPHA if alpha is None else float(alpha)
    model_path = str(Path(model or shipped_path("finetuned")).resolve())

    vla = nv.load("openvla", model_path, dispatch=True)
    _stage(f"loaded {vla.describe()}", t0)

    lens = ValueVectorLens(vla, k=defaults.lens_k, cache_dir=out / "lens", progress=progress)
    share = lens.action_token_share()
    plot_action_share(lens, out / "plots" / "action_share.png")
    _stage("lens: action-token share of the top-10 tokens per layer: "
           + " ".join(f"L{int(r.layer)}={r.share:.2f}" for r in share.itertuples()), t0)

    sets = dict(zip(CONCEPTS, find_opposites(lens, CONCEPTS, size=defaults.size, k_neighbors=defaults.k_neighbors)))
    for concept, nset in sets.items():
        nset.save(out / "neurons" / f"{concept}.json")
        table = lens.top_tokens(neuron=None, layer=None, k=5)
        keep = set(nset.pairs)
        table = table[[(l, n) in keep for l, n in zip(table.layer, table.neuron)]]
        plot_token_table(table, out / "plots" / f"tokens_{concept}.png", k=5,
                         title=f'value vectors found for "{concept}" (top-5 tokens; red: action token)')
        words = [lens.vector_tokens(l, n, k=3) for l, n in nset.pairs[:4]]
        _stage(f'concept "{concept}": {len(nset.pairs)} neurons in layers {sorted({l for l, _ in nset.pairs})}; '
               f"top tokens of the first ones: {words}", t0)

    used = [p for s in sets.values() for p in s.pairs]
    conditions = [baseline()]
    conditions += [steered(c, Steering(s, alpha=alpha), alpha=alpha, layers="all") for c, s in sets.items()]
    control = random_control(sets["fast"], seed=seed, exclude=used)
    conditions.append(steered("fast", Steering(control, alpha=alpha), alpha=alpha, layers="all", kind="control",
                              name=f"random[fast]@a{alpha:g}/all"))
    conditions.append(prompt_baseline("fast"))

    rollout = ArmRolloutConfig(instructions=TASK_BASES, trials=trials, max_steps=max_steps, seed=1000 + seed,
                               image_size=int(vla.image_processor.image_size[0]))
    _stage(f"rollouts: {len(conditions)} conditions x {trials} episodes x {max_steps} steps "
           f"(neutral instructions; scene seeds {rollout.seed}..{rollout.seed + trials - 1})", t0)
    run_sweep(ArmSceneEnv(rollout), vla, conditions, out / "episodes", progress=progress,
              run_info={"demo": True})
    store = ResultsStore.open(out / "episodes")

    rows = summary_rows(episode_table(store), conditions)
    frame = pd.DataFrame(rows)
    files.write_text(out / "results.csv", frame.to_csv(index=False))
    text = markdown_table(rows)
    files.write_text(out / "RESULTS.md", (
        f"# nnsight-vla demo\n\nModel: `{model_path}`, alpha = {alpha:g}, {trials} episodes per condition, "
        f"{max_steps} steps.\n\n{text}\n\nΔ% and p (Welch) are against the baseline; disp/step is the mean "
        "end-effector displacement per step.\n"))
    plots = [str(p) for p in plot_all(store, out / "plots")]
    plots.append(str(plot_key_effects(rows, out / "plots" / "key_effects.png", alpha)))
    results = {"model": model_path, "alpha": alpha, "trials": trials, "max_steps": max_steps, "seed": seed,
               "neurons": {c: [list(p) for p in s.pairs] for c, s in sets.items()},
               "control": [list(p) for p in control.pairs], "rows": rows, "plots": plots,
               "seconds": time.perf_counter() - t0}
    files.write_text(out / "results.json", json.dumps(results, indent=1, default=float))

    shown = frame[["condition", "kind", "episodes", "mean_disp", "mean_disp_pct", "max_height_table"]].copy()
    shown["mean_disp"] = (1000 * shown["mean_disp"]).round(2)
    shown["mean_disp_pct"] = shown["mean_disp_pct"].round(1)
    shown["max_height_table"] = (100 * shown["max_height_table"]).round(1)
    shown.columns = ["condition", "kind", "n", "disp/step (mm)", "vs baseline (%)", "max height (cm)"]
    print()
    print(shown.to_string(index=False))
    print()
    _stage(f"wrote {out}/RESULTS.md, results.csv, results.json and {len(plots) + 3} plots in {out}/plots", t0)
    return results
