"""OpenVLA's action format for training: dataset statistics, q01/q99 normalisation ("bounds_q99", gripper not
normalised) and 256-bin action tokens (id = vocab - bin), as in OpenVLA's data_utils.py and action_tokenizer.py.
The inverse is the model's own :class:`~nnsight_vla.models.openvla.ActionBins`, so what is trained here is decoded
by the real inference path.
"""

from __future__ import annotations

import numpy as np

N_BINS = 256


def dataset_statistics(actions: np.ndarray, n_trajectories: int, gripper_dims: tuple[int, ...] = (6,)) -> dict:
    """OpenVLA's statistics of an (N, D) action array (the ``norm_stats[key]`` entry of config.json)."""
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or len(actions) == 0:
        raise ValueError(f"actions must be a non-empty (N, D) array, got shape {actions.shape}")
    mask = np.ones(actions.shape[1], dtype=bool)
    mask[list(gripper_dims)] = False
    dim = actions.shape[1]

    def stats(x: np.ndarray) -> dict:
        return {
            "mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "max": x.max(0).tolist(), "min": x.min(0).tolist(),
            "q01": np.quantile(x, 0.01, axis=0).tolist(), "q99": np.quantile(x, 0.99, axis=0).tolist(),
        }

    return {
        "action": {**stats(actions), "mask": mask.tolist()},
        # the scene's policy takes no proprioception; OpenVLA's files carry zeros then
        "proprio": {k: [0.0] * dim for k in ("mean", "std", "max", "min", "q01", "q99")},
        "num_transitions": int(len(actions)),
        "num_trajectories": int(n_trajectories),
    }


def normalize(actions: np.ndarray, stats: dict) -> np.ndarray:
    """Actions -> [-1, 1] with the q01/q99 bounds (unmasked dims, the gripper, pass through)."""
    a = np.asarray(actions, dtype=np.float64)
    s = stats["action"]
    low, high = np.asarray(s["q01"]), np.asarray(s["q99"])
    mask = np.asarray(s.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    scaled = np.clip(2 * (a - low) / (high - low + 1e-8) - 1, -1, 1)
    return np.where(mask, scaled, a)


def to_tokens(normalized: np.ndarray, token_vocab_size: int, n_bins: int = N_BINS) -> np.ndarray:
    """Normalised actions -> action token ids (OpenVLA's ActionTokenizer: id = vocab - bin, bin in 1..n_bins)."""
    bins = np.linspace(-1, 1, n_bins)
    discretized = np.digitize(np.clip(np.asarray(normalized, dtype=np.float64), -1, 1), bins)
    return (int(token_vocab_size) - discretized).astype(np.int64)
