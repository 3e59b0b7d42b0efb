"""The registered ``pi0-fast`` family: a PaliGemma (SigLIP + Gemma) that writes actions as FAST tokens.

Built on transformers' ``PaliGemmaForConditionalGeneration``; the prompt, decoding and fallback follow openpi's
``FASTTokenizer`` / ``Pi0FAST.sample_actions``, and the FAST ids decode through
:class:`~.fast_tokenizer.FastActionTokenizer`. Prompt, forwards, checkpoint folder and load options are
described on :class:`PI0Fast`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from ..errors import CheckpointError, InputError
from .base import VLA, check_camera_names, check_instruction, positive_int
from .batching import Observation, pad_rows, positions_from_mask
from .checkpoints import check_quantiles, load_tokenizer, read_config, read_json, resolve_folder, write_json_atomic
from .fast_tokenizer import FastActionTokenizer, FastDecodeError
from .paligemma import TINY_GEMMA, TINY_SIGLIP, build_paligemma_style_tokenizer
from .outputs import check_logits
from .paligemma_lens import paligemma_bridge
from .preprocessing import as_uint8_image, resize_with_pad
from .registry import register
from .tree import Stack

logger = logging.getLogger(__name__)

FAST_FOLDER = "fast_tokenizer"
NORM_STATS = "norm_stats.json"
ACTION_MARKER = "Action: "
END_MARKER = "|"
DEFAULT_MAX_NEW_TOKENS = 256  # openpi's max_decoding_steps

TINY_HORIZON, TINY_ACTION_DIM = 8, 7
TINY_NORM_STATS = {
    "state": {"q01": [-1.0 + 0.1 * i for i in range(7)], "q99": [1.0 + 0.2 * i for i in range(7)]},
    "actions": {"q01": [-0.05 * (i + 1) for i in range(7)], "q99": [0.05 * (i + 1) for i in range(7)]},
}


def tiny_fast_tokenizer(horizon: int = TINY_HORIZON, action_dim: int = TINY_ACTION_DIM, vocab_size: int = 256,
                        seed: int = 0) -> FastActionTokenizer:
    """A small FAST tokenizer trained (deterministically) on smooth synthetic chunks in [-1, 1]."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(0.0, 0.15, (300, horizon, action_dim)), axis=1)
    chunks = np.clip(walk + rng.uniform(-0.5, 0.5, (300, 1, action_dim)), -1.0, 1.0)
    return FastActionTokenizer.train(
        chunks, vocab_size=vocab_size, scale=10.0, time_horizon=horizon, action_dim=action_dim
    )


