"""The chat engine (tuned model and reference on one model), votes as preference pairs, and the chat
command's terminal --compare and --ui flags. The web page itself is tested in test_chat_ui.py."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import threading

import pytest
import torch
import yaml
from conftest import quiet_argv
from rich.console import Console

from preftune.chat.engine import (
    REFERENCE,
    TUNED,
    Conversation,
    GenerationSettings,
    Turn,
    load_chat,
    stream_reply,
)
from preftune.chat.votes import (
    UNPAIRED_FILE,
    VOTES_FILE,
    append_jsonl,
    default_votes_file,
    record_vote,
)

GREEDY = GenerationSettings(max_new_tokens=12, temperature=0.0, top_p=1.0)
SAMPLED = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=1.0)
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def engine(chat_adapter_dir):
    return load_chat(str(chat_adapter_dir))


def sampled(stream_fn, seed: int = 0) -> str:
    """The text a seeded sampling stream gives: equal texts mean equal next-token distributions."""
    torch.manual_seed(seed)
    return "".join(stream_fn())


def run_main(argv: list[str]) -> int:
    from preftune.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


# --------------------------------------------------------------------------- one model, two sides


def test_reference_is_the_base_with_the_adapter_disabled(engine, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert engine.sides == [REFERENCE, TUNED] and engine.run.reference_mode == "adapter_disabled"
    assert isinstance(engine.run.model, PeftModel)  # one model: the base with the adapter on it
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    from_base = sampled(lambda: stream_reply(base, engine.tokenizer, HELLO, 12, 1.0, 1.0))
    reference = sampled(lambda: engine.stream(HELLO, SAMPLED, REFERENCE))
    tuned = sampled(lambda: engine.stream(HELLO, SAMPLED, TUNED))
    assert reference == from_base and tuned != reference
    assert sampled(lambda: engine.stream(HELLO, SAMPLED, TUNED)) == tuned  # the adapter is back on


def test_reference_is_the_sft_adapter_a_run_started_from(tmp_path, tiny_model_dir, chat_adapter_dir):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    sft.save_pretrained(tmp_path / "sft")
    run = tmp_path / "run"
    shutil.copytree(chat_adapter_dir, run)
    config = {"model": {"model_name_or_path": str(tmp_path / "sft")}}
    (run / "preftune_config.yaml").write_text(yaml.safe_dump(config))

    chat = load_chat(str(run))
    assert chat.run.reference_mode == "reference_adapter" and "SFT adapter" in chat.label(REFERENCE)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sft_model = PeftModel.from_pretrained(fresh, tmp_path / "sft").eval()
    expected = sampled(lambda: stream_reply(sft_model, chat.tokenizer, HELLO, 12, 1.0, 1.0))
    assert sampled(lambda: chat.stream(HELLO, SAMPLED, REFERENCE)) == expected
    assert sampled(lambda: chat.stream(HELLO, SAMPLED, TUNED)) != expected


def test_a_full_model_has_one_side(tiny_model_dir):
    chat = load_chat(str(tiny_model_dir))  # e.g. a merged model: no reference without a second copy
    assert chat.sides == [TUNED] and not chat.has_reference and chat.label(TUNED) == "model"
    assert "".join(chat.stream(HELLO, GREEDY, TUNED)) is not None
    with pytest.raises(ValueError, match="no reference"):
        next(chat.stream(HELLO, GREEDY, REFERENCE))


def test_replies_stream_in_pieces(engine):
    pieces = list(engine.stream(HELLO, SAMPLED, TUNED))
    assert len(pieces) > 2 and "".join(pieces).strip()


def test_a_reader_that_stops_early_frees_the_model(engine):
    tuned = sampled(lambda: engine.stream(HELLO, SAMPLED, TUNED))
    long = GenerationSettings(max_new_tokens=400, temperature=1.0, top_p=1.0)
    stream = engine.stream(HELLO, long, REFERENCE)
    next(stream)
    assert engine.lock.locked()
    stream.close()  # generation stops, its thread ends, the adapter is enabled again
    assert not engine.lock.locked()
    assert not [t for t in threading.enumerate() if t.name == "preftune-generate"]
    assert sampled(lambda: engine.stream(HELLO, SAMPLED, TUNED)) == tuned


def test_concurrent_requests_never_switch_adapters_under_each_other(engine):
    alone = {side: "".join(engine.stream(HELLO, GREEDY, side)) for side in (REFERENCE, TUNED)}
    together: dict[str, str] = {}
    start = threading.Barrier(2)

    def ask(side: str) -> None:
        start.wait()
        together[side] = "".join(engine.stream(HELLO, GREEDY, side))

    threads = [threading.Thread(target=ask, args=(side,)) for side in (REFERENCE, TUNED)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert together == alone and alone[REFERENCE] != alone[TUNED]


def test_conversation_keeps_a_history_per_side(engine):
    conversation = Conversation(engine.sides)
    events = list(conversation.answer(engine, "Hi", SAMPLED, system="Be brief."))
    assert [side for side, _ in events][0] == REFERENCE and [side for side, _ in events][-1] == TUNED
    list(conversation.answer(engine, "And then?", SAMPLED, system="Be brief."))
    first, second = conversation.turns
    for side in engine.sides:
        history = conversation.histories[side]
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
        assert history[1]["content"] == first.replies[side] and history[3]["content"] == second.replies[side]
        assert second.prompts[side] == [{"role": "system", "content": "Be brief."}, *history[:3]]
    assert first.prompts[REFERENCE] == first.prompts[TUNED]  # the first turn: one prompt for both
    assert second.prompts[REFERENCE] != second.prompts[TUNED]  # then each side's own history


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_4bit_loading_keeps_both_sides(chat_adapter_dir):
    chat = load_chat(str(chat_adapter_dir), load_in_4bit=True)
    assert any("4bit" in type(m).__name__ for m in chat.run.model.modules())
    assert chat.sides == [REFERENCE, TUNED]
    reference = sampled(lambda: chat.stream(HELLO, SAMPLED, REFERENCE))
    tuned = sampled(lambda: chat.stream(HELLO, SAMPLED, TUNED))
    assert reference.strip() and tuned.strip() and reference != tuned


# --------------------------------------------------------------------------- votes


def make_turn(reference: str, tuned: str, system: bool = True) -> Turn:
    head = [{"role": "system", "content": "Be brief."}] if system else []
    prompts = {
        REFERENCE: [*head, {"role": "user", "content": "a"}, {"role": "assistant", "content": "ref 1"},
                    {"role": "user", "content": "b"}],
        TUNED: [*head, {"role": "user", "content": "a"}, {"role": "assistant", "content": "tuned 1"},
                {"role": "user", "content": "b"}],
    }  # fmt: skip
    return Turn("b", prompts, {REFERENCE: reference, TUNED: tuned}, GenerationSettings())


def test_votes_are_preference_pairs_the_loader_reads(tmp_path):
    from preftune.data import load_preference_splits

    votes = tmp_path / "run" / VOTES_FILE
    turns = {
        vote: make_turn(f"ref {vote}", f"tuned {vote}") for vote in ("tuned", "reference", "tie", "both_bad")
    }
    for vote, turn in turns.items():
        path, reason = record_vote(turn, vote, votes, model="RUN")
        assert turn.vote == vote
        assert (reason is None) == (vote in ("tuned", "reference"))
        assert path == (votes if reason is None else votes.with_name(UNPAIRED_FILE))
    # votes that can't be pairs go to the unpaired file, never into the votes file
    assert record_vote(make_turn("same", "same"), "tuned", votes)[1] == "chosen and rejected are identical"
    assert record_vote(make_turn("", "something"), "tuned", votes)[1] == "empty rejected reply"
    with pytest.raises(ValueError, match="unknown vote"):
        record_vote(make_turn("a", "b"), "maybe", votes)

    lines = [json.loads(line) for line in votes.read_text().splitlines()]
    assert [line["vote"] for line in lines] == ["tuned", "reference"]
    assert lines[0]["chosen"] == [{"role": "assistant", "content": "tuned tuned"}]
    unpaired = [json.loads(line) for line in votes.with_name(UNPAIRED_FILE).read_text().splitlines()]
    assert [u["vote"] for u in unpaired] == ["tie", "both_bad", "tuned", "tuned"]

    loaded = load_preference_splits(str(votes), splits=["train"])  # on_bad_rows="error": all rows good
    first, second = loaded["train"]
    assert (first.chosen, first.rejected) == ("tuned tuned", "ref tuned")
    assert first.prompt == turns["tuned"].prompts[TUNED]  # the chosen side's conversation, system first
    assert (second.chosen, second.rejected) == ("ref reference", "tuned reference")
    assert second.prompt == turns["reference"].prompts[REFERENCE]


def test_votes_append_whole_lines_from_many_threads(tmp_path):
    path = tmp_path / "votes.jsonl"
    text = "x" * 20000  # longer than any write buffer

    def write(i: int) -> None:
        for j in range(20):
            append_jsonl(path, {"i": i, "j": j, "text": text})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 80 and all(r["text"] == text for r in rows)


def test_default_votes_file(tmp_path):
    assert default_votes_file(str(tmp_path)) == tmp_path / VOTES_FILE
    assert default_votes_file("org/model").as_posix() == "runs/chat/votes.jsonl"
    assert default_votes_file(None).as_posix() == "runs/chat/votes.jsonl"


def test_preftune_dpo_trains_on_chat_votes(tmp_path, tiny_model_dir):
    votes = tmp_path / VOTES_FILE
    for i in range(4):
        record_vote(make_turn(f"a long answer number {i}", f"short {i}"), "tuned", votes)
    out = tmp_path / "dpo"
    flags = quiet_argv(tiny_model_dir, votes, out, "--use_peft_lora", "--max_steps", "1")
    assert run_main(["dpo", *flags, "--per_device_train_batch_size", "2", "--max_seq_length", "128"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1


# --------------------------------------------------------------------------- the command


def test_terminal_compare_prints_both_answers(engine, monkeypatch):
    from preftune.cli.chat import terminal_chat

    console = Console(file=io.StringIO(), width=200)
    answers = iter(["Hello there", "/reset", "Again", "/exit"])
    monkeypatch.setattr(console, "input", lambda prompt="": next(answers))
    assert terminal_chat(engine, SAMPLED, console, system="Be brief.", compare=True) == 0
    out = console.file.getvalue()
    assert out.count("reference> ") == 2 and out.count("tuned> ") == 2
    assert out.index("reference> ") < out.index("tuned> ")


def test_compare_needs_a_reference(tiny_model_dir, capsys):
    assert run_main(["chat", "--model", str(tiny_model_dir), "--compare"]) == 2
    err = capsys.readouterr().err
    assert "no reference in memory" in err and "Traceback" not in err


def test_ui_binds_localhost_without_a_share_link(chat_adapter_dir, monkeypatch):
    pytest.importorskip("gradio")
    import preftune.chat.ui as ui

    served, real_build = {}, ui.build_app

    def build(engine, votes_file, *args):
        served["votes_file"] = votes_file
        return real_build(engine, votes_file, *args)

    monkeypatch.setattr(ui, "build_app", build)
    monkeypatch.setattr(ui, "launch", lambda app, **kwargs: served.update(kwargs, app=app))
    assert run_main(["chat", "--ui", "--model", str(chat_adapter_dir)]) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 7860 and served["share"] is False
    assert served["votes_file"] == chat_adapter_dir / VOTES_FILE

    flags = ["--host", "0.0.0.0", "--port", "9999", "--share", "--votes_file", "v.jsonl"]
    assert run_main(["chat", "--ui", "--model", str(chat_adapter_dir), *flags]) == 0
    assert (served["host"], served["port"], served["share"]) == ("0.0.0.0", 9999, True)
    assert str(served["votes_file"]) == "v.jsonl"


def test_launch_passes_host_port_and_share_to_gradio():
    from preftune.chat.ui import launch

    class FakeApp:
        def queue(self, **kwargs):
            self.queued = kwargs

        def launch(self, **kwargs):
            self.launched = kwargs

    app = FakeApp()
    launch(app)
    assert app.launched["server_name"] == "127.0.0.1" and app.launched["share"] is False
    assert app.launched["server_port"] == 7860 and app.launched["prevent_thread_lock"] is False


def test_ui_without_gradio_is_a_one_line_error(monkeypatch, capsys, chat_adapter_dir):
    import sys

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert run_main(["chat", "--ui", "--model", str(chat_adapter_dir)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'preftune[ui]'" in err and "Traceback" not in err


def test_a_full_model_gets_one_pane_and_no_votes(tiny_model_dir, tmp_path):
    gr = pytest.importorskip("gradio")
    from preftune.chat.ui import build_app

    app = build_app(load_chat(str(tiny_model_dir)), tmp_path / VOTES_FILE)
    blocks = list(app.blocks.values())
    assert sum(isinstance(b, gr.Chatbot) for b in blocks) == 1
    assert not [b for b in blocks if isinstance(b, gr.Button) and (b.elem_id or "").startswith("vote-")]
