"""Batched chat generation for evaluation.

`generate_replies` renders prompts with the tokenizer's chat template, left-pads them into batches,
generates, and returns only the new text of each reply. It works on plain transformers models and on
PEFT models alike. To get the reference (pre-tuning) model's replies from a LoRA model, turn the
adapter off around the call:

    with peft_model.disable_adapter():
        reference_replies = generate_replies(peft_model, tokenizer, prompts)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

# end-of-turn markers of common chat templates; generation stops at any of them that the vocab has
END_OF_TURN_TOKENS = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"]


def render_prompt(tokenizer, prompt: Sequence[dict] | str) -> str:
    """Chat-template text of one prompt (a message list, or a string = one user message), ready to generate."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end a reply: the tokenizer's eos, the model's eos, and known end-of-turn tokens."""
    ids: list[int] = []
    candidates = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    if config is not None and config.eos_token_id is not None:
        eos = config.eos_token_id
        candidates += eos if isinstance(eos, list) else [eos]
    vocab = tokenizer.get_vocab()
    candidates += [vocab.get(t) for t in END_OF_TURN_TOKENS]
    for i in candidates:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


def _device(model) -> torch.device:
    return next(model.parameters()).device


def generate_replies(
    model,
    tokenizer,
    prompts: list[list[dict]] | list[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    show_progress: bool = True,
) -> list[str]:
    """Generate one reply per prompt; returns the decoded new text (special tokens dropped, stripped).

    Prompts are sorted by length and batched with left padding (the tokenizer's padding side and pad
    token are restored afterwards), generation stops at eos / end-of-turn, and the model's train/eval
    mode is restored on exit. Greedy by default; with `do_sample=True` the sampling is seeded with
    `seed` without disturbing the caller's torch RNG state.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = [render_prompt(tokenizer, p) for p in prompts]
    if not texts:
        return []

    # longest first: similar lengths share a batch (less padding), and an out-of-memory shows up early
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    replies: list[str] = [""] * len(texts)

    old_padding_side, old_pad_token = tokenizer.padding_side, tokenizer.pad_token
    was_training = model.training
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=stop_token_ids(tokenizer, model),
        pad_token_id=tokenizer.pad_token_id,
    )
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    else:  # neutralize sampling defaults a model's generation_config may carry (avoids warnings)
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    device = _device(model)
    fork_devices = [device.index or 0] if device.type == "cuda" else []

    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=fork_devices, enabled=do_sample):
            if do_sample:
                torch.manual_seed(seed)
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            for idx in tqdm(batches, desc="generating", disable=not show_progress):
                enc = tokenizer(
                    [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                out = model.generate(**enc, **gen_kwargs)
                new_tokens = out[:, enc["input_ids"].shape[1] :]  # left padding: all prompts end together
                for i, text in zip(
                    idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True
                ):
                    replies[i] = text.strip()
    finally:
        model.train(was_training)
        tokenizer.padding_side = old_padding_side
        if old_pad_token is None:
            tokenizer.pad_token = None
    return replies
