"""Action fine-tuning on the demonstrations in OpenVLA's format (the exact inference prompt, then 7 action
tokens and ``</s>``; loss on those only), with language batches and grounding questions mixed in so the
language features stay in use. Phase 2 trains LoRA adapters (:mod:`.lora`); phase 1b reuses the loop for the
grounding questions.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .actions import normalize, to_tokens
from .language import IGNORE, TextBatches, cosine_schedule, lm_loss, make_optimizer, pad_batch

N_ACTION = 7


class ActionBatches:
    """Demonstration steps served as (input_ids, pixel_values, labels) batches, built with the model's own
    ``prepare`` (prompt and "▁") and image processor."""

    def __init__(self, vla, demos: dict, stats: dict, episodes: Sequence[int] | None = None, seed: int = 0,
                 max_shift: int = 0, input_noise: float = 0.0):
        if not 0.0 <= input_noise < 1.0:
            raise ValueError(f"input_noise is a probability in [0, 1), got {input_noise}")
        self.vla = vla
        self.images = demos["images"]
        episode_of = demos["episode"]
        keep = np.ones(len(episode_of), bool) if episodes is None else np.isin(episode_of, np.asarray(episodes))
        self.index = np.nonzero(keep)[0]
        if len(self.index) == 0:
            raise ValueError("no demonstration steps selected")
        normalized = normalize(demos["actions"], stats)
        self.targets = to_tokens(normalized, vla.config.token_vocab_size)  # (N, 7)
        eos = vla.tokenizer.eos_token_id
        self.pad = vla.tokenizer.pad_token_id
        instructions = [ep["instruction"] for ep in demos["episodes"]]
        dummy = np.zeros((8, 8, 3), np.uint8)
        prompts = {}
        for text in sorted(set(instructions)):
            ids, _ = vla.prepare(dummy, text)  # the exact inference prompt, trailing "▁" included
            prompts[text] = ids[0].numpy()
        self.prompt_of_step = [prompts[instructions[e]] for e in episode_of]
        self.instruction_of_step = [instructions[e] for e in episode_of]
        self.eos = eos
        self.rng = np.random.default_rng(seed)
        self.max_shift = int(max_shift)
        self.input_noise = float(input_noise)

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, size: int, rows: Sequence[int] | None = None):
        """(input_ids (B, T), pixel_values (B, 6, H, W), labels (B, T)); ``rows`` index the selected steps.
        Random batches are augmented with a random shift of up to ``max_shift`` pixels (OpenVLA augments with
        random crops) and, with ``input_noise`` > 0, each teacher-forced action token in the *input* is replaced
        with that probability by the same dimension's token of another random step (the labels stay): the
        dimensions of a step are strongly correlated, so under pure teacher forcing a model can read the arm's
        phase from the previous dimension's true token instead of the image, a cue it does not have when it
        decodes its own tokens. Donors from the data keep a replaced token plausible, so it cannot be told apart.
        Explicit ``rows`` (evaluation) are not augmented."""
        augment = rows is None
        if rows is None:
            rows = self.rng.integers(len(self.index), size=size)
        steps = self.index[np.asarray(rows)]
        seqs, labels = [], []
        for i in steps:
            prompt = self.prompt_of_step[i]
            target = np.concatenate([self.targets[i], [self.eos]])
            given = target
            if augment and self.input_noise > 0:
                swap = self.rng.random(N_ACTION) < self.input_noise
                donors = self.index[self.rng.integers(len(self.index), size=N_ACTION)]
                given = target.copy()
                given[:N_ACTION][swap] = self.targets[donors, np.arange(N_ACTION)][swap]
            seqs.append(np.concatenate([prompt, given]))
            labels.append(np.concatenate([np.full(len(prompt), IGNORE), target]))
        ids, lab = pad_batch(seqs, labels, self.pad)
        if augment and self.max_shift > 0:
            from .vqa import shift_image

            images = [shift_image(self.images[i], self.rng, self.max_shift) for i in steps]
        else:
            images = [self.images[i] for i in steps]
        pixels = torch.stack([self.vla.image_processor(image) for image in images])
        return ids, pixels, lab


def action_loss(model: nn.Module, ids: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor,
                restrict_ids: torch.Tensor | None = None):
    """(loss, token accuracy) over the labelled positions. Right padding needs no mask: the model is causal and
    padded positions come after everything that is scored.

    ``restrict_ids``: score only over these vocabulary ids (the action tokens): a 256-way softmax, matching
    decoding with ``restrict_to_action_tokens=True``; labels outside them (``</s>``) are not scored."""
    logits = model(input_ids=ids, pixel_values=pixels).logits
    n_patches = logits.shape[1] - ids.shape[1]
    scored = logits[:, n_patches:-1].float()  # position n_patches + j - 1 predicts text token j
    target = labels[:, 1:]
    if restrict_ids is not None:
        lookup = torch.full((scored.shape[-1],), IGNORE, dtype=torch.long)
        lookup[restrict_ids] = torch.arange(len(restrict_ids))
        target = torch.where(target == IGNORE, target, lookup[target.clamp(min=0)])
        scored = scored[..., restrict_ids]
    loss = nn.functional.cross_entropy(scored.reshape(-1, scored.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
    mask = target != IGNORE
    accuracy = (scored.argmax(-1)[mask] == target[mask]).float().mean()
    return loss, float(accuracy)


@torch.no_grad()
def evaluate_actions(model: nn.Module, data: ActionBatches, batch_size: int = 64, max_rows: int = 512) -> dict:
    """Loss, token accuracy and mean |bin error| of the 3 translation tokens on (up to ``max_rows``) rows."""
    model.eval()
    rows = np.arange(min(len(data), max_rows))
    losses, accs, bin_err = [], [], []
    for start in range(0, len(rows), batch_size):
        ids, pixels, labels = data.batch(0, rows[start:start + batch_size])
        logits = model(input_ids=ids, pixel_values=pixels).logits
        n_patches = logits.shape[1] - ids.shape[1]
        scored, target = logits[:, n_patches:-1].float(), labels[:, 1:]
        mask = target != IGNORE
        losses.append(float(nn.functional.cross_entropy(scored[mask], target[mask])))
        pred = scored.argmax(-1)
        accs.append(float((pred[mask] == target[mask]).float().mean()))
        # the first 3 action tokens of each row are dx, dy, dz
        first = mask.float().argmax(1)
        cols = first[:, None] + torch.arange(3)[None]
        bin_err.append(float((pred.gather(1, cols) - target.gather(1, cols)).abs().float().mean()))
    return {"loss": float(np.mean(losses)), "accuracy": float(np.mean(accs)), "xyz_bin_error": float(np.mean(bin_err))}


@torch.no_grad()
def direction_accuracy(model: nn.Module, data: ActionBatches, key: str, max_rows: int = 384,
                       batch_size: int = 64, min_action: float = 0.1) -> dict:
    """How often the greedy action moves the right way: sign agreement of the decoded dy and dz with the
    demonstration (rows where the demonstrated component exceeds ``min_action``). The quantity that shows
    whether the policy reads the target's position from the image (chance: 0.5)."""
    model.eval()
    bins = data.vla.bins
    rows = np.linspace(0, len(data) - 1, min(len(data), max_rows)).astype(int)
    agree = {1: [], 2: []}
    for start in range(0, len(rows), batch_size):
        ids, pixels, labels = data.batch(0, rows[start:start + batch_size])
        logits = model(input_ids=ids, pixel_values=pixels).logits
        n_patches = logits.shape[1] - ids.shape[1]
        scored, target = logits[:, n_patches:-1].float(), labels[:, 1:]
        # teacher-forced greedy tokens at the 7 action positions (restricted to action tokens)
        first = (target != IGNORE).float().argmax(1)
        cols = first[:, None] + torch.arange(N_ACTION)[None]
        action_ids = torch.as_tensor(bins.token_ids)
        sub = scored.gather(1, cols[..., None].expand(-1, -1, scored.shape[-1]))[..., action_ids]
        pred = action_ids[sub.argmax(-1)].numpy()
        true = target.gather(1, cols).numpy()
        for p, t in zip(pred, true):
            a, b = bins.decode(p, key), bins.decode(t, key)
            for dim in (1, 2):
                if abs(b[dim]) > min_action:
                    agree[dim].append(np.sign(a[dim]) == np.sign(b[dim]))
    return {"dy_sign_accuracy": float(np.mean(agree[1])) if agree[1] else float("nan"),
            "dz_sign_accuracy": float(np.mean(agree[2])) if agree[2] else float("nan")}


