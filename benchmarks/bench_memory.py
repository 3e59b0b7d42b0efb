"""Peak memory of one ``predict_action`` call: steered vs unsteered vs the same edit as a plain PyTorch hook.

For each family and model size (the tiny default and bench_steering's medium models), the model is built once in
a fresh process, every condition is run once there (one-time costs: lazy imports, nnsight's source parsing, first
allocations), and then each condition is measured in its own ``fork()`` of that process, so every condition starts
from the same memory state. The child makes one unmeasured call (after a fork, torch and the allocator set
themselves up again on first use, ~30 MB once), resets its peak resident set (Linux ``clear_refs``), makes
``--calls`` calls, and reports the growth of the peak (``VmHWM``) over its resident set before them: the extra
memory a call needs beyond the model. The worker runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc serves
every block of 64 KiB
or more (activations, logits, caches) with mmap and returns it to the system on free: the resident set then
follows the live allocations and its peak is the call's peak (freed heap memory would otherwise be reused
silently and hide it). Conditions:

* ``plain``: ``vla.predict_action(...)``;
* ``hook``: in-place forward pre-hooks on each steered layer's ``down_proj`` (bench_steering's reference);
* ``steer``: inside ``with Steering(...).apply(vla):``;
* ``edit``: ``with vla.predict_action(...) as tracer: steer.edit(vla, tracer)``.

Ratios steer / plain and steer / hook say what nnsight's interleaving costs in memory; tiny vs medium says how
that scales with the model. Also recorded: the model's parameter bytes and the process's resident set after the
build. CPU only (on a GPU the figure would be ``torch.cuda.max_memory_allocated``; see run_all.py's GPU branch).

    python benchmarks/bench_memory.py [--calls 2] [--families openvla pi0 pi0-fast] [--sizes tiny medium]

Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

RESULTS = HERE / "results" / "memory.json"
CONDITIONS = ("plain", "hook", "steer", "edit")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _run(vla, steer, condition: str, calls: int) -> None:
    """``calls`` calls of one condition."""
    import bench_steering as bs

    images, kwargs = bs.call_args(vla)

    def call():
        return vla.predict_action(images, bs.INSTRUCTION, **kwargs)

    def edit():
        with vla.predict_action(images, bs.INSTRUCTION, **kwargs) as tracer:
            steer.edit(vla, tracer)

    context = {"plain": contextlib.nullcontext, "hook": lambda: bs.plain_hooks(vla, steer),
               "steer": lambda: steer.apply(vla), "edit": contextlib.nullcontext}[condition]
    fn = edit if condition == "edit" else call
    with context():
        for _ in range(calls):
            fn()


def _measure_child(vla, steer, condition: str, calls: int) -> dict:
    """In a forked child: one unmeasured call (after fork() torch and the allocator set themselves up again, ~30 MB
    once), then ``calls`` measured calls of ``condition``; reports the peak growth (MB)."""
    _run(vla, steer, condition, 1)
    reset = _reset_peak()
    start_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    _run(vla, steer, condition, calls)
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    return {"peak_extra_mb": (peak_kb - start_kb) / 1024, "start_rss_mb": start_kb / 1024,
            "peak_rss_mb": peak_kb / 1024, "peak_reset": reset, "seconds": seconds}


def _fork_measure(vla, steer, condition: str, calls: int) -> dict:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            result = _measure_child(vla, steer, condition, calls)
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            result = {"error": f"{type(error).__name__}: {error}"}
        with os.fdopen(write, "w") as pipe:
            pipe.write(json.dumps(result))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(text) if text else {"error": "the measuring child died"}


def measure(family: str, size: str, calls: int) -> dict:
    """Build one model (nothing else run in this process) and measure every condition in a fork of it."""
    import torch

    import bench_steering as bs
    from nnsight_vla.steering import Steering

    torch.set_num_threads(1)  # no OpenMP pool before fork()
    rss_before = _status_kb("VmRSS")
    vla = bs.build(family, size)
    vla.dispatch()
    steer = Steering(bs.late_neurons(vla, vla.stacks[-1].name), bs.ALPHA)  # pi0: the expert (every step)
    model_mb = sum(p.numel() * p.element_size() for p in vla._module.parameters()) / 2**20
    entry = {"model": vla.describe(), "stack": steer.stack, "neurons": len(steer.neurons), "calls": calls,
             "param_mb": model_mb, "rss_after_build_mb": _status_kb("VmRSS") / 1024,
             "build_growth_mb": (_status_kb("VmRSS") - rss_before) / 1024, "conditions": {}}
    for condition in CONDITIONS:  # pay every one-time cost before measuring anything
        _run(vla, steer, condition, 1)
    entry["rss_after_warmup_mb"] = _status_kb("VmRSS") / 1024
    for condition in CONDITIONS:
        entry["conditions"][condition] = _fork_measure(vla, steer, condition, calls)
    extra = {c: r.get("peak_extra_mb") for c, r in entry["conditions"].items()}
    if all(v is not None for v in extra.values()):
        entry["ratios"] = {"steer_over_plain": extra["steer"] / max(extra["plain"], 1e-9),
                           "steer_over_hook": extra["steer"] / max(extra["hook"], 1e-9),
                           "edit_over_plain": extra["edit"] / max(extra["plain"], 1e-9)}
        entry["steer_minus_plain_mb"] = extra["steer"] - extra["plain"]
    return entry


def _one(args) -> None:
    """Worker mode: measure one (family, size) and print its JSON (a fresh process per model)."""
    family, size, calls = args.worker
    logging.getLogger("nnsight_vla").setLevel(logging.ERROR)
    print(json.dumps(measure(family, size, int(calls))))


def main(argv: list[str] | None = None) -> dict:
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--families", nargs="*", default=["openvla", "pi0", "pi0-fast"])
    parser.add_argument("--sizes", nargs="*", default=["tiny", "medium"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=3, metavar=("FAMILY", "SIZE", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _one(args)
        return {}
    started = time.time()
    results: dict = {"benchmark": "memory", "method": "growth of peak RSS (VmHWM after clear_refs) over the resident "
                     "set of a fork of a process holding only the built model", "calls": args.calls,
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": sys.version.split()[0]}, "families": {}}
    for family in args.families:
        results["families"][family] = {}
        for size in args.sizes:
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            proc = subprocess.run([sys.executable, __file__, "--worker", family, size, str(args.calls)],
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                entry = {"error": (proc.stderr or proc.stdout)[-2000:]}
            else:
                entry = json.loads(lines[-1])
            results["families"][family][size] = entry
            extra = {c: round(r.get("peak_extra_mb", float("nan")), 1)
                     for c, r in entry.get("conditions", {}).items()}
            print(f"{family:9s} {size:7s} model {entry.get('param_mb', float('nan')):7.1f} MB  peak extra per call "
                  f"{extra}  steer/plain {entry.get('ratios', {}).get('steer_over_plain', float('nan')):.3f}",
                  flush=True)
    # how the extra memory scales with the model (medium vs tiny)
    for sizes in results["families"].values():
        if all("ratios" in sizes.get(s, {}) for s in ("tiny", "medium")):
            tiny, medium = sizes["tiny"], sizes["medium"]
            sizes["scaling"] = {
                "param_ratio_medium_over_tiny": medium["param_mb"] / tiny["param_mb"],
                "plain_extra_ratio": medium["conditions"]["plain"]["peak_extra_mb"]
                / max(tiny["conditions"]["plain"]["peak_extra_mb"], 1e-9),
                "steer_minus_plain_mb": {"tiny": tiny["steer_minus_plain_mb"],
                                         "medium": medium["steer_minus_plain_mb"]},
            }
    results["seconds"] = round(time.time() - started, 1)
    from nnsight_vla import files

    files.write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
