"""Train the small OpenVLA end to end with one seeded command (``nnsight-vla train --seed 0``): corpus and
tokenizer (every concept word one token), cached demonstrations, phase 0 vision (localise gripper and target),
phase 1 language, phase 1b grounding questions (saved as the base), phase 2 LoRA action fine-tuning with
language and grounding co-training (saved as the policy); both reloaded through ``nv.load`` and checked.
Every random draw comes from the seed; a fixed torch thread count keeps reductions deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import files

SCENE_KEY = "arm_scene"  # the norm_stats key (OpenVLA's unnorm_key) of the trained model
BASE_NAME = "openvla_small_base"
FINETUNED_NAME = "openvla_small"


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the log)."""

    seed: int = 0
    n_documents: int = 60000
    eval_documents: int = 500
    phase1_steps: int = 3000
    phase1_batch: int = 64
    phase1_lr: float = 3e-3
    phase1b_steps: int = 400
    phase1b_lr: float = 1e-3
    image_shift: int = 2
    vqa_weight: float = 0.3
    restrict_action_softmax: bool = True
    phase0_steps: int = 400
    phase0_batch: int = 64
    phase0_lr: float = 2e-3
    n_episodes: int = 360
    val_episodes: int = 24
    max_demo_steps: int = 60
    demo_noise: float = 0.3
    phase2_steps: int = 800
    phase2_batch: int = 32
    phase2_lr: float = 2e-3
    lora_rank: int = 16
    lora_alpha: int = 32
    text_weight: float = 0.5
    text_batch: int = 32
    closed_loop_trials: int = 16  # unsteered episodes of the fine-tuned policy after training (closed_loop.py)
    action_input_noise: float = 0.0  # phase 2: chance that a teacher-forced input action token is another step's
    recovery_episodes: int = 0  # phase 2 only: extra demonstrations that start high above the usual start
    phase2_seed: int | None = None  # None: phase 2 continues phases 0-1b's random streams; an int: fresh ones
    threads: int = 2
    workers: int = 2
    dims: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, seed: int = 0) -> "TrainConfig":
        """A few-minute configuration for development and tests (weak model)."""
        return cls(seed=seed, n_documents=3000, eval_documents=100, phase0_steps=30, phase1_steps=60, phase1b_steps=20,
                   n_episodes=18, val_episodes=3, phase2_steps=40, max_demo_steps=40, closed_loop_trials=2)


#: the fields that act in phase 2 only: a run that differs from a saved one in these alone can start from its base
PHASE2_FIELDS = ("phase2_steps", "phase2_batch", "phase2_lr", "lora_rank", "lora_alpha", "vqa_weight",
                 "restrict_action_softmax", "action_input_noise", "recovery_episodes", "phase2_seed",
                 "closed_loop_trials", "threads", "workers")


def seed_everything(seed: int, threads: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True)


def _write_json(path: Path, data) -> None:
    files.write_json(path, data, indent=1, default=float)


def default_work_dir() -> Path:
    """Where rendered demonstrations are cached: ``$NNSIGHT_VLA_CACHE/train_work`` or
    ``~/.cache/nnsight_vla/train_work`` (never inside the package)."""
    root = os.environ.get("NNSIGHT_VLA_CACHE") or Path.home() / ".cache" / "nnsight_vla"
    return Path(root) / "train_work"


