"""Run every benchmark in one command and write one summary.

    python benchmarks/run_all.py                 # everything (about 12-15 min on 2 CPU cores)
    python benchmarks/run_all.py --quick         # a smoke run with few repetitions (about 5 min; not for quoting)
    python benchmarks/run_all.py --only steering memory
    python benchmarks/run_all.py --summarize     # rebuild the summary from the JSON files already in results/

Each benchmark is one of the scripts next to this file, run as a subprocess (its own JSON in ``results/``):

==============  ===========================================================================================
steering        bench_steering.py: steered ``predict_action`` vs the same edit as a plain PyTorch hook and vs
                unsteered, per family, tiny and medium models (ratios of medians of interleaved repetitions)
lens            bench_lens.py: streamed value-vector lens vs plain matmul + topk, its disk-cache speed-up, peak
                memory streamed vs dense, and how time scales with layers x d_mlp x vocab
libero          bench_libero.py: the LIBERO runner's episode vs a bare loop doing the same work (process CPU
                time ratio), at two episode lengths (how the overhead scales), and env-only steps/s by
                render settings
memory          bench_memory.py: peak extra memory of one steered / hooked / unsteered call, per family, tiny
                and medium models
==============  ===========================================================================================

Every figure is a ratio against a baseline measured in the same run (and, where it matters, at two sizes, to show
how it scales). ``results/summary.json`` collects the figures plus, per benchmark, when it ran, the machine load
and the peak resident memory of its process; ``results/summary.md`` is the table to quote.

On a machine with a CUDA GPU (``torch.cuda.is_available()``) the script also records absolute figures for a
medium-size model on the GPU (``gpu`` section: steered vs hooked vs plain ``predict_action`` latency and peak GPU
memory per family, in bfloat16), and bench_lens.py measures on the GPU by itself. Without a GPU the summary says
that this part was not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

#: benchmark name -> (script, arguments of the full run, arguments of --quick); "{out}" is the results folder
BENCHMARKS: dict[str, list[tuple[str, str, list[str], list[str]]]] = {
    "steering": [("steering", "bench_steering.py", ["--reps", "100", "--out", "{out}/steering.json"],
                  ["--reps", "8", "--out", "{out}/steering.json"])],
    "lens": [("lens", "bench_lens.py", [], [])],
    "libero": [
        ("libero", "bench_libero.py", ["--steps", "80", "--reps", "6", "--out", "{out}/libero.json"],
         ["--steps", "25", "--reps", "2", "--skip-render-table", "--out", "{out}/libero.json"]),
        ("libero_short", "bench_libero.py",
         ["--steps", "20", "--reps", "6", "--skip-render-table", "--out", "{out}/libero_short.json"],
         ["--steps", "10", "--reps", "2", "--skip-render-table", "--out", "{out}/libero_short.json"]),
    ],
    "memory": [("memory", "bench_memory.py", ["--out", "{out}/memory.json"],
                ["--sizes", "tiny", "--out", "{out}/memory.json"])],
    "batching": [("batching", "bench_batching.py", ["--reps", "5", "--out", "{out}/batching.json"],
                  ["--sizes", "1", "4", "--reps", "1", "--families", "openvla", "--out", "{out}/batching.json"])],
    "sweep": [("sweep", "bench_sweep.py", ["--trials", "4", "--steps", "20", "--out", "{out}/sweep.json"],
               ["--trials", "1", "--steps", "5", "--out", "{out}/sweep.json"])],
}
#: medium-size models for the GPU figures (bfloat16): a 2048-wide, 16-layer language backbone
GPU_MEDIUM = {
    "openvla": dict(text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                              num_key_value_heads=16), vocab=32000),
    "pi0": dict(text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=8,
                          num_key_value_heads=1, head_dim=256),
                expert=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=8),
                num_inference_steps=10, chunk_size=50),
    "pi0-fast": dict(text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=8,
                               num_key_value_heads=1, head_dim=256)),
}


# -------------------------------------------------------------------------------------------------------------
# running


def _write_json(path: Path, data) -> None:
    from nnsight_vla import files

    files.write_json(path, data, default=_json_default)


def _write_text(path: Path, text: str) -> None:
    from nnsight_vla import files

    files.write_text(path, text)


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def run_script(name: str, script: str, args: list[str], out: Path, log_dir: Path) -> dict:
    """Run one benchmark script; stream its output to the console and ``logs/<name>.log``; return the record
    (exit code, wall seconds, the peak resident memory of its process tree's largest process, load averages)."""
    cmd = [sys.executable, str(HERE / script), *[a.format(out=out) for a in args]]
    if script == "bench_lens.py" and out != RESULTS:
        # bench_lens.py has no --out option: point its module-level RESULTS path at ``out`` and run its main()
        code = (f"import sys; sys.argv = [{str(HERE / script)!r}]; sys.path.insert(0, {str(HERE)!r}); "
                f"from pathlib import Path; import bench_lens; bench_lens.RESULTS = Path({str(out / 'lens.json')!r}); "
                "bench_lens.main()")
        cmd = [sys.executable, "-c", code]
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "PYTHONUNBUFFERED": "1"}
    print(f"\n=== {name}: {script} {' '.join(a.format(out=out) for a in args)}", flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(f"  [{name}] {line}")
            log.write(line)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    shown = [a.format(out=out) for a in args] if cmd[1] == "-c" else cmd[2:]
    record = {"name": name, "command": " ".join(["python", f"benchmarks/{script}", *shown]),
              "returncode": proc.returncode, "wall_s": round(seconds, 1),
              # ru_maxrss of the direct child (kB on Linux); children of the child are not included
              "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    print(f"=== {name}: exit {proc.returncode} after {seconds:.0f} s, peak RSS {record['peak_rss_mb']} MB", flush=True)
    return record


def gpu_figures(device: str = "cuda", families=("openvla", "pi0", "pi0-fast"), reps: int = 20,
                sizes: dict | None = None, dtype: str = "bfloat16") -> dict:
    """Absolute figures on a GPU for a medium-size model per family: latency of plain / hooked / steered / edited
    ``predict_action`` (bench_steering's conditions and timing loop) and the peak GPU memory of one call of each.

    ``device``/``sizes``/``dtype`` exist so the code path can be smoke-tested on a CPU with tiny models; the
    figures mean something only on a GPU.
    """
    import logging

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    import bench_steering as bs

    import nnsight_vla as nv
    from nnsight_vla.steering import Steering

    # random pi0-FAST outputs never decode: silence that warning here only, and give the level back afterwards
    # (this function also runs inside the test process)
    package_logger = logging.getLogger("nnsight_vla")
    level = package_logger.level
    package_logger.setLevel(logging.ERROR)
    try:
        return _gpu_figures(device, families, reps, GPU_MEDIUM if sizes is None else sizes, dtype, bs, nv, Steering)
    finally:
        package_logger.setLevel(level)


def _gpu_figures(device, families, reps, sizes, dtype, bs, nv, Steering) -> dict:
    import contextlib

    import torch

    cuda = torch.device(device).type == "cuda"
    out: dict = {"device": torch.cuda.get_device_name(device) if cuda else device, "dtype": dtype, "reps": reps,
                 "torch": torch.__version__, "families": {}}
    for family in families:
        vla = nv.tiny(family, seed=0, device=device, dtype=dtype, **sizes.get(family, {}))
        entry: dict = {"model": vla.describe(),
                       "param_gb": sum(p.numel() * p.element_size() for p in vla._module.parameters()) / 2**30}
        for stack in [s.name for s in vla.stacks]:
            steer = Steering(bs.late_neurons(vla, stack), bs.ALPHA)
            timing = bs.time_conditions(vla, steer, reps)  # predict_action returns numpy: each call synchronises
            memory = {}
            if cuda:
                images, kwargs = bs.call_args(vla)
                for name, context in (("plain", contextlib.nullcontext), ("steer", lambda: steer.apply(vla))):  # noqa: B023
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    with context():
                        vla.predict_action(images, bs.INSTRUCTION, **kwargs)
                    torch.cuda.synchronize(device)
                    memory[f"{name}_peak_extra_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            entry[stack] = {"median_ms": timing["median_ms"], "paired_ratios": timing["paired_ratios"],
                            "overhead_ms": timing["overhead_ms"], **memory}
        out["families"][family] = entry
        vla = None  # free the model before the next family (the lambda above is done with it)
        if cuda:
            torch.cuda.empty_cache()
    return out


# -------------------------------------------------------------------------------------------------------------
# the summary


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _when(path: Path, data: dict | None) -> str | None:
    if data and isinstance(data.get("date"), str):
        return data["date"]
    if path.is_file():
        return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
    return None


def _source(path: Path, data: dict | None) -> dict:
    try:
        shown = str(path.resolve().relative_to(ROOT))
    except ValueError:
        shown = str(path)
    return {"file": path.name, "path": shown, "measured": _when(path, data)}


def _r(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


def _rounded_rows(rows: list[dict]) -> list[dict]:
    """A results file's table rows with every float rounded as the summary rounds them."""
    return [{k: _r(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def summarize(out: Path, runs: dict | None = None, gpu: dict | None = None, ran: list[str] | None = None) -> dict:
    """Collect the headline figures of every results file in ``out`` into one dict. ``runs``: the subprocess
    records (this invocation's and earlier ones'); ``ran``: the benchmarks run by this invocation."""
    runs = runs or {}
    summary: dict = {
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "ran_now": list(ran or []),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "loadavg_now": os.getloadavg()},
        "runs": runs,
        "sources": {},
    }
    try:
        import torch

        summary["machine"]["torch"] = torch.__version__
        summary["machine"]["cuda"] = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        pass

    path = out / "steering.json"
    data = _load(path)
    summary["sources"]["steering"] = _source(path, data)
    if data:
        rows = []
        for family, entries in data.get("families", {}).items():
            for key, e in entries.items():
                size, stack = key.split("/")
                rows.append({
                    "family": family, "size": size, "stack": stack, "model": e.get("model"),
                    "plain_ms": _r(e["median_ms"]["plain"], 2), "hook_ms": _r(e["median_ms"]["hook"], 2),
                    "steer_ms": _r(e["median_ms"]["steer"], 2),
                    "steer_over_hook": _r(e["paired_ratios"]["steer_over_hook"]),
                    "steer_over_plain": _r(e["paired_ratios"]["steer_over_plain"]),
                    "hook_over_plain": _r(e["paired_ratios"]["hook_over_plain"]),
                    "steer_over_hook_cpu": _r(e.get("ratios_cpu", {}).get("steer_over_hook")),
                    "overhead_ms": _r(e["overhead_ms"]["steer_minus_hook"], 2),
                })
        summary["steering"] = {"reps": data.get("reps"), "rows": rows, "targets": data.get("targets"),
                               "targets_met": data.get("targets_met"),
                               "loadavg": [data.get("machine", {}).get("loadavg_before"),
                                           data.get("machine", {}).get("loadavg_after")]}

    path = out / "lens.json"
    data = _load(path)
    summary["sources"]["lens"] = _source(path, data)
    if data:
        t, e, m, s = data["throughput"], data["end_to_end"], data["memory"], data["scaling"]
        summary["lens"] = {
            "device": data.get("device"),
            "throughput_shape": t["shape"],
            "streamed_over_dense_throughput": _r(t["ratio_vs_dense"]),
            "best_chunk_over_dense": _r(max(x["ratio_vs_dense"] for x in t["streamed"])),
            "equal_to_dense": t.get("equal_to_dense"),
            "end_to_end_model": e["model"],
            "end_to_end_over_dense": _r(e["ratio_vs_dense"]),
            "uncached_s": _r(e["lens_uncached_s"], 2), "cached_s": _r(e["lens_cached_call_s"], 4),
            "cache_speedup": _r(e["cache_speedup"], 1),
            "memory_dense_over_streamed": _r(m["dense_over_streamed"], 2),
            "memory_streamed_mb": _r(m["streamed"]["peak_extra_mb"], 1),
            "memory_dense_mb": _r(m["dense"]["peak_extra_mb"], 1),
            "loglog_slope": _r(s["loglog_slope_time_vs_layers_x_dmlp_x_vocab"]),
            "ns_per_mac": _r(s["ns_per_mac_median"], 4),
            "openvla_7b_estimate_s": _r(s["openvla_7b_estimate_s"], 0),
            "targets": data.get("targets"),
        }

    libero_rows = []
    for name in ("libero_short", "libero"):
        path = out / f"{name}.json"
        data = _load(path)
        summary["sources"][name] = _source(path, data)
        if data:
            libero_rows.append({
                "policy_steps": data["policy_steps"], "settle_steps": data["settle_steps"], "reps": data["reps"],
                "policy": data["policy"], "camera_size": data["camera_size"],
                "runner_over_bare_cpu": _r(data["ratio"], 4), "runner_over_bare_wall": _r(data["ratio_wall"], 4),
                "runner_policy_steps_per_s": data.get("runner_policy_steps_per_s"),
                "policy_s_per_call": data.get("policy_s_per_call"), "env_s_per_step": data.get("env_s_per_step"),
                "load_avg_1min": data.get("machine", {}).get("load_avg_1min"),
            })
            if data.get("env_only"):
                summary["libero_render"] = data["env_only"]
    if libero_rows:
        summary["libero"] = {"rows": sorted(libero_rows, key=lambda r: r["policy_steps"]), "target_ratio": 1.05}

    path = out / "memory.json"
    data = _load(path)
    summary["sources"]["memory"] = _source(path, data)
    if data:
        rows = []
        for family, sizes in data.get("families", {}).items():
            for size in ("tiny", "medium"):
                e = sizes.get(size)
                if not e or "conditions" not in e:
                    continue
                c = e["conditions"]
                rows.append({
                    "family": family, "size": size, "stack": e.get("stack"), "param_mb": _r(e["param_mb"], 1),
                    "plain_extra_mb": _r(c["plain"].get("peak_extra_mb"), 2),
                    "hook_extra_mb": _r(c["hook"].get("peak_extra_mb"), 2),
                    "steer_extra_mb": _r(c["steer"].get("peak_extra_mb"), 2),
                    "steer_minus_plain_mb": _r(e.get("steer_minus_plain_mb"), 2),
                    "steer_over_plain_extra": _r(e.get("ratios", {}).get("steer_over_plain")),
                    "steer_over_plain_process": _r((e["rss_after_build_mb"] + c["steer"]["peak_extra_mb"])
                                                   / (e["rss_after_build_mb"] + c["plain"]["peak_extra_mb"]), 4),
                })
        summary["memory"] = {"rows": rows, "calls": data.get("calls"), "method": data.get("method")}
    path = out / "batching.json"
    data = _load(path)
    summary["sources"]["batching"] = _source(path, data)
    if data:
        summary["batching"] = {"rows": _rounded_rows(data["rows"]), "target": data.get("target")}
    path = out / "sweep.json"
    data = _load(path)
    summary["sources"]["sweep"] = _source(path, data)
    if data:
        summary["sweep"] = {"rows": _rounded_rows(data["rows"]),
                            "episodes_equal_across_modes": data.get("episodes_equal_across_modes"),
                            "workers": data.get("workers"), "trials": data.get("trials"), "steps": data.get("steps")}
    summary["process_peaks_mb"] = {name: r.get("peak_rss_mb") for name, r in runs.items()}

    if gpu is not None:
        summary["gpu"] = gpu
    else:
        previous = _load(out / "gpu.json")
        summary["gpu"] = previous if previous else {
            "run": False, "reason": "no CUDA device on the machine that produced this summary "
                                    "(torch.cuda.is_available() was False); the GPU branch was not run"}
    return summary


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def _shape(shape: dict) -> str:
    vocab = shape.get("vocab", shape.get("vocab_rows"))
    return f"{shape['layers']} layers × {shape['d_mlp']} vectors, d_model {shape['d_model']}, vocab {vocab}"


def _section(title: str, intro: str, header: str, separator: str, rows: list[str]) -> list[str]:
    """A summary section: its heading, one paragraph and a table (header, separator, rows)."""
    return [f"## {title}", "", intro, "", header, separator, *rows, ""]


def markdown(summary: dict) -> str:
    """The summary as markdown tables (what the README quotes)."""
    m = summary["machine"]
    lines = [
        "# Benchmark summary",
        "",
        f"Generated {summary['generated']} by `python benchmarks/run_all.py` on {m['cpus']} CPU cores "
        f"({m['platform']}, Python {m['python']}, torch {m.get('torch', '?')}, CUDA: {m.get('cuda', False)}). "
        "Every figure is a ratio against a baseline measured in the same run; absolute times depend on the machine "
        "and its load (the load average during each benchmark is in `summary.json`).",
        "",
    ]
    st = summary.get("steering")
    if st:
        lines += [
            "## Steering overhead (`bench_steering.py`)",
            "",
            f"Median over {st['reps']} interleaved repetitions of one `predict_action` call (CPU, 1 thread); ratios "
            "are medians of per-repetition ratios. *hook* = the same edit as a plain PyTorch pre-hook on `down_proj` "
            "(the cheapest possible implementation); *steered* = `with Steering(...).apply(vla):`. Targets on the "
            "medium models: steered/hook ≤ 1.05, steered/plain ≤ 1.10.",
            "",
            "| family | stack | size | plain ms | hook ms | steered ms | steered / hook | steered / plain "
            "| overhead vs hook (ms) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(st["rows"], key=lambda r: (r["family"], r["stack"], r["size"] != "tiny")):
            lines.append(f"| {r['family']} | {r['stack']} | {r['size']} | {_fmt(r['plain_ms'], '.1f')} | "
                         f"{_fmt(r['hook_ms'], '.1f')} | {_fmt(r['steer_ms'], '.1f')} | "
                         f"{_fmt(r['steer_over_hook'], '.3f')} | {_fmt(r['steer_over_plain'], '.3f')} | "
                         f"{_fmt(r['overhead_ms'], '.2f')} |")
        scaling = []
        by = {(r["family"], r["stack"], r["size"]): r for r in st["rows"]}
        for (family, stack, size), r in sorted(by.items()):
            tiny = by.get((family, stack, "tiny"))
            if size != "medium" or not tiny or not tiny["plain_ms"] or not tiny["overhead_ms"]:
                continue
            scaling.append(f"{family} {stack}: call ×{r['plain_ms'] / tiny['plain_ms']:.1f}, overhead "
                           f"×{r['overhead_ms'] / tiny['overhead_ms']:.1f}")
        lines += ["", "Scaling, tiny → medium: " + "; ".join(scaling) + ". The overhead grows more slowly than the "
                  "call itself, so the ratio falls as the model grows.", ""]
    ln = summary.get("lens")
    if ln:
        lines += [
            "## Value-vector lens (`bench_lens.py`)",
            "",
            f"Device: {ln['device']}.",
            "",
            "| figure | value | baseline (same run) |",
            "|---|---:|---|",
            f"| throughput, streamed / dense | {_fmt(ln['streamed_over_dense_throughput'], '.2f')}× "
            f"(best chunk {_fmt(ln['best_chunk_over_dense'], '.2f')}×) | one dense matmul + topk per layer, "
            f"{_shape(ln['throughput_shape'])} |",
            f"| end to end (`ValueVectorLens`, uncached) / dense | {_fmt(ln['end_to_end_over_dense'], '.2f')}× | "
            f"dense matmul + topk on the same weights ({_shape(ln['end_to_end_model'])}) |",
            f"| cache speed-up | {_fmt(ln['cache_speedup'], '.0f')}× ({_fmt(ln['cached_s'], '.3f')} s vs "
            f"{_fmt(ln['uncached_s'], '.1f')} s) | the uncached lens |",
            f"| peak extra memory, dense / streamed | {_fmt(ln['memory_dense_over_streamed'], '.1f')}× "
            f"({_fmt(ln['memory_streamed_mb'], '.0f')} MB vs {_fmt(ln['memory_dense_mb'], '.0f')} MB) | the dense "
            "computation |",
            f"| scaling: log-log slope of time vs layers·d_mlp·vocab | {_fmt(ln['loglog_slope'], '.2f')} "
            "(1 = linear) | – |",
            f"| OpenVLA-7B estimate on this device | {_fmt(ln['openvla_7b_estimate_s'], '.0f')} s "
            f"({_fmt(ln['ns_per_mac'], '.3f')} ns per multiply-add) | extrapolated from the scaling runs |",
            "",
        ]
    bt = summary.get("batching")
    if bt:
        lines += _section(
            "Batched inference (`bench_batching.py`)",
            "N observations (different images and instruction lengths) as N single `predict_action` calls vs one "
            "batched call, interleaved; ratio = median of paired ratios. Max |difference| of the actions: batched "
            f"vs single, per element. Target: {bt['target']}.",
            "| family | size | N | one at a time (s) | batched (s) | speed-up | max abs diff |",
            "|---|---|---:|---:|---:|---:|---:|",
            [f"| {r['family']} | {r['size']} | {r['n']} | {_fmt(r['singles_s'], '.3f')} | "
             f"{_fmt(r['batched_s'], '.3f')} | {_fmt(r['speedup'], '.2f')} | {r['max_abs_diff']:.1e} |"
             for r in bt["rows"]])
    sw = summary.get("sweep")
    if sw:
        lines += _section(
            "Sweep throughput (`bench_sweep.py`)",
            f"The same episodes (shipped model in the arm scene, {sw['trials']} trials x 2 conditions x "
            f"{sw['steps']} steps) run by each executor; ratio = episodes per hour against the one-process "
            f"loop. Episodes identical across modes: {sw['episodes_equal_across_modes']}.",
            "| mode | episodes | wall (s) | episodes / h | vs one process |", "|---|---:|---:|---:|---:|",
            [f"| {r['mode']} | {r['episodes']} | {_fmt(r['wall_s'], '.1f')} | "
             f"{_fmt(r['episodes_per_hour'], '.0f')} | {_fmt(r['vs_inline'], '.2f')} |" for r in sw["rows"]])
    lb = summary.get("libero")
    if lb:
        lines += [
            "## LIBERO runner overhead (`bench_libero.py`)",
            "",
            "The runner's episode (conditions, per-step records, summary, atomic commit to the results folder) vs a "
            "bare loop doing the same simulation, image preparation and policy calls (tiny OpenVLA), libero_10 "
            "task 0; ratio = median of paired ratios of process CPU time (wall-clock ratio beside it). Target ≤ 1.05.",
            "",
            "| policy steps / episode | reps | runner / bare (CPU) | runner / bare (wall) | policy steps/s | "
            "s per policy call | s per env step |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in lb["rows"]:
            lines.append(f"| {r['policy_steps']} | {r['reps']} | {_fmt(r['runner_over_bare_cpu'], '.3f')} | "
                         f"{_fmt(r['runner_over_bare_wall'], '.3f')} | {_fmt(r['runner_policy_steps_per_s'])} | "
                         f"{_fmt(r['policy_s_per_call'])} | {_fmt(r['env_s_per_step'])} |")
        render = summary.get("libero_render")
        if render:
            lines += ["", "Environment only (no policy), by render settings:", "",
                      "| camera px | anti-aliasing samples | cameras | steps/s |", "|---:|---|---|---:|"]
            for r in render:
                lines.append(f"| {r['camera_size']} | {r['offsamples']} | {', '.join(r['cameras'])} | "
                             f"{r['steps_per_s']} |")
        lines.append("")
    mem = summary.get("memory")
    if mem:
        lines += [
            "## Memory peaks (`bench_memory.py`)",
            "",
            "Peak extra resident memory of one `predict_action` call beyond the built model (CPU; each condition in "
            "its own fork of one process, large blocks returned to the system on free so the peak follows live "
            "allocations).",
            "",
            "| family | size | params MB | plain MB | hook MB | steered MB | steered − plain MB | "
            "steered / plain (process peak) |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mem["rows"]:
            lines.append(f"| {r['family']} | {r['size']} | {_fmt(r['param_mb'], '.1f')} | "
                         f"{_fmt(r['plain_extra_mb'], '.2f')} | {_fmt(r['hook_extra_mb'], '.2f')} | "
                         f"{_fmt(r['steer_extra_mb'], '.2f')} | {_fmt(r['steer_minus_plain_mb'], '+.2f')} | "
                         f"{_fmt(r['steer_over_plain_process'], '.4f')} |")
        lines.append("")
    peaks = {k: v for k, v in summary.get("process_peaks_mb", {}).items() if v is not None}
    if peaks:
        lines += ["Peak resident memory of each benchmark process: "
                  + ", ".join(f"{k} {v:.0f} MB" for k, v in peaks.items()) + ".", ""]
    gpu = summary.get("gpu") or {}
    lines += ["## GPU (absolute figures, medium model)", ""]
    if gpu.get("families"):
        lines += [f"Device {gpu['device']}, {gpu['dtype']}, {gpu['reps']} repetitions.", "",
                  "| family | stack | plain ms | hook ms | steered ms | steered / hook | plain peak MB | "
                  "steered peak MB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for family, e in gpu["families"].items():
            for stack, r in e.items():
                if not isinstance(r, dict) or "median_ms" not in r:
                    continue
                lines.append(f"| {family} | {stack} | {r['median_ms']['plain']:.1f} | {r['median_ms']['hook']:.1f} | "
                             f"{r['median_ms']['steer']:.1f} | {r['paired_ratios']['steer_over_hook']:.3f} | "
                             f"{_fmt(r.get('plain_peak_extra_mb'), '.0f')} | "
                             f"{_fmt(r.get('steer_peak_extra_mb'), '.0f')} |")
    else:
        lines.append(f"Not run: {gpu.get('reason', 'no GPU')}.")
    lines += ["", "## Sources", "", "| benchmark | results file | measured |", "|---|---|---|"]
    for name, src in summary["sources"].items():
        rerun = " (this run)" if name in summary.get("ran_now", []) else ""
        lines.append(f"| {name} | `{src['path']}` | {src['measured'] or 'missing'}{rerun} |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run, not for quoting")
    parser.add_argument("--summarize", action="store_true", help="only rebuild the summary from results/*.json")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--gpu-reps", type=int, default=20)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs: dict = {}
    gpu = None
    failed = []
    if not args.summarize:
        for group in args.only or list(BENCHMARKS):
            for name, script, full, quick in BENCHMARKS[group]:
                record = run_script(name, script, quick if args.quick else full, out, out / "logs")
                record["quick"] = args.quick
                record["ran_now"] = True
                runs[name] = record
                if record["returncode"] != 0:
                    failed.append(name)
        import torch

        if torch.cuda.is_available():
            print("\n=== gpu: absolute figures for medium models", flush=True)
            try:
                gpu = {"run": True, **gpu_figures(reps=args.gpu_reps)}
            except Exception as error:  # noqa: BLE001 - recorded, the CPU figures stand
                gpu = {"run": False, "reason": f"the GPU branch failed: {type(error).__name__}: {error}"}
                failed.append("gpu")
            _write_json(out / "gpu.json", gpu)
        else:
            gpu = {"run": False, "reason": "no CUDA device on this machine (torch.cuda.is_available() is False); "
                                           "the GPU branch was not run"}
        previous = {name: {**r, "ran_now": False} for name, r in
                    ((_load(out / "summary.json") or {}).get("runs", {})).items()}
        runs = {**previous, **runs} if args.only else runs
    else:
        runs = {name: {**r, "ran_now": False} for name, r in
                ((_load(out / "summary.json") or {}).get("runs", {})).items()}
    if args.summarize:
        # keep "ran by the last run_all" for the files that run produced and nobody has rewritten since
        previous = _load(out / "summary.json") or {}
        fresh = summarize(out, runs, gpu)
        ran = [n for n in previous.get("ran_now", [])
               if previous.get("sources", {}).get(n, {}).get("measured") == fresh["sources"].get(n, {}).get("measured")]
    else:
        ran = [n for n in runs if runs[n].get("ran_now")]
    summary = summarize(out, runs, gpu, ran=ran)
    _write_json(out / "summary.json", summary)
    _write_text(out / "summary.md", markdown(summary))
    print(f"\nwrote {out / 'summary.json'} and {out / 'summary.md'}")
    if failed:
        print(f"FAILED: {', '.join(failed)} (see {out / 'logs'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
