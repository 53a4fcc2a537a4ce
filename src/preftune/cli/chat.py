"""`preftune chat --model DIR`: a streaming multi-turn chat in the terminal.

DIR may be a full model (Hub name or folder), a PEFT adapter folder (its base is loaded and the
adapter put on top), or nothing (the embedded model). Commands at the prompt: /reset clears the
history, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import threading

import torch
from rich.console import Console

from preftune.config import ModelArguments
from preftune.models.prepare import adapter_base, load_base_model, load_tokenizer, resolve_model_path


def load_chat_model(model: str | None, load_in_4bit: bool = False, trust_remote_code: bool = False):
    """(model, tokenizer) for inference: a full model, or base + adapter."""
    from peft import PeftModel

    path = resolve_model_path(model)
    base_path = adapter_base(path)
    args = ModelArguments(
        model_name_or_path=path, use_4bit_quantization=load_in_4bit, trust_remote_code=trust_remote_code
    )
    if base_path is None:
        return load_base_model(path, args).eval(), load_tokenizer(path, trust_remote_code=trust_remote_code)
    base_path = resolve_model_path(base_path)
    base = load_base_model(base_path, args)
    tokenizer = load_tokenizer(path, fallback=base_path, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, path).eval(), tokenizer


def stream_reply(
    model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float, top_p: float
):
    """Yield the reply's text piece by piece as the model generates it."""
    from transformers import TextIteratorStreamer

    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    kwargs = dict(
        **inputs,
        streamer=streamer,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )

    def generate() -> None:
        with torch.no_grad():
            model.generate(**kwargs)

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    yield from streamer
    thread.join()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="run folder, adapter, model folder or Hub name (default: embedded)"
    )
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--load_in_4bit", action="store_true", help="load the base model in 4 bits")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    torch.manual_seed(args.seed)
    with console.status("loading model"):
        model, tokenizer = load_chat_model(args.model, args.load_in_4bit, args.trust_remote_code)
    console.print("[dim]/reset clears the history, /exit quits[/dim]")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            user = console.input("[bold green]you> [/bold green]").strip()
        except EOFError:
            console.print()
            return 0
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            history = history[:1] if args.system else []
            continue
        if not user:
            continue
        history.append({"role": "user", "content": user})
        console.print("[bold blue]bot> [/bold blue]", end="")
        reply = ""
        for piece in stream_reply(
            model, tokenizer, history, args.max_new_tokens, args.temperature, args.top_p
        ):
            reply += piece
            console.print(piece, end="", highlight=False, markup=False)
        console.print()
        history.append({"role": "assistant", "content": reply.strip()})