def _demo_cache_key(plans, image_size: int, max_steps: int) -> str:
    from ..envs.arm_scene import SceneConfig

    from .demos import physical_plan

    # the wording of the instructions does not change the rendered episodes: it is re-attached after loading
    blob = json.dumps({"plans": [physical_plan(p) for p in plans], "scene": asdict(SceneConfig(image_size=image_size)),
                       "max_steps": max_steps, "version": 3}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def machine_load() -> dict:
    """Load averages and core count, to put timings in context."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        one = five = fifteen = float("nan")
    return {"cpus": os.cpu_count(), "loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen}


def weights_digest(folder: Path) -> str:
    """SHA-256 over the checkpoint's safetensors files (to compare two runs)."""
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


def demonstrations(config: TrainConfig, image_size: int, work: str | os.PathLike | None = None,
                   progress: bool = True, plans: list | None = None) -> tuple[list, dict, Path]:
    """(plans, demos, cache file) of a training run (``plans``: default, the run's ordinary episodes): rendered
    once per physical plan and cached in ``work`` (the instructions' wording is re-attached from the plans, so
    rephrasing keeps the cache)."""
    from .demos import collect_demos, load_demos, plan_demos, save_demos

    work = Path(work) if work is not None else default_work_dir()
    if plans is None:
        plans = plan_demos(config.n_episodes, seed=config.seed, noise=config.demo_noise)
    cache = work / f"demos_{_demo_cache_key(plans, image_size, config.max_demo_steps)}.npz"
    if cache.is_file():
        demos = load_demos(cache)
        for record, plan in zip(demos["episodes"], plans):
            record["instruction"] = plan.instruction
    else:
        demos = collect_demos(plans, image_size, max_steps=config.max_demo_steps, workers=config.workers,
                              progress=progress)
        save_demos(cache, demos)
    return plans, demos, cache


def check_base_run(folder: str | os.PathLike, config: TrainConfig) -> dict:
    """The log of the finished run in ``folder`` whose base ``config`` may start from: it must have a
    ``phase2_seed`` (phase 2 then draws only from fresh streams, so starting from the saved base gives what the
    whole run gives), agree with the saved run in every field outside :data:`PHASE2_FIELDS`, and the saved
    base must still have the digest its log recorded."""
    from ..errors import InputError

    folder = Path(folder)
    if config.phase2_seed is None:
        raise InputError("starting from a saved base needs --phase2-seed: without it phase 2 continues the random "
                         "streams of phases 0-1b, which a restart cannot reproduce")
    log_path, base = folder / "training_log.json", folder / BASE_NAME
    if not log_path.is_file() or not base.is_dir():
        raise InputError(f"{folder} holds no finished training run ({log_path.name} and {BASE_NAME}/ expected)")
    saved = json.loads(log_path.read_text())
    mine = asdict(config)
    differ = sorted(k for k in mine if k not in PHASE2_FIELDS and saved["config"].get(k, mine[k]) != mine[k])
    if differ:
        raise InputError(f"the run in {folder} differs from this one outside phase 2 ({', '.join(differ)}); "
                         "its base is not this run's base")
    digest = weights_digest(base)
    if digest != saved["final"]["digests"]["base"]:
        raise InputError(f"{base} changed since its run wrote it (digest {digest[:12]}, logged "
                         f"{saved['final']['digests']['base'][:12]})")
    return saved


def train(out: str | os.PathLike, config: TrainConfig, work: str | os.PathLike | None = None,
          progress: bool = True, records: bool | None = None, from_base: str | os.PathLike | None = None) -> dict:
    """Run the whole training (see the module docstring); returns the log written to ``<out>/training_log.json``.

    ``progress`` shows progress bars; ``records`` (default: as ``progress``) prints each step record as a JSON
    line on stdout, so a run redirected to a file still shows where it is. ``from_base``: the folder of a
    finished run to take phases 0-1b from (its base checkpoint and records; see :func:`check_base_run`), for
    recipe changes that act in phase 2 only: the result is the one the whole run would give."""
    echo = progress if records is None else records
    import torch

    from ..models.tokenizer import build_llama_style_tokenizer
    from .actions import dataset_statistics
    from .corpus import (LEVELS, PHRASE_SETS, SPEED_LEVELS, STEERED_CONCEPTS, all_concept_words, check_demo_phrases,
                         check_prompt_words, check_single_tokens, generate_corpus, task_instruction, tokenizer_corpus)
    from .finetune import (ActionBatches, direction_accuracy, evaluate_actions, free_running_accuracy,
                           train_actions)
    from .language import TextBatches, evaluate_lm, manner_accuracy, train_language
    from .lora import LoraSettings, attach_lora, merge_lora, trainable_count
    from .model import ModelDims, build_vla, parameter_count, set_norm_stats
    from .vision import train_vision
    from .vqa import VQABatches, vqa_accuracy

    out = Path(out)
    work = Path(work) if work is not None else default_work_dir()
    t_start = time.perf_counter()
    seed_everything(config.seed, config.threads)
    dims = ModelDims(**config.dims)
    log: dict = {"config": asdict(config), "dims": dims.to_dict(), "machine": {"start": machine_load(),
                 "platform": platform.platform(), "torch_threads": config.threads}, "records": [], "timings": {}}
    log_path = out / "training_log.json"

    def record(entry: dict) -> None:
        log["records"].append(entry)
        if echo:
            print(json.dumps(entry, default=float), flush=True)

    # 1. corpus and tokenizer
    t0 = time.perf_counter()
    documents = generate_corpus(config.n_documents, seed=config.seed)
    tokenizer = build_llama_style_tokenizer(tokenizer_corpus(documents, seed=config.seed), vocab_size=dims.vocab)
    split = check_single_tokens(tokenizer, all_concept_words())
    rng = np.random.default_rng(config.seed)
    probe = [task_instruction(rng, s, h, phrase_set=p).text for s in SPEED_LEVELS for h in LEVELS
             for p in PHRASE_SETS for _ in range(10)]
    fused = check_prompt_words(tokenizer, probe)
    leaks = check_demo_phrases()
    if split or fused or leaks:
        raise RuntimeError(f"corpus check failed: split concept words {split}, prompts not word-by-word {fused}, "
                           f"concept words in demonstration phrases {leaks}")
    log["timings"]["corpus_tokenizer_s"] = time.perf_counter() - t0
    log["corpus"] = {"documents": len(documents), "examples": documents[:8]}

    # 2. demonstrations (cached: they are the slowest data to make)
    t0 = time.perf_counter()
    plans, demos, cache = demonstrations(config, dims.image_size, work, progress)
    successes = [ep["success"] for ep in demos["episodes"]]
    log["timings"]["demos_s"] = time.perf_counter() - t0
    log["demos"] = {"episodes": len(plans), "steps": int(len(demos["actions"])),
                    "expert_success": float(np.mean(successes)),
                    "cache": str(cache)}
    stats = dataset_statistics(demos["actions"], len(plans))

    # 3. the model; the phase-0 split of the episodes
    torch.manual_seed(config.seed)
    vla = build_vla(dims, tokenizer, seed=config.seed)
    set_norm_stats(vla, SCENE_KEY, stats)
    model = vla._module
    log["parameters"] = {"total": parameter_count(model), "language_model": parameter_count(model.language_model),
                         "vision_backbone": parameter_count(model.vision_backbone),
                         "projector": parameter_count(model.projector)}
    episodes = np.arange(len(plans))
    val_eps = episodes[-config.val_episodes:] if config.val_episodes else episodes[:0]
    train_eps = episodes[: len(episodes) - len(val_eps)]
    train_rows = np.nonzero(np.isin(demos["episode"], train_eps))[0]
    val_rows = np.nonzero(np.isin(demos["episode"], val_eps))[0]
    eval_docs, train_docs = documents[: config.eval_documents], documents[config.eval_documents:]
    text = TextBatches(tokenizer, train_docs, seed=config.seed)
    text_eval = TextBatches(tokenizer, eval_docs, seed=config.seed).batch(0, np.arange(len(eval_docs)))
    vqa_train = VQABatches(vla, demos, train_rows, seed=config.seed, max_shift=config.image_shift)
    vqa_val_rows = val_rows[np.linspace(0, len(val_rows) - 1, min(len(val_rows), 256)).astype(int)]
    base_dir = out / BASE_NAME

    if from_base is None:
        # 4. phase 0: vision (the featurizers learn to localise gripper and target)
        t0 = time.perf_counter()
        train_vision(vla, demos, config.phase0_steps, train_rows, batch_size=config.phase0_batch,
                     lr=config.phase0_lr, seed=config.seed, log=record, progress=progress, val_rows=val_rows)
        log["timings"]["phase0_s"] = time.perf_counter() - t0

        # 5. phase 1: language
        t0 = time.perf_counter()
        train_language(model.language_model, text, config.phase1_steps, batch_size=config.phase1_batch,
                       lr=config.phase1_lr, log=record, eval_batches=text_eval, progress=progress)
        log["timings"]["phase1_s"] = time.perf_counter() - t0
        record({"phase": 1, "manner_accuracy": manner_accuracy(model.language_model, tokenizer, seed=config.seed)})

        # 5b. phase 1b: grounding questions on the scene's frames (the VLM stage), language batches mixed in
        t0 = time.perf_counter()
        train_actions(model, vqa_train, config.phase1b_steps, text=text, batch_size=config.phase2_batch,
                      text_batch_size=config.text_batch, text_weight=config.text_weight, lr=config.phase1b_lr,
                      log=record, text_eval=text_eval, progress=progress, phase="1b", desc="phase 1b (grounding)",
                      evaluate=lambda m: {"vqa_accuracy": vqa_accuracy(m, vqa_train, vqa_val_rows)}, eval_every=250)
        log["timings"]["phase1b_s"] = time.perf_counter() - t0
        vla.save_pretrained(base_dir)
    else:
        # 4-5b. phases 0-1b as a finished run did them: its base weights, records and timings
        saved = check_base_run(from_base, config)
        source = Path(from_base) / BASE_NAME
        if source.resolve() != base_dir.resolve():
            shutil.copytree(source, base_dir, dirs_exist_ok=True)
        log["from_base"] = {"folder": str(Path(from_base).resolve()), "digest": saved["final"]["digests"]["base"]}
        for entry in saved["records"]:
            if entry.get("phase") in (0, 1, "1b"):
                record(entry)
        for key in ("phase0_s", "phase1_s", "phase1b_s"):
            log["timings"][key] = saved["timings"][key]

    if config.phase2_seed is not None:
        # phase 2 then depends on the saved base and the config only: it starts from the checkpoint as written
        # (the save drops the trained class-token position row, which the published layout does not have)
        _load_base_weights(model, base_dir)
    log["manner_accuracy"] = {"base": manner_accuracy(model.language_model, tokenizer, seed=config.seed)}
    record({"phase": "1b", "manner_accuracy": log["manner_accuracy"]["base"]})

    # 6. phase 2: actions (+ language): LoRA on the Llama, action-token rows, vision and projector in full
    action_seed = config.seed
    if config.phase2_seed is not None:  # fresh random streams
        torch.manual_seed(config.phase2_seed)
        action_seed = [config.phase2_seed, 0]
        text.rng = np.random.default_rng([config.phase2_seed, 1])
        vqa_train.reseed([config.phase2_seed, 2])
    action_demos, action_eps = demos, train_eps
    if config.recovery_episodes:  # phase 2 only: phases 0-1b, the statistics and the val episodes stay as they are
        from .demos import merge_demos, plan_recovery_demos

        recovery_plans = plan_recovery_demos(config.recovery_episodes, seed=config.seed, first_index=len(plans),
                                             noise=config.demo_noise)
        _, recovery, recovery_cache = demonstrations(config, dims.image_size, work, progress, plans=recovery_plans)
        log["demos"]["recovery"] = {"episodes": len(recovery_plans), "steps": int(len(recovery["actions"])),
                                    "expert_success": float(np.mean([e["success"] for e in recovery["episodes"]])),
                                    "cache": str(recovery_cache)}
        action_demos = merge_demos(demos, recovery)
        action_eps = np.concatenate([train_eps, len(plans) + np.arange(len(recovery_plans))])
    data = ActionBatches(vla, action_demos, stats, episodes=action_eps, seed=action_seed,
                         max_shift=config.image_shift, input_noise=config.action_input_noise)
    val = ActionBatches(vla, demos, stats, episodes=val_eps, seed=config.seed) if len(val_eps) else None
    t0 = time.perf_counter()
    peft_model = attach_lora(model, vla.action_token_ids, LoraSettings(config.lora_rank, config.lora_alpha))
    log["parameters"]["phase2_trainable"] = trainable_count(model)[0]
    train_actions(model, data, config.phase2_steps, text=text, batch_size=config.phase2_batch,
                  text_batch_size=config.text_batch, text_weight=config.text_weight, lr=config.phase2_lr,
                  log=record, val=val, text_eval=text_eval, progress=progress, aux=vqa_train,
                  aux_weight=config.vqa_weight,
                  restrict_ids=torch.as_tensor(vla.action_token_ids) if config.restrict_action_softmax else None,
                  evaluate=(lambda m: {**direction_accuracy(m, val, SCENE_KEY),
                                       "vqa_accuracy": vqa_accuracy(m, vqa_train, vqa_val_rows)})
                  if val is not None else None)
    merge_lora(peft_model)
    log["timings"]["phase2_s"] = time.perf_counter() - t0
    log["manner_accuracy"]["finetuned"] = manner_accuracy(model.language_model, tokenizer, seed=config.seed)
    tuned_dir = out / FINETUNED_NAME
    vla.save_pretrained(tuned_dir)

    # 7. reload through the real loader and check
    final = {"text_eval_loss": evaluate_lm(model.language_model, *text_eval)}
    if val is not None:
        final["val"] = {**evaluate_actions(model, val), **direction_accuracy(model, val, SCENE_KEY),
                        **free_running_accuracy(val, SCENE_KEY)}
    final["reload"], reloaded = {}, {}
    for name, folder in (("base", base_dir), ("finetuned", tuned_dir)):
        final["reload"][name], reloaded[name] = _check_reload(folder, model if name == "finetuned" else None)
    if config.closed_loop_trials:
        from .closed_loop import closed_loop_check

        final["closed_loop"] = check = closed_loop_check(reloaded["finetuned"], trials=config.closed_loop_trials)
        record({"phase": "closed loop", **check})
        if not check["healthy"]:
            warnings.warn(f"the fine-tuned policy fails the closed-loop check (success {check['success_rate']:.2f}, "
                          f"median highest point {check['median_max_height_table']:.2f} m above the table; "
                          f"thresholds {check['thresholds']}): steering results on it say little about the method",
                          stacklevel=2)
    final["digests"] = {"base": weights_digest(base_dir), "finetuned": weights_digest(tuned_dir)}
    final["sizes_bytes"] = {name: sum(p.stat().st_size for p in folder.iterdir())
                            for name, folder in (("base", base_dir), ("finetuned", tuned_dir))}
    log["final"] = final
    log["timings"]["total_s"] = time.perf_counter() - t_start
    log["machine"]["end"] = machine_load()
    log["concepts"] = list(STEERED_CONCEPTS)
    _write_json(log_path, log)
    return log


def _load_base_weights(model, folder: Path) -> None:
    """Copy the weights of the checkpoint ``folder`` (read with the real loader) into ``model``, strictly, and
    drop earlier phases' gradients (the phase-2 loop clips the norm over all parameters, frozen ones included,
    so a stale gradient would shrink every update)."""
    import nnsight_vla as nv

    model.load_state_dict(nv.load("openvla", str(folder), dispatch=True)._module.state_dict(), strict=True)
    model.zero_grad(set_to_none=True)


def _check_reload(folder: Path, model=None) -> tuple[dict, object]:
    """Load ``folder`` with ``nv.load`` and (for the in-memory model) compare logits on one input; returns that
    comparison and the loaded model."""
    import torch

    import nnsight_vla as nv

    vla = nv.load("openvla", str(folder), dispatch=True)
    info = {"describe": vla.describe()}
    if model is not None:
        image = np.zeros((vla.image_processor.image_size[0],) * 2 + (3,), np.uint8)
        ids, pixels = vla.prepare(image, "move the arm to the green block")
        with torch.no_grad():
            a = vla._module(input_ids=ids, pixel_values=pixels).logits
            b = model(input_ids=ids, pixel_values=pixels).logits
        info["max_logit_diff"] = float((a - b).abs().max())
    return info, vla
