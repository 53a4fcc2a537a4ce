"""`preftune chat --ui`: a web chat showing the tuned model beside its reference.

One Gradio page: two chat panes, reference | tuned, each with its own multi-turn history, answering
the same message one after the other (both streamed, from ONE model in memory whose adapter is
switched per request); a system prompt, temperature, top_p and max new tokens; and after each turn a
"which is better" vote saved to the votes file as a preference pair (`preftune.chat.votes`). A model
without a reference in memory (a merged or full model) gets one pane and no votes.

The page binds 127.0.0.1 unless `--host` says otherwise, and makes no public share link unless
`--share`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.chat.engine import REFERENCE, TUNED, ChatEngine, Conversation, GenerationSettings, Messages
from preftune.chat.votes import BOTH_BAD, TIE, record_vote

if TYPE_CHECKING:
    import gradio

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
VOTE_BUTTONS = {  # vote -> button text, in page order
    REFERENCE: "⬅ Reference is better",
    TUNED: "Tuned is better ➡",
    TIE: "Tie",
    BOTH_BAD: "Both bad",
}


class MissingExtraError(ValueError):
    """An optional package the command needs is not installed (a usage error: one line)."""


def require_gradio():
    """The gradio module, or an error saying how to install it."""
    try:
        import gradio
    except ImportError as err:
        raise MissingExtraError(
            "preftune chat --ui needs gradio: pip install 'preftune[ui]' (or pip install gradio)"
        ) from err
    return gradio


def build_app(
    engine: ChatEngine,
    votes_file: str | Path,
    settings: GenerationSettings | None = None,
    system: str | None = None,
) -> gradio.Blocks:
    """The Gradio Blocks app for `engine`; votes are appended to `votes_file`."""
    gr = require_gradio()
    settings = settings or GenerationSettings()
    votes_file = Path(votes_file)
    sides = engine.sides
    voting = engine.has_reference

    def vote_buttons(enabled: bool) -> list[Any]:
        return [gr.update(interactive=enabled) for _ in VOTE_BUTTONS] if voting else []

    def panes(conversation: Conversation) -> list[Messages]:
        return [copy.deepcopy(conversation.histories[side]) for side in sides]

    def respond(
        message: str,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        conversation,
    ) -> Iterator[list[Any]]:
        message = (message or "").strip()
        if not message:
            yield [*panes(conversation), conversation, "", "Type a message first.", *vote_buttons(False)]
            return
        turn_settings = GenerationSettings(int(max_new_tokens), float(temperature), float(top_p))
        status = "Generating: the reference first, then the tuned model." if voting else "Generating."
        yield [*panes(conversation), conversation, "", status, *vote_buttons(False)]
        for _side, _piece in conversation.answer(engine, message, turn_settings, system_prompt):
            yield [*panes(conversation), conversation, "", status, *vote_buttons(False)]
        done = "Which reply is better? Vote below." if voting else ""
        yield [*panes(conversation), conversation, "", done, *vote_buttons(voting)]

    def make_vote(choice: str):
        def vote(conversation) -> list[Any]:
            if not conversation.turns:
                return [conversation, "Send a message first.", *vote_buttons(False)]
            turn = conversation.turns[-1]
            if turn.vote is not None:
                return [conversation, f"This turn already has a vote ({turn.vote}).", *vote_buttons(False)]
            path, reason = record_vote(turn, choice, votes_file, model=engine.source)
            if reason is None:
                text = f"Saved: {choice} is better; a new preference pair in `{path}`."
            else:
                text = f"Saved ({reason}, not a preference pair) in `{path}`."
            return [conversation, text, *vote_buttons(False)]

        return vote

    def clear() -> list[Any]:
        conversation = Conversation(sides)
        return [*panes(conversation), conversation, "", *vote_buttons(False)]

    with gr.Blocks(title="preftune chat", analytics_enabled=False) as app:
        gr.Markdown(
            f"## preftune chat\n`{engine.source}`"
            + (
                f"  \nBoth panes answer every message; votes become preference pairs in `{votes_file}`."
                if voting
                else "  \nThis model has no reference in memory (a merged or full model): one pane."
            )
        )
        conversation = gr.State(Conversation(sides))
        with gr.Row(equal_height=True):
            chatbots = [
                gr.Chatbot(
                    label=engine.label(side), elem_id=f"pane-{side}", height=440, buttons=["copy", "copy_all"]
                )
                for side in sides
            ]
        with gr.Row():
            message = gr.Textbox(
                placeholder="Type a message and press Enter",
                show_label=False,
                elem_id="message",
                scale=8,
                autofocus=True,
            )
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
        buttons = []  # the vote buttons; none without a reference
        if voting:
            with gr.Row():
                for choice, text in VOTE_BUTTONS.items():
                    buttons.append(gr.Button(text, elem_id=f"vote-{choice}", interactive=False, size="sm"))
        status = gr.Markdown(elem_id="status")
        new_chat = gr.Button("New conversation", elem_id="clear", size="sm")
        with gr.Accordion("Settings", open=False):
            system_box = gr.Textbox(value=system or "", label="System prompt", lines=2, elem_id="system")
            temperature = gr.Slider(
                0.0, 2.0, value=settings.temperature, step=0.05, label="Temperature (0: greedy)"
            )
            top_p = gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="top_p")
            max_new_tokens = gr.Slider(1, 2048, value=settings.max_new_tokens, step=1, label="Max new tokens")

        inputs = [message, system_box, temperature, top_p, max_new_tokens, conversation]
        outputs = [*chatbots, conversation, message, status, *buttons]
        for trigger in (send.click, message.submit):
            trigger(respond, inputs, outputs)
        for choice, button in zip(VOTE_BUTTONS, buttons):
            button.click(make_vote(choice), [conversation], [conversation, status, *buttons])
        # "New conversation" and each pane's own clear button start over in every pane
        for trigger in (new_chat.click, *(chatbot.clear for chatbot in chatbots)):
            trigger(clear, None, [*chatbots, conversation, status, *buttons])
    return app


def launch(
    app: gradio.Blocks,
    host: str = DEFAULT_HOST,
    port: int | None = DEFAULT_PORT,
    share: bool = False,
    block: bool = True,
):
    """Serve `app` on host:port (127.0.0.1 by default); a public share link only with `share`."""
    app.queue(default_concurrency_limit=1)
    return app.launch(
        server_name=host,
        server_port=port,
        share=bool(share),
        inbrowser=False,
        prevent_thread_lock=not block,
        ssr_mode=False,
        show_error=True,
        quiet=not share,  # the caller says where the page is; Gradio prints the public link
    )
