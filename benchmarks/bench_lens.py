"""Benchmark the value-vector lens; writes benchmarks/results/lens.json.

Measured in one run, on whatever device ``torch`` finds ("cuda" when available, else CPU):

1. throughput: :func:`nnsight_vla.lens.project_topk` (streamed, chunked) vs a plain dense ``torch.matmul`` +
   ``torch.topk`` over the same shapes, in the same process (target >= 0.70);
2. end to end: ``ValueVectorLens`` on a medium OpenVLA-architecture model (fingerprint + projection + cache
   write) vs the dense reference on its weights; then the second call from the disk cache (target >= 100x);
   and the time of concept discovery on it;
3. peak memory: extra memory of the streamed projection vs the dense one, each in a fresh subprocess
   (CPU: growth of the peak resident set, VmHWM; GPU: ``torch.cuda.max_memory_allocated``), against the
   ``chunk x vocab`` logits block the streamed version is designed to be bounded by;
4. scaling: time over a few (layers, d_mlp, vocab) sizes; the log-log slope of time vs layers x d_mlp x vocab
   (1.0 = linear) and the time per multiply-accumulate, used to extrapolate OpenVLA-7B (32 x 11008 x 32064,
   d_model 4096) on this device.

Run: ``python benchmarks/bench_lens.py`` (about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "lens.json"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K = 10


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeats=2):
    best = float("inf")
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best


def _random(layers, d_model, d_mlp, vocab, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mats = [torch.randn(d_model, d_mlp, generator=gen).to(DEVICE, dtype) for _ in range(layers)]
    unembedding = torch.randn(vocab, d_model, generator=gen).to(DEVICE, dtype)
    return mats, unembedding


def dense_reference(mats, unembedding, k=K):
    """The plain computation: per layer all (d_mlp x vocab) logits at once, then topk."""
    out = []
    for w in mats:
        top = torch.topk(torch.matmul(w.T.float(), unembedding.float().T), k, dim=1)
        out.append((top.indices.cpu(), top.values.cpu()))
    return out


def bench_throughput():
    from nnsight_vla.lens import auto_chunk_size, project_topk

    shape = dict(layers=3, d_model=512, d_mlp=2048, vocab=32000) if DEVICE == "cpu" else \
        dict(layers=8, d_model=4096, d_mlp=11008, vocab=32064)
    mats, unembedding = _random(**shape)
    macs = shape["layers"] * shape["d_mlp"] * shape["vocab"] * shape["d_model"]
    t_ref = _timed(lambda: dense_reference(mats, unembedding))
    results = {"shape": shape, "k": K, "dense_s": t_ref, "dense_gflops": 2 * macs / t_ref / 1e9, "streamed": []}
    auto = auto_chunk_size(shape["vocab"], DEVICE)
    for chunk in (auto, 256):
        t = _timed(lambda c=chunk: project_topk(mats, unembedding, K, chunk_size=c, device=DEVICE, progress=False))
        results["streamed"].append({"chunk_size": chunk, "seconds": t, "ratio_vs_dense": t_ref / t})
    ids, _ = project_topk(mats, unembedding, K, chunk_size=256, device=DEVICE, progress=False)
    ref = dense_reference(mats[:1], unembedding)
    results["equal_to_dense"] = bool(np.array_equal(ids[0], ref[0][0].numpy()))
    results["ratio_vs_dense"] = results["streamed"][0]["ratio_vs_dense"]
    return results


def medium_model():
    import nnsight_vla as nv

    if DEVICE == "cpu":
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=8)
    else:
        text = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=16)
    return nv.tiny("openvla", seed=0, vocab=32000, device=DEVICE, text=text)


def bench_end_to_end():
    from nnsight_vla.concepts import find_concept
    from nnsight_vla.lens import ValueVectorLens

    vla = medium_model()
    n_layers, d_model, d_mlp = vla.stack_dims()
    rows = len(vla.tokenizer)
    mats = [vla.value_vectors(layer).detach() for layer in range(n_layers)]
    unembedding = vla.unembedding().detach()[:rows]
    # alternate the two (twice each, best of) so that load from other processes hits both alike
    t_ref = t_lens = float("inf")
    for _ in range(2):
        t_ref = min(t_ref, _timed(lambda: dense_reference(mats, unembedding), repeats=1))
        t_lens = min(t_lens, _timed(lambda: ValueVectorLens(vla, k=K, cache_dir=False, progress=False), repeats=1))
    with tempfile.TemporaryDirectory() as cache:
        _sync()
        start = time.perf_counter()
        first = ValueVectorLens(vla, k=K, cache_dir=cache, progress=False)  # computes and writes the cache
        _sync()
        t_first = time.perf_counter() - start
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            second = ValueVectorLens(vla, k=K, cache_dir=cache, progress=False)
            seconds.append(time.perf_counter() - start)
        assert second.from_cache and np.array_equal(second.ids, first.ids)
        t_second = min(seconds)
        start = time.perf_counter()
        from nnsight_vla.lens import weight_fingerprint

        weight_fingerprint(mats + [unembedding])
        t_fingerprint = time.perf_counter() - start
        cache_mb = (os.path.getsize(first.cache_path) + os.path.getsize(str(first.cache_path) + ".json")) / 2**20
        timings = {}
        for method in ("knn", "keyword"):
            start = time.perf_counter()
            find_concept(first, "fast", size=10, method=method, k_neighbors=40)
            timings[method] = time.perf_counter() - start
    return {
        "model": {"layers": n_layers, "d_model": d_model, "d_mlp": d_mlp, "vocab_rows": rows, "k": K},
        "dense_s": t_ref, "lens_uncached_s": t_lens, "ratio_vs_dense": t_ref / t_lens,
        "lens_first_call_with_cache_write_s": t_first,
        "lens_cached_call_s": t_second, "cache_speedup": min(t_lens, t_first) / t_second,
        "fingerprint_s": t_fingerprint,
        "cache_files_mb": cache_mb,
        "find_concept_s": timings,
    }


MEMORY_SHAPE = dict(layers=2, d_model=512, d_mlp=4096, vocab=32000)
MEMORY_CHUNK = 256


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the peak-RSS mark (Linux: ``echo 5 > /proc/self/clear_refs``) and return the current RSS. (ru_maxrss
    cannot serve: it is inherited from the parent across fork + exec.)"""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # without it, VmHWM of a fresh process is still a valid (slightly pessimistic) upper bound
    return _status_bytes("VmRSS")


