"""`preftune chat --model DIR`: a streaming multi-turn chat in the terminal, or in a web page (--ui).

DIR may be a run folder or a PEFT adapter (its base is loaded and the adapter put on top; the
reference is the base with the adapter disabled, or the SFT adapter the run started from), a full
model (Hub name or folder, e.g. a merged model), or nothing (the embedded model). One model is in
memory either way.

Terminal: /reset clears the history, /exit (or Ctrl-D) quits; --compare prints the reference's
answer and the tuned model's, each with its own history.

--ui: a web page with the reference and the tuned model side by side, streamed, and a "which is
better" vote per turn saved as a preference pair to --votes_file (default RUN_DIR/votes.jsonl),
which `preftune dpo --dataset_name RUN_DIR/votes.jsonl` reads. Binds 127.0.0.1:7860 unless --host /
--port say otherwise; a public share link only with --share.
"""

from __future__ import annotations

import argparse
import logging

import torch
from rich.console import Console

from preftune.chat.engine import REFERENCE, TUNED, ChatEngine, Conversation, GenerationSettings, load_chat


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
    parser.add_argument(
        "--compare", action="store_true", help="terminal: print the reference's answer, then the tuned one"
    )
    web = parser.add_argument_group("web chat (--ui)")
    web.add_argument("--ui", action="store_true", help="serve the web chat instead of the terminal chat")
    web.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--share", action="store_true", help="also make a public Gradio share link")
    web.add_argument(
        "--votes_file", default=None, help="where votes go (default: MODEL_DIR/votes.jsonl, else runs/chat/)"
    )
    return parser


def settings_from(args: argparse.Namespace) -> GenerationSettings:
    """The generation settings the flags ask for."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError(
            f"--temperature must be >= 0 and --top_p in (0, 1]; got {args.temperature}, {args.top_p}"
        )
    return GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    console = Console()
    torch.manual_seed(args.seed)
    if args.ui:
        from preftune.chat.ui import require_gradio

        require_gradio()  # before the model loads: a missing package fails at once
    with console.status("loading model"):
        engine = load_chat(args.model, args.load_in_4bit, args.trust_remote_code)
    if args.ui:
        return serve(engine, args, settings, console)
    if args.compare and not engine.has_reference:
        raise ValueError(f"--compare: {engine.source} is a full model with no reference in memory")
    return terminal_chat(engine, settings, console, args.system, compare=args.compare)


def serve(
    engine: ChatEngine, args: argparse.Namespace, settings: GenerationSettings, console: Console
) -> int:
    """Serve the web chat until Ctrl-C."""
    from preftune.chat.ui import build_app, launch
    from preftune.chat.votes import default_votes_file

    votes_file = args.votes_file or default_votes_file(engine.source)
    app = build_app(engine, votes_file, settings, args.system)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request Gradio makes
    console.print(
        f"web chat on http://{args.host}:{args.port} (Ctrl-C stops it); votes go to {votes_file}",
        soft_wrap=True,
        highlight=False,
    )
    launch(app, host=args.host, port=args.port, share=args.share)
    return 0


def terminal_chat(
    engine: ChatEngine,
    settings: GenerationSettings,
    console: Console,
    system: str | None = None,
    compare: bool = False,
) -> int:
    """Chat in the terminal until /exit or end of input; with `compare`, both sides answer."""
    sides = [REFERENCE, TUNED] if compare else [TUNED]
    names = {REFERENCE: "reference", TUNED: "tuned" if compare else "bot"}
    console.print("[dim]/reset clears the history, /exit quits[/dim]")
    conversation = Conversation(sides)
    while True:
        try:
            user = console.input("[bold green]you> [/bold green]").strip()
        except EOFError:
            console.print()
            return 0
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            conversation = Conversation(sides)
            continue
        if not user:
            continue
        current = None
        for side, piece in conversation.answer(engine, user, settings, system):
            if side != current:
                if current is not None:
                    console.print()
                console.print(f"[bold blue]{names[side]}> [/bold blue]", end="")
                current = side
            console.print(piece, end="", highlight=False, markup=False)
        console.print()
