"""The README's first command: load a small offline VLA, trace it, steer it, print what changed."""

from __future__ import annotations

import time

import numpy as np
import torch

ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")


def synthetic_scene(seed: int = 0, size: int = 128) -> np.ndarray:
    """A simple table-top-like RGB image: a gradient background and a coloured block."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.4 + 0.3 * y, 0.35 + 0.2 * x, 0.3 + 0.1 * (x + y)], axis=-1)
    r0, c0 = rng.integers(size // 4, size // 2, 2)
    image[r0:r0 + size // 5, c0:c0 + size // 5] = rng.uniform(0, 1, 3)
    return (image * 255).astype(np.uint8)


def run_demo(seed: int = 0, alpha: float = 8.0) -> dict:
    import nnsight_vla as nv

    t0 = time.perf_counter()
    vla = nv.tiny("openvla", seed=seed)
    print(f"loaded {vla.describe()} in {time.perf_counter() - t0:.1f}s")
    image, instruction = synthetic_scene(seed), "pick up the black bowl"

    # pick the late-layer value vectors that most promote action tokens (a one-line logit lens)
    layers = list(range(vla.num_layers // 2, vla.num_layers))
    with torch.no_grad():
        unembed = vla.unembedding()[torch.as_tensor(vla.action_token_ids)]
        scores = torch.stack([(unembed @ vla.value_vectors(layer)).max(dim=0).values for layer in layers])
    top = torch.topk(scores.flatten(), 8).indices
    neurons: dict[int, list[int]] = {}
    for flat in top.tolist():
        neurons.setdefault(layers[flat // vla.d_mlp], []).append(flat % vla.d_mlp)
    print("steering neurons (layer: indices):", neurons)

    kwargs = dict(unnorm_key=None, restrict_to_action_tokens=True)
    baseline = vla.predict_action(image, instruction, **kwargs)
    with vla.predict_action(image, instruction, **kwargs) as tracer:
        for _ in tracer.iter[:7]:  # every forward pass that produces an action token
            for layer, idx in sorted(neurons.items()):  # requests must follow execution order
                vla.layers[layer].mlp.act.output[..., idx] = alpha
        steered = tracer.result.save()

    print(f"\n{'':>8} {'baseline':>10} {'steered':>10} {'change':>10}")
    for name, b, s in zip(ACTION_NAMES, baseline, steered):
        print(f"{name:>8} {b:>10.4f} {s:>10.4f} {s - b:>+10.4f}")
    changed = int(np.sum(~np.isclose(baseline, steered)))
    print(f"\n{changed}/7 action dimensions changed (alpha={alpha}); total {time.perf_counter() - t0:.1f}s")
    return {"baseline": baseline, "steered": steered, "neurons": neurons}
