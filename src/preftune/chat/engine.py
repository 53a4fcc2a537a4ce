"""One model in memory answering as the tuned model or as its reference, streamed.

Shared by the terminal chat (`preftune chat`, `--compare`) and the web chat (`preftune chat --ui`):

- `load_chat` loads `--model`: a run folder or any PEFT adapter becomes base + adapter, whose
  reference is the base with the adapter disabled, or the SFT adapter the run started from (loaded as
  a second adapter `reference` on the same base; see `preftune.evaluation.evaluate.load_run`). A full
  model (a merged one, a full fine-tune, a Hub model) is loaded alone: it has no reference in memory,
  so the chats show one answer.
- `ChatEngine.stream` streams one reply as "tuned" or "reference", switching the adapter per request
  under a lock, so two requests never switch adapters under each other.
- `Conversation` keeps each side's own multi-turn history and the turns to vote on, and
  `Conversation.answer` generates one turn: the reference, then the tuned model, each streamed.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from preftune.evaluation.evaluate import RunModels
from preftune.evaluation.generation import stop_token_ids

TUNED, REFERENCE = "tuned", "reference"
Messages = list[dict[str, str]]


@dataclass
class GenerationSettings:
    """How a reply is generated; temperature 0 means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9


class _StopOnEvent:
    """A stopping criterion that ends generation once `event` is set (the reader went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def stream_reply(
    model,
    tokenizer,
    messages: Messages,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
) -> Iterator[str]:
    """Yield the reply to `messages` piece by piece as `model` generates it.

    Generation runs in a thread; it stops at eos or an end-of-turn token, and also when the caller
    stops reading (closing this generator stops and joins the thread, so the model is free again when
    it returns). An error in generation is raised here.
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    else:  # greedy; neutralize sampling defaults a model's generation_config may carry
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    stop = threading.Event()
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            with torch.no_grad():
                model.generate(
                    **inputs,
                    streamer=streamer,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop_token_ids(tokenizer, model),
                    pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
                    **sampling,
                )
        except BaseException as err:  # noqa: BLE001 - handed to the reader, which raises it
            failure.append(err)
            streamer.end()

    thread = threading.Thread(target=generate, name="preftune-generate", daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]


def load_chat(model: str | None, load_in_4bit: bool = False, trust_remote_code: bool = False) -> ChatEngine:
    """The chat engine for `--model`: a run folder, a PEFT adapter, a model folder or Hub name, or
    None (the embedded model). Only ONE model is ever loaded."""
    from preftune.config import ModelArguments
    from preftune.evaluation.evaluate import load_run
    from preftune.models.prepare import adapter_base, load_base_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(model)
    if adapter_base(path) is not None:
        run = load_run(path, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
        return ChatEngine(run, path)
    args = ModelArguments(
        model_name_or_path=path, use_4bit_quantization=load_in_4bit, trust_remote_code=trust_remote_code
    )
    loaded = load_base_model(path, args)
    if not load_in_4bit:  # a quantized model is already placed by its loader
        loaded = loaded.to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    return ChatEngine(RunModels(loaded.eval(), tokenizer, "none"), path)


class ChatEngine:
    """The tuned model and its reference, on one model in memory.

    `sides` lists what can answer: ["reference", "tuned"], or ["tuned"] for a model without a
    reference in memory (a merged or full model).
    """

    def __init__(self, run: RunModels, source: str):
        if run.reference_mode == "model_copy":
            raise ValueError("the chat keeps one model in memory: a reference copy is not supported")
        self.run = run
        self.source = source
        self.lock = threading.Lock()  # held while a reply streams: adapters switch under it only

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def has_reference(self) -> bool:
        return self.run.has_reference

    @property
    def sides(self) -> list[str]:
        return [REFERENCE, TUNED] if self.has_reference else [TUNED]

    def label(self, side: str) -> str:
        """A human-readable name of a side, e.g. "reference (the base, adapter off)"."""
        if side == TUNED:
            return "tuned" if self.has_reference else "model"
        if self.run.reference_mode == "reference_adapter":
            return "reference (the SFT adapter the run started from)"
        return "reference (the base model, adapter off)"

    @contextlib.contextmanager
    def _side(self, side: str) -> Iterator[torch.nn.Module]:
        if side == TUNED:
            yield self.run.model
        elif side == REFERENCE:
            with self.run.reference() as model:
                yield model
        else:
            raise ValueError(f"unknown side {side!r}; expected {TUNED!r} or {REFERENCE!r}")

    def stream(self, messages: Messages, settings: GenerationSettings, side: str = TUNED) -> Iterator[str]:
        """Stream the reply of `side` ("tuned" or "reference") to `messages`.

        The model is locked from the first piece to the last (or until the reader closes this
        generator), with the reference's adapter setting in force only inside.
        """
        if side not in self.sides:
            raise ValueError(f"{self.source} has no {side} model in memory (a merged or full model)")
        with self.lock, self._side(side) as model:
            yield from stream_reply(
                model,
                self.tokenizer,
                messages,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
            )


@dataclass
class Turn:
    """One user message and each side's reply to it, with what each side was prompted with."""

    user: str
    prompts: dict[str, Messages]  # per side: system prompt + its own history + the user message
    replies: dict[str, str]
    settings: GenerationSettings
    vote: str | None = None


@dataclass
class Conversation:
    """Each side's own multi-turn history (what its chat pane shows) and the turns so far."""

    sides: list[str]
    histories: dict[str, Messages] = field(default_factory=dict)
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        for side in self.sides:
            self.histories.setdefault(side, [])

    def answer(
        self, engine: ChatEngine, user: str, settings: GenerationSettings, system: str | None = None
    ) -> Iterator[tuple[str, str]]:
        """Generate one turn: each side in turn (reference first) streams its reply to `user`,
        prompted with `system` and its own history. Yields (side, "") as a side starts, then (side,
        piece) per piece; the histories and `turns[-1]` hold the text so far while it streams."""
        head = [{"role": "system", "content": system}] if system and system.strip() else []
        message = {"role": "user", "content": user}
        prompts = {side: [*head, *copy.deepcopy(self.histories[side]), message] for side in self.sides}
        turn = Turn(user, prompts, {side: "" for side in self.sides}, copy.copy(settings))
        self.turns.append(turn)
        for side in self.sides:
            self.histories[side].append(dict(message))
        for side in self.sides:
            reply = {"role": "assistant", "content": ""}
            self.histories[side].append(reply)
            yield side, ""  # this side starts
            for piece in engine.stream(prompts[side], settings, side):
                turn.replies[side] += piece
                reply["content"] = turn.replies[side]
                yield side, piece
            turn.replies[side] = reply["content"] = turn.replies[side].strip()