def tiny_config(overrides: dict | None = None) -> tuple[PaliGemmaConfig, dict]:
    """(PaliGemma config, extras) of a tiny pi0-FAST. ``overrides`` may set ``text`` (Gemma fields), ``vision``
    (SigLIP fields), ``image_size``, ``vocab`` (tokenizer size), ``n_loc``, ``horizon``, ``action_dim``,
    ``fast_vocab``, ``max_new_tokens`` and ``norm_stats`` (openpi layout, or None)."""
    overrides = dict(overrides or {})
    vocab = int(overrides.pop("vocab", 1024))
    image_size = int(overrides.pop("image_size", 32))
    text = {**TINY_GEMMA, **overrides.pop("text", {})}
    vision = {**TINY_SIGLIP, **overrides.pop("vision", {})}
    extras = {
        "n_loc": int(overrides.pop("n_loc", 256)),
        "horizon": int(overrides.pop("horizon", TINY_HORIZON)),
        "action_dim": int(overrides.pop("action_dim", TINY_ACTION_DIM)),
        "fast_vocab": int(overrides.pop("fast_vocab", 256)),
        "max_new_tokens": int(overrides.pop("max_new_tokens", 12)),
        "norm_stats": overrides.pop("norm_stats", TINY_NORM_STATS),
    }
    if overrides:
        raise InputError(f"unknown tiny pi0-fast overrides: {sorted(overrides)}")
    # as in PaliGemma: the embedding has 64 padding rows beyond the tokenizer and <image> is id V
    config = PaliGemmaConfig(
        text_config=dict(model_type="gemma", vocab_size=vocab + 64, **text),
        vision_config=dict(model_type="siglip_vision_model", image_size=image_size, **vision),
        projection_dim=text["hidden_size"], hidden_size=text["hidden_size"], image_token_index=vocab,
        vocab_size=vocab + 64, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    return config, extras


@dataclass(frozen=True)
class FastDecode:
    """What :meth:`PI0Fast.extract_actions` found in a generated sequence.

    ``actions``: normalised chunk (time_horizon, action_dim), zeros when ``valid`` is False. ``fast_ids``: the FAST
    ids between the markers (empty if none were found). ``error``: why the sequence was rejected.
    """

    token_ids: np.ndarray
    fast_ids: np.ndarray
    actions: np.ndarray
    valid: bool
    error: str | None = None


def discretize_state(state: np.ndarray) -> np.ndarray:
    """openpi's state tokens: 256 bins over [-1, 1] (``np.digitize`` on the left edges, minus 1)."""
    return np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


@register("pi0-fast")
class PI0Fast(VLA):
    """pi0-FAST as an nnsight model: ``vla.layers`` (PaliGemma's Gemma), ``vla.lm_head`` (tied unembedding).

    ``predict_action(images, instruction, state)`` returns the action chunk ``(horizon, action_dim)``.

    **Prompt and decoding.** The prefix is every camera's image tokens, then ``<bos>Task: {instruction, lower-cased,
    "_" -> " "}, State: {s_1 s_2 ...};\\n``, each normalised state value discretised into 256 bins over [-1, 1].
    The prefix attends bidirectionally (``token_type_ids = 0``); the model then greedily writes ``Action: `` +
    FAST tokens + ``|`` + ``<eos>``, causally. FAST token t is vocabulary id ``V - 1 - 128 - t`` (V: the PaliGemma
    vocabulary, the config's image token id). A sequence that does not decode gives openpi's fallback, a zero
    chunk in normalised space, with a logged warning; ``vla.last_decode`` says what happened (``strict=True``
    raises instead).

    **Forwards.** Forward 0 is the prefill (vision tower + backbone over the prefix), which yields the first
    token; each further token costs one cached forward. Decoding stops at ``<eos>`` or after ``max_new_tokens``,
    so ``vla.forward_count()`` is an upper bound (``stop_at_eos=False`` makes it exact). Every forward runs the
    whole backbone and ``lm_head``. Steer every forward with an open ``tracer.iter[:]`` or ``stop_at_eos=False``
    and ``tracer.iter[:vla.forward_count()]``; prefill only (what the authors did): edit without ``tracer.iter``.

    **Checkpoint folder**: PaliGemma's ``save_pretrained`` (config, safetensors, generation config), the PaliGemma
    tokenizer, ``preprocessor_config.json`` (optional), ``fast_tokenizer/`` (the physical-intelligence/fast
    layout, with time_horizon and action_dim set) and ``norm_stats.json`` (openpi's q01/q99 statistics; optional:
    without it states are taken as normalised and actions are returned normalised).

    **Load options**: ``fast_tokenizer`` (another FAST folder or hub id), ``action_horizon`` / ``action_dim``
    (supply what the FAST config leaves unset), ``camera_names`` (default ``("base", "wrist")``),
    ``max_new_tokens`` (default: ``generation_config.max_new_tokens``, else 256).

    **Batches** left-pad the prefixes with a mask, positions from the mask (openpi's ``left_to_right_align``);
    each row stops at its own ``<eos>``, and ``vla.last_decodes`` lists every row's :class:`FastDecode`.
    """

    stacks = (Stack("backbone", "layers", "model.language_model.layers"),)
    lm_head_path = "lm_head"
    camera_names = ("base", "wrist")
    model_class = PaliGemmaForConditionalGeneration
    attn_implementation = "sdpa"

    def __init__(
        self,
        source: Any = None,
        *,
        fast_tokenizer: Any = None,
        action_horizon: int | None = None,
        action_dim: int | None = None,
        camera_names: Any = None,
        max_new_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        if camera_names is not None:
            self.camera_names = check_camera_names(camera_names)
        positive = (("action_horizon", action_horizon), ("action_dim", action_dim), ("max_new_tokens", max_new_tokens))
        for name, value in positive:
            if value is not None:
                positive_int(value, name)
        self.family_options = {
            # a local folder travels in the model key as an absolute path (a server's working folder differs)
            "fast_tokenizer": None if fast_tokenizer is None else (
                str(Path(fast_tokenizer).resolve()) if Path(str(fast_tokenizer)).is_dir() else str(fast_tokenizer)),
            "action_horizon": action_horizon,
            "action_dim": action_dim,
            "camera_names": None if camera_names is None else list(self.camera_names),
            "max_new_tokens": max_new_tokens,
        }
        self.last_decode: FastDecode | list[FastDecode] | None = None
        self.last_decodes: list[FastDecode] = []
        super().__init__(source, **kwargs)

    # -- loading -------------------------------------------------------------------------------------------

    def _load_processors(self, source, *, revision, tiny) -> None:
        options = self.family_options
        if tiny is not None:
            self.config, extras = tiny_config(tiny.get("config"))
            vocab = self.config.image_token_id
            self.tokenizer = build_paligemma_style_tokenizer(vocab_size=vocab, n_loc=extras["n_loc"])
            size = self.config.vision_config.image_size
            self.image_processor = SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                                           image_std=[0.5] * 3)
            fast = tiny_fast_tokenizer(
                extras["horizon"], extras["action_dim"], extras["fast_vocab"], seed=int(tiny.get("seed", 0))
            )
            self.norm_stats = extras["norm_stats"]
            self.generation_config = GenerationConfig(
                max_new_tokens=extras["max_new_tokens"], eos_token_id=self.tokenizer.eos_token_id,
                bos_token_id=self.tokenizer.bos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            )
        else:
            self.folder = resolve_folder(source, revision, patterns=("*.json", "*.safetensors", "tokenizer*", "*.model",
                                                                    f"{FAST_FOLDER}/*"))
            self.config = read_config(
                self.folder, PaliGemmaConfig, "paligemma",
                "pi0-fast loads a PaliGemma checkpoint (model_type 'paligemma') plus its fast_tokenizer/ folder",
            )
            self.tokenizer = load_tokenizer(self.folder)
            if (self.folder / "preprocessor_config.json").is_file():
                image = read_json(self.folder, "preprocessor_config.json")
                drop = ("image_processor_type", "processor_class", "backend")
                keep = {k: v for k, v in image.items() if k not in drop}
                self.image_processor = SiglipImageProcessorPil(**keep)
            else:
                size = self.config.vision_config.image_size
                self.image_processor = SiglipImageProcessorPil(size={"height": size, "width": size},
                                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
            fast_source = options["fast_tokenizer"] or self.folder / FAST_FOLDER
            if options["fast_tokenizer"] is None and not Path(fast_source).is_dir():
                raise CheckpointError(
                    f"{self.folder} has no {FAST_FOLDER}/ folder; put the FAST tokenizer there or pass "
                    "fast_tokenizer=<folder or hub id, e.g. physical-intelligence/fast>"
                )
            fast = FastActionTokenizer.from_pretrained(fast_source)
            has_stats = (self.folder / NORM_STATS).is_file()
            self.norm_stats = read_json(self.folder, NORM_STATS).get("norm_stats") if has_stats else None
            self.generation_config = (
                GenerationConfig.from_pretrained(str(self.folder))
                if (self.folder / "generation_config.json").is_file()
                else GenerationConfig(eos_token_id=self.tokenizer.eos_token_id)
            )
        horizon = options["action_horizon"] or fast.time_horizon
        dim = options["action_dim"] or fast.action_dim
        if horizon is None or dim is None:
            raise CheckpointError(
                "the FAST tokenizer does not fix the chunk shape (time_horizon / action_dim unset, as in the universal "
                "physical-intelligence/fast tokenizer): pass action_horizon= and action_dim= to nnsight_vla.load"
            )
        self.action_tokenizer = FastActionTokenizer(
            fast.tokenizer, scale=fast.scale, vocab_size=fast.vocab_size, min_token=fast.min_token,
            action_dim=int(dim), time_horizon=int(horizon),
        )
        self._check_layout()

    def _check_layout(self) -> None:
        base = self.vlm_vocab_size
        embedding = self.config.text_config.vocab_size
        try:
            self.action_tokenizer.action_token_ids(base)
            fits = base <= embedding
        except ValueError:
            fits = False
        if not fits:
            raise CheckpointError(
                f"the FAST vocabulary ({self.action_tokenizer.fast_vocab_size} tokens) does not fit the PaliGemma "
                f"vocabulary of {base} ids (embedding {embedding})"
            )
        for key in ("state", "actions"):
            if self.norm_stats is not None:
                check_quantiles(self.norm_stats.get(key), f"{NORM_STATS} {key!r} (openpi's quantile normalisation)")
        if self.norm_stats and len(self.norm_stats["actions"]["q01"]) < self.action_dim:
            raise CheckpointError(
                f"{NORM_STATS} has action statistics for {len(self.norm_stats['actions']['q01'])} dimensions, "
                f"fewer than action_dim={self.action_dim}"
            )

    def _init_tiny(self, module: nn.Module) -> nn.Module:
        module.generation_config = self.generation_config
        return module

    def save_pretrained(self, folder) -> None:
        """Write the pi0-FAST folder: PaliGemma's ``save_pretrained`` (config, safetensors, generation config),
        the tokenizer, ``preprocessor_config.json``, ``fast_tokenizer/`` and ``norm_stats.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.dispatch()
        self._module.generation_config = self.generation_config
        self._module.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        self.image_processor.save_pretrained(str(folder))
        self.action_tokenizer.save_pretrained(folder / FAST_FOLDER)
        if self.norm_stats is not None:
            write_json_atomic(folder / NORM_STATS, {"norm_stats": self.norm_stats})

    # -- the uniform surface -------------------------------------------------------------------------------

    @property
    def vlm_vocab_size(self) -> int:
        """V of the FAST id formula: the PaliGemma vocabulary without ``<image>`` (= the image token id)."""
        return int(self.config.image_token_id)

    @property
    def action_token_ids(self) -> np.ndarray:
        """The vocabulary ids that carry FAST tokens: ``V - 1 - 128 - t`` for every FAST id t (sorted)."""
        ids = self.action_tokenizer.action_token_ids(self.vlm_vocab_size)
        return np.arange(ids.start, ids.stop)

    @property
    def action_dim(self) -> int:
        return int(self.action_tokenizer.action_dim)

    @property
    def action_horizon(self) -> int:
        return int(self.action_tokenizer.time_horizon)

    @property
    def state_dim(self) -> int | None:
        """State length the statistics fix; None without statistics (any length, taken as normalised)."""
        return len(self.norm_stats["state"]["q01"]) if self.norm_stats else None

    @property
    def max_new_tokens(self) -> int:
        """Default decoding budget (tokens = forwards per call)."""
        value = self.family_options["max_new_tokens"] or self.generation_config.max_new_tokens
        return int(value or DEFAULT_MAX_NEW_TOKENS)

    def input_embeddings(self) -> torch.Tensor:
        return self._module.model.language_model.embed_tokens.weight

    def forward_count(self, max_new_tokens: int | None = None, **_: Any) -> int:
        """Forwards one ``predict_action`` makes at most (exactly, with ``stop_at_eos=False``): one per generated
        token, the first being the prefill."""
        return self._budget(max_new_tokens)

    def stack_forwards(self, stack: str = "backbone", max_new_tokens: int | None = None, **_: Any) -> list[int]:
        """The forwards in which a stack runs: the backbone runs in every one."""
        self.stack(stack)
        return list(range(self._budget(max_new_tokens)))

    def to_transformer_lens(self, stack: str = "backbone"):
        """A TransformerLens bridge over a shared-weight clone of the PaliGemma model (out-of-tree adapter).

        TL runs causal attention unless told otherwise: ``bridge(ids)`` equals PaliGemma's forward with
        ``token_type_ids=1`` everywhere; pass ``token_type_ids=zeros`` for PaliGemma's bidirectional prompt prefix.
        """
        self.stack(stack)
        self.dispatch()
        return paligemma_bridge(self._module, self.tokenizer)

    # -- inference -----------------------------------------------------------------------------------------

    def _budget(self, max_new_tokens: int | None) -> int:
        return positive_int(self.max_new_tokens if max_new_tokens is None else max_new_tokens, "max_new_tokens")

    def normalize_state(self, state: Any) -> np.ndarray:
        """Validate the state and map it to [-1, 1] with openpi's quantile normalisation (if the checkpoint has
        statistics)."""
        if state is None:
            raise InputError("pi0-fast needs the robot state (it is written into the prompt)")
        try:
            array = np.asarray(state, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as error:
            raise InputError(f"state must be a vector of numbers: {error}") from error
        if self.state_dim is not None and array.shape[0] != self.state_dim:
            raise InputError(
                f"pi0-fast expects a state of dimension {self.state_dim} (the checkpoint's statistics), "
                f"got {array.shape[0]}"
            )
        if array.shape[0] == 0:
            raise InputError("state must not be empty")
        if not np.all(np.isfinite(array)):
            raise InputError(f"pi0-fast state contains NaN or infinite values: {array}")
        if not self.norm_stats:
            return array
        q01, q99 = (np.asarray(self.norm_stats["state"][k], dtype=np.float64) for k in ("q01", "q99"))
        return (array - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0

    def prompt(self, instruction: str, state: Any) -> str:
        """openpi's pi0-FAST prefix text (without ``<bos>`` and image tokens)."""
        text = check_instruction(instruction).lower().strip().replace("_", " ")
        tokens = " ".join(map(str, discretize_state(self.normalize_state(state))))
        return f"Task: {text}, State: {tokens};\n"

    def prepare(self, images: Any, instruction: str, state: Any) -> dict[str, torch.Tensor]:
        """Prefill inputs: ``input_ids`` (image tokens, ``<bos>``, prompt), ``token_type_ids`` (zeros: the whole
        prefix attends bidirectionally) and ``pixel_values`` (cameras, 3, H, W), letterboxed like openpi."""
        size = self.config.vision_config.image_size
        cams = [
            resize_with_pad(as_uint8_image(img, f"camera {name!r}"), size, size)
            for name, img in zip(self.camera_names, self.images_by_camera(images))
        ]
        prompt = self.prompt(instruction, state)
        pixel_values = self.image_processor(cams, return_tensors="pt")["pixel_values"]
        n_image = self.config.text_config.num_image_tokens * len(cams)
        text = self.tokenizer(prompt, add_special_tokens=False).input_ids
        ids = [self.config.image_token_id] * n_image + [self.tokenizer.bos_token_id] + list(text)
        input_ids = torch.tensor([ids])
        return {"input_ids": input_ids, "pixel_values": pixel_values, "token_type_ids": torch.zeros_like(input_ids)}

    def _prefill(self, observations: list[Observation], budget: int) -> dict[str, torch.Tensor]:
        """The batch's prefill inputs: each element through ``prepare``, prefixes left-padded with a mask."""
        rows, pixels = [], []
        limit = self.config.text_config.max_position_embeddings
        for obs in observations:
            inputs = self.prepare(obs.images, obs.instruction, obs.state)
            if inputs["input_ids"].shape[1] + budget - 1 > limit:
                raise InputError(
                    f"the prefix ({inputs['input_ids'].shape[1]} image and prompt tokens) and up to {budget} generated "
                    f"tokens exceed pi0-fast's max_position_embeddings ({limit}); shorten the instruction or pass a "
                    "smaller max_new_tokens"
                )
            rows.append(inputs["input_ids"][0].tolist())
            pixels.append(inputs["pixel_values"])
        input_ids, mask = pad_rows(rows, int(self.tokenizer.pad_token_id or 0), "left")
        out = {"input_ids": input_ids, "pixel_values": torch.cat(pixels), "token_type_ids": torch.zeros_like(input_ids)}
        if mask is not None:  # PaliGemma counts positions from 1
            out.update(attention_mask=mask, position_ids=positions_from_mask(mask, start=1))
        return out

    def _forward_batch(self, observations: list[Observation], **options: Any) -> dict[str, torch.Tensor]:
        if options:
            raise InputError(f"vla.trace(observation) takes no options for pi0-fast, got {sorted(options)}")
        inputs = self._prefill(observations, 1)
        inputs["pixel_values"] = inputs["pixel_values"].to(next(self._module.parameters()).dtype)
        return inputs

    def generate_tokens(
        self, images: Any, instruction: str, state: Any, max_new_tokens: int | None = None, stop_at_eos: bool = True
    ) -> np.ndarray:
        """Greedily generated vocabulary ids, one forward each (the prefill gives the first)."""
        budget = self._budget(max_new_tokens)
        return self._generate(self._prefill([Observation(images, instruction, state)], budget), budget, stop_at_eos)[0]

    def _generate(self, inputs: dict[str, torch.Tensor], budget: int, stop_at_eos: bool) -> list[np.ndarray]:
        """Each row's greedy ids (through its first ``<eos>`` when ``stop_at_eos``); one forward per step."""
        self.dispatch()  # called directly (not through a trace) on a meta-built model: load the weights now
        model = self._module
        param = next(model.parameters())
        eos = self.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos if eos is not None else self.tokenizer.eos_token_id])
        inputs = {k: v.to(param.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
        mask = inputs.get("attention_mask")
        rows: list[list[int]] = [[] for _ in range(inputs["input_ids"].shape[0])]
        done = [False] * len(rows)
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            for step in range(budget):
                active = [i for i, finished in enumerate(done) if not finished]
                logits = out.logits[:, -1].float()
                check_logits(logits, self.family, step, rows=active)
                next_id = logits.argmax(dim=-1)
                for i in active:
                    rows[i].append(int(next_id[i]))
                    done[i] = stop_at_eos and rows[i][-1] in eos
                if step + 1 == budget or all(done):
                    break
                step_inputs = {}
                if mask is not None:  # a finished row's further tokens are computed but dropped
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                    step_inputs = {"attention_mask": mask, "position_ids": mask.sum(dim=1, keepdim=True)}
                out = model(input_ids=next_id[:, None], cache=out.cache, use_cache=True, **step_inputs)
        return [np.asarray(row, dtype=np.int64) for row in rows]

    def extract_actions(self, token_ids: Any, strict: bool = False) -> FastDecode:
        """Find ``Action: `` ... ``|`` in generated ids and FAST-decode the ids between them (normalised actions).

        Invalid sequences give a zero chunk, ``valid=False`` and a logged warning (``strict=True``: FastDecodeError).
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        shape = (self.action_horizon, self.action_dim)
        eos = self.tokenizer.eos_token_id
        if eos is not None and (ids == eos).any():
            ids = ids[: int(np.argmax(ids == eos))]
        action_ids = self.action_token_ids
        is_action = (ids >= action_ids[0]) & (ids <= action_ids[-1])

        def fail(reason: str, fast_ids=np.zeros(0, np.int64)) -> FastDecode:
            if strict:
                raise FastDecodeError(reason)
            logger.warning("pi0-fast: the generated tokens do not decode to actions (%s); returning openpi's "
                           "fallback, a zero chunk in normalised action space", reason)
            return FastDecode(np.asarray(token_ids), fast_ids, np.zeros(shape), False, reason)

        start = self._after_marker(ids, is_action)
        if start is None:
            return fail(f"no {ACTION_MARKER!r} in the {len(ids)} generated tokens")
        stop = start
        while stop < len(ids) and not (not is_action[stop] and END_MARKER in self._piece(ids[stop])):
            stop += 1
        segment = ids[start:stop]
        if segment.size == 0:
            return fail(f"no action tokens between {ACTION_MARKER!r} and {END_MARKER!r}")
        if not is_action[start:stop].all():
            bad = segment[~is_action[start:stop]]
            return fail(f"{bad.size} non-action token(s) among the action tokens, e.g. id {int(bad[0])}")
        fast_ids = np.asarray(self.action_tokenizer.vlm_to_fast_ids(segment, self.vlm_vocab_size))
        result = self.action_tokenizer.decode_with_info(fast_ids, strict=strict)
        if not result.valid:
            return FastDecode(np.asarray(token_ids), fast_ids, result.actions, False, result.error)
        return FastDecode(np.asarray(token_ids), fast_ids, result.actions, True, None)

    def _piece(self, token_id: int) -> str:
        if not 0 <= token_id < len(self.tokenizer):
            return ""  # an embedding padding row: no text
        return self.tokenizer.decode([int(token_id)], skip_special_tokens=False)

    def _after_marker(self, ids: np.ndarray, is_action: np.ndarray) -> int | None:
        """Index of the first token after the text ``Action: `` (decoding prefixes, as openpi splits the text)."""
        for k in range(1, len(ids) + 1):
            if is_action[k - 1]:
                continue  # action tokens carry no marker text
            valid = [int(i) for i in ids[:k] if 0 <= i < len(self.tokenizer)]
            if ACTION_MARKER in self.tokenizer.decode(valid, skip_special_tokens=False):
                return k
        return None

    def unnormalize(self, actions: np.ndarray) -> np.ndarray:
        """openpi's quantile un-normalisation: ``(x + 1) / 2 * (q99 - q01 + 1e-6) + q01`` per dimension."""
        if not self.norm_stats:
            return actions
        stats = self.norm_stats["actions"]
        q01, q99 = (np.asarray(stats[k], dtype=np.float64)[: self.action_dim] for k in ("q01", "q99"))
        return (actions + 1.0) / 2.0 * (q99 - q01 + 1e-6) + q01

    def _predict_batch(
        self,
        observations: list[Observation],
        horizon: int | None = None,
        max_new_tokens: int | None = None,
        stop_at_eos: bool = True,
        unnormalize: bool = True,
        strict: bool = False,
    ) -> np.ndarray:
        """Generate FAST tokens greedily for each observation and decode them to action chunks.

        Per observation: ``images`` (``{"base": img, "wrist": img}`` or a list in ``camera_names`` order) and
        ``state``. ``horizon``: the first actions of each chunk; ``max_new_tokens``: the decoding budget (one
        forward per token); ``stop_at_eos=False`` always runs the whole budget; ``unnormalize``: the checkpoint's
        quantile statistics; ``strict``: FastDecodeError instead of the zero fallback. Returns (B, horizon, dim).
        """
        horizon = self._horizon(horizon)
        budget = self._budget(max_new_tokens)
        tokens = self._generate(self._prefill(observations, budget), budget, stop_at_eos)
        decodes = [self.extract_actions(row, strict=strict) for row in tokens]
        self.last_decodes = decodes
        self.last_decode = decodes[0] if len(decodes) == 1 else decodes
        actions = np.stack([decoded.actions[:horizon] for decoded in decodes])
        return self.unnormalize(actions) if unnormalize else actions

    def _scan_call(self):
        size = self.config.vision_config.image_size
        cams = len(self.camera_names)
        n_image = self.config.text_config.num_image_tokens * cams
        ids = torch.tensor([[self.config.image_token_id] * n_image + [2, 5, 6]])
        pixels = torch.zeros(cams, 3, size, size)
        kwargs = dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), pixel_values=pixels)
        return self._module.forward, (), kwargs