def _memory_worker(mode: str) -> dict:
    """Runs in a fresh process: extra peak memory of one projection over MEMORY_SHAPE."""
    from nnsight_vla.lens import project_topk

    mats, unembedding = _random(**MEMORY_SHAPE)
    torch.matmul(mats[0][:, :8].T, unembedding[:64].T)  # load BLAS / kernels before the baseline
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    if mode == "dense":
        dense_reference(mats, unembedding)
    else:
        project_topk(mats, unembedding, K, chunk_size=MEMORY_CHUNK, device=DEVICE, progress=False)
    if DEVICE == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_bytes("VmHWM") - base
    return {"peak_extra_mb": peak / 2**20}


def bench_memory():
    out = {"shape": MEMORY_SHAPE, "chunk_size": MEMORY_CHUNK, "method": "CUDA max_memory_allocated" if DEVICE == "cuda"
           else "growth of peak RSS (VmHWM after clear_refs) in a fresh subprocess"}
    for mode in ("streamed", "dense"):
        proc = subprocess.run([sys.executable, __file__, "--memory-worker", mode], capture_output=True, text=True,
                              check=True, stdin=subprocess.DEVNULL)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    vocab, n = MEMORY_SHAPE["vocab"], MEMORY_SHAPE["d_mlp"]
    out["chunk_logits_mb"] = MEMORY_CHUNK * vocab * 4 / 2**20
    out["full_layer_logits_mb"] = n * vocab * 4 / 2**20
    out["streamed_over_chunk_block"] = out["streamed"]["peak_extra_mb"] / out["chunk_logits_mb"]
    out["dense_over_streamed"] = out["dense"]["peak_extra_mb"] / max(out["streamed"]["peak_extra_mb"], 1e-9)
    return out


def bench_scaling():
    from nnsight_vla.lens import project_topk

    d_model = 256 if DEVICE == "cpu" else 4096
    sizes = [(2, 1024, 8000), (4, 1024, 8000), (4, 2048, 8000), (4, 2048, 16000), (4, 2048, 32000)]
    if DEVICE == "cuda":
        sizes = [(l * 2, n * 4, v) for l, n, v in sizes] + [(32, 11008, 32064)]
    rows = []
    for layers, d_mlp, vocab in sizes:
        mats, unembedding = _random(layers, d_model, d_mlp, vocab)
        t = _timed(lambda m=mats, u=unembedding: project_topk(m, u, K, device=DEVICE, progress=False), repeats=1)
        macs = layers * d_mlp * vocab * d_model
        rows.append({"layers": layers, "d_mlp": d_mlp, "vocab": vocab, "d_model": d_model, "seconds": t,
                     "ns_per_mac": t / macs * 1e9})
        del mats, unembedding
    work = np.log([r["layers"] * r["d_mlp"] * r["vocab"] for r in rows])
    slope = float(np.polyfit(work, np.log([r["seconds"] for r in rows]), 1)[0])
    per_mac = float(np.median([r["ns_per_mac"] for r in rows[2:]]))
    openvla_macs = 32 * 11008 * 32064 * 4096
    return {"d_model": d_model, "sizes": rows, "loglog_slope_time_vs_layers_x_dmlp_x_vocab": slope,
            "ns_per_mac_median": per_mac, "openvla_7b_estimate_s": openvla_macs * per_mac / 1e9}


def main():
    torch.manual_seed(0)
    started = time.perf_counter()
    results = {
        "device": DEVICE if DEVICE == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for name, fn in (("throughput", bench_throughput), ("end_to_end", bench_end_to_end),
                     ("memory", bench_memory), ("scaling", bench_scaling)):
        t = time.perf_counter()
        results[name] = fn()
        print(f"{name}: {time.perf_counter() - t:.1f}s", json.dumps(results[name], default=float)[:400], flush=True)
    results["targets"] = {
        "throughput_ratio_ge_0.70": results["throughput"]["ratio_vs_dense"] >= 0.70,
        "end_to_end_ratio_ge_0.70": results["end_to_end"]["ratio_vs_dense"] >= 0.70,
        "cache_speedup_ge_100": results["end_to_end"]["cache_speedup"] >= 100,
        "streamed_memory_below_dense": results["memory"]["dense_over_streamed"] > 1,
    }
    results["total_s"] = time.perf_counter() - started
    from nnsight_vla import files

    files.write_json(RESULTS, results, default=float)
    print(json.dumps(results["targets"]), f"-> {RESULTS} ({results['total_s']:.0f}s)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        print(json.dumps(_memory_worker(sys.argv[2])))
    else:
        main()