@torch.no_grad()
def free_running_accuracy(data: ActionBatches, key: str, max_rows: int = 96, min_action: float = 0.1) -> dict:
    """The policy as it acts: ``predict_action`` (each token decoded after the model's own previous ones) on
    (up to ``max_rows``) steps, against the demonstrated (binned) action: sign agreement of dy and dz where the
    demonstrated component exceeds ``min_action``, and the mean |error| of dx, dy, dz. Teacher-forced scores
    (:func:`evaluate_actions`, :func:`direction_accuracy`) feed the true earlier tokens and can hide a policy
    that reads its state from them."""
    vla = data.vla
    rows = np.linspace(0, len(data) - 1, min(len(data), max_rows)).astype(int)
    agree: dict[int, list] = {1: [], 2: []}
    errors = []
    for row in rows:
        step = data.index[row]
        acted = np.asarray(vla.predict_action(data.images[step], data.instruction_of_step[step],
                                              unnorm_key=key, restrict_to_action_tokens=True)).ravel()
        shown = vla.bins.decode(data.targets[step], key)
        errors.append(np.abs(acted[:3] - shown[:3]))
        for dim in (1, 2):
            if abs(shown[dim]) > min_action:
                agree[dim].append(np.sign(acted[dim]) == np.sign(shown[dim]))
    return {"free_dy_sign_accuracy": float(np.mean(agree[1])) if agree[1] else float("nan"),
            "free_dz_sign_accuracy": float(np.mean(agree[2])) if agree[2] else float("nan"),
            "free_xyz_abs_error": [float(x) for x in np.mean(errors, axis=0)]}


