"""Phase 0: vision pretraining of the two featurizers on the scene's images (a stand-in for OpenVLA's pretrained
DINOv2 / SigLIP towers).

Why: OpenVLA starts from vision towers pretrained on web images; a tower trained from scratch only by the
action loss (with a few thousand frames and minutes of CPU) does not learn where the gripper and the target are
(observed: the policy then moves the same way whatever side the target is on). Here the featurizers learn to
localise them: a linear read-out of the concatenated patch features regresses the gripper's lateral position and
height, the target's lateral position and their lateral offset (standardised). The read-out is discarded; the
towers keep what they learned. The LLM and the projector are untouched.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from .language import cosine_schedule, make_optimizer


def vision_targets(demos: dict) -> np.ndarray:
    """(N, 4) regression targets: gripper y, gripper z, target y, target y - gripper y."""
    eef, target = demos["eef"], demos["target"]
    return np.stack([eef[:, 1], eef[:, 2], target[:, 1], target[:, 1] - eef[:, 1]], axis=1).astype(np.float32)


def train_vision(
    vla,
    demos: dict,
    steps: int,
    rows: np.ndarray,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    warmup: int = 30,
    log: Callable[[dict], None] | None = None,
    log_every: int = 50,
    progress: bool = True,
    val_rows: np.ndarray | None = None,
) -> list[dict]:
    """Train ``vla``'s vision backbone on the demonstration frames ``rows``; returns the loss records
    (``r2``: the read-out's mean R^2 over the four targets on the batch)."""
    from tqdm.auto import tqdm

    model = vla._module
    backbone = model.vision_backbone
    targets = vision_targets(demos)
    mean, std = targets[rows].mean(0), targets[rows].std(0) + 1e-6
    targets = torch.from_numpy((targets - mean) / std)
    with torch.no_grad():
        probe = backbone(vla.image_processor(demos["images"][rows[0]]).unsqueeze(0))
    torch.manual_seed(seed)
    head = nn.Linear(probe.shape[1] * probe.shape[2], targets.shape[1])
    params = list(backbone.parameters()) + list(head.parameters())
    opt = make_optimizer(params, lr)
    rng = np.random.default_rng(seed)
    backbone.train()
    records, running = [], []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="phase 0 (vision)", disable=not progress, mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * cosine_schedule(step, steps, warmup)
        batch = rows[rng.integers(len(rows), size=batch_size)]
        pixels = torch.stack([vla.image_processor(demos["images"][i]) for i in batch])
        pred = head(backbone(pixels).flatten(1))
        loss = nn.functional.mse_loss(pred, targets[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean_loss = float(np.mean(running))
            record = {"phase": 0, "step": step + 1, "loss": mean_loss, "r2": 1.0 - mean_loss,
                      "seconds": time.perf_counter() - t0}
            running = []
            records.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if log is not None:
                log(record)
    backbone.eval()
    if val_rows is not None and len(val_rows):
        with torch.no_grad():
            preds = []
            for start in range(0, len(val_rows), 128):
                chunk = val_rows[start:start + 128]
                pixels = torch.stack([vla.image_processor(demos["images"][i]) for i in chunk])
                preds.append(head(backbone(pixels).flatten(1)))
            pred = torch.cat(preds)
            truth = targets[val_rows]
            r2 = 1 - ((pred - truth) ** 2).mean(0) / truth.var(0)
        records.append({"phase": 0, "val_r2": [float(x) for x in r2], "targets": ["eef_y", "eef_z", "target_y",
                                                                                  "offset_y"]})
        if log is not None:
            log(records[-1])
    return records