def train_actions(
    model: nn.Module,
    data: ActionBatches,
    steps: int,
    text: TextBatches | None = None,
    batch_size: int = 32,
    text_batch_size: int = 32,
    text_weight: float = 0.5,
    lr: float = 1e-3,
    warmup: int = 50,
    log: Callable[[dict], None] | None = None,
    log_every: int = 25,
    val: ActionBatches | None = None,
    eval_every: int = 200,
    text_eval: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
    phase: Any = 2,
    desc: str = "phase 2 (actions)",
    evaluate: Callable[[nn.Module], dict] | None = None,
    aux: Any = None,
    aux_weight: float = 0.5,
    aux_batch_size: int = 16,
    restrict_ids: torch.Tensor | None = None,
) -> list[dict]:
    """Fine-tune the whole ``model`` on ``data`` batches (+ ``text_weight`` x the language loss on ``text``).

    ``data`` is anything with ``batch(size) -> (input_ids, pixel_values, labels)`` (action steps, or grounding
    questions in phase 1b); ``aux`` another such source co-trained with ``aux_weight`` (the grounding questions
    during phase 2, as RT-2 co-fine-tunes on VQA); ``evaluate(model)`` adds a dict to the records at each
    evaluation. ``restrict_ids``: score ``data`` over these ids only (see :func:`action_loss`)."""
    from tqdm.auto import tqdm

    model.train()
    opt = make_optimizer(model.parameters(), lr)
    records, running = [], {"action_loss": [], "accuracy": [], "text_loss": [], "aux_loss": []}
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * cosine_schedule(step, steps, warmup)
        ids, pixels, labels = data.batch(batch_size)
        loss, acc = action_loss(model, ids, pixels, labels, restrict_ids)
        running["action_loss"].append(float(loss.detach()))
        running["accuracy"].append(acc)
        if text is not None and text_weight > 0:
            t_ids, t_labels = text.batch(text_batch_size)
            t_loss = lm_loss(model.language_model, t_ids, t_labels)
            running["text_loss"].append(float(t_loss.detach()))
            loss = loss + text_weight * t_loss
        if aux is not None and aux_weight > 0:
            a_loss, _ = action_loss(model, *aux.batch(aux_batch_size))
            running["aux_loss"].append(float(a_loss.detach()))
            loss = loss + aux_weight * a_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            record = {"phase": phase, "step": step + 1, "lr": opt.param_groups[0]["lr"],
                      "seconds": time.perf_counter() - t0,
                      **{k: float(np.mean(v)) for k, v in running.items() if v}}
            if (val is not None or evaluate is not None) and ((step + 1) % eval_every == 0 or step + 1 == steps):
                record["val"] = evaluate_actions(model, val) if val is not None else {}
                if evaluate is not None:
                    record["val"].update(evaluate(model))
                if text_eval is not None:
                    with torch.no_grad():
                        record["val"]["text_loss"] = float(lm_loss(model.language_model, *text_eval))
                model.train()
            running = {k: [] for k in running}
            records.append(record)
            bar.set_postfix(loss=f"{record['action_loss']:.3f}", acc=f"{record['accuracy']:.2f}")
            if log is not None:
                log(record)
    model.eval()
    return records
