"""SFT on a tiny random Llama: data formats, completion-only masks, packing that does not leak across
examples, the loss going down on held-out data, and the SFT adapter feeding DPO's two-adapter path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PAIRS, make_tiny_llama, quiet_argv
from safetensors.torch import load_file
from transformers import TrainingArguments

from preftune.cli.arguments import parse_command_args
from preftune.cli.main import DPO_DEFAULTS
from preftune.config import DataArguments, ModelArguments, PreferenceArguments, SFTArguments
from preftune.data.sft import SFTExample, normalize_sft_rows, render_segments, tokenize_sft_example
from preftune.models.prepare import REFERENCE_ADAPTER, adapter_state, prepare_models
from preftune.training.dpo import run_dpo
from preftune.training.packing import IGNORE_INDEX, SFTCollator, pack_examples
from preftune.training.sft import run_sft, token_stats

SFT_TYPES = (ModelArguments, DataArguments, SFTArguments, TrainingArguments)
DPO_TYPES = (ModelArguments, DataArguments, PreferenceArguments, TrainingArguments)

CONVERSATION = [
    {"role": "system", "content": "Answer in JSON."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": '{"answer": "5"}'},
    {"role": "user", "content": "And 2 plus 4?"},
    {"role": "assistant", "content": '{"answer": "6"}'},
]


def quiet_args(types, model, data, out, *extra: str, defaults=DPO_DEFAULTS):
    return parse_command_args(types, quiet_argv(model, data, out, *extra), defaults=defaults)


def targets_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"messages": CONVERSATION}, CONVERSATION),
        (
            {
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
                "system": "S",
            },
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ],
        ),
        (
            {"prompt": "hi", "completion": "hello"},
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        ),
        (
            PAIRS[0],
            [
                {"role": "user", "content": PAIRS[0]["prompt"]},
                {"role": "assistant", "content": PAIRS[0]["chosen"]},
            ],
        ),
        (
            {
                "conversations": [{"from": "human", "value": "hi"}],
                "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"},
            },
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}],
        ),
    ],
    ids=["messages", "sharegpt", "prompt_completion", "preference_explicit", "preference_sharegpt"],
)
def test_formats_are_detected_and_normalized(row, expected):
    examples, bad = normalize_sft_rows([row])
    assert not bad
    assert examples[0].messages == expected


def test_text_format_and_bad_rows():
    examples, bad = normalize_sft_rows([{"text": "hello world"}, {"text": ""}])
    assert examples[0].text == "hello world" and examples[0].messages == []
    assert [b.row for b in bad] == [1]
    _, bad = normalize_sft_rows([{"messages": [{"role": "user", "content": "no reply"}]}])
    assert "no assistant reply" in bad[0].reason


def test_completion_only_mask_covers_every_assistant_turn_and_nothing_else(tokenizer):
    example = SFTExample(CONVERSATION)
    tokenized = tokenize_sft_example(example, tokenizer, "tokenizer", max_length=512, max_prompt_length=256)
    segments = render_segments(example, tokenizer, "tokenizer")
    # The pieces are the whole rendered conversation, and the reply pieces are the assistant turns.
    assert "".join(text for text, _ in segments) == tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )
    replies = [text for text, is_reply in segments if is_reply]
    assert replies == ['{"answer": "5"}<|im_end|>\n', '{"answer": "6"}<|im_end|>\n']
    assert targets_text(tokenizer, tokenized) == "".join(replies)
    assert tokenized.loss_mask[0] == 0

    everything = tokenize_sft_example(
        example, tokenizer, "tokenizer", max_length=512, max_prompt_length=256, completion_only=False
    )
    assert everything.input_ids == tokenized.input_ids
    assert everything.loss_mask == [0] + [1] * (len(everything.input_ids) - 1)


def test_collator_labels_ignore_prompt_and_padding(tokenizer):
    examples = [
        tokenize_sft_example(SFTExample(CONVERSATION[:3]), tokenizer, "tokenizer", 512, 256).as_feature(),
        tokenize_sft_example(SFTExample(CONVERSATION), tokenizer, "tokenizer", 512, 256).as_feature(),
    ]
    batch = SFTCollator(pad_token_id=tokenizer.pad_token_id)(examples)
    short = len(examples[0]["input_ids"])
    assert batch["attention_mask"][0, short:].sum() == 0  # padding
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    for row, feature in enumerate(examples):
        n = len(feature["input_ids"])
        expected = [t if m else IGNORE_INDEX for t, m in zip(feature["input_ids"], feature["loss_mask"])]
        assert batch["labels"][row, :n].tolist() == expected
    assert (
        tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX])
        == '{"answer": "5"}<|im_end|>\n'
    )


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_reply(tokenizer):
    long_prompt = [
        {"role": "user", "content": "word " * 200},
        {"role": "assistant", "content": "short reply"},
    ]
    tokenized = tokenize_sft_example(
        SFTExample(long_prompt), tokenizer, "tokenizer", max_length=64, max_prompt_length=32
    )
    assert len(tokenized.input_ids) <= 64
    assert targets_text(tokenizer, tokenized) == "short reply<|im_end|>\n"
    assert tokenized.loss_mask.index(1) == 32  # the prompt kept its last 32 tokens


# --------------------------------------------------------------------------- packing


def test_pack_examples_keeps_every_example_whole():
    examples = [{"input_ids": list(range(n)), "loss_mask": [0] + [1] * (n - 1)} for n in (8, 2, 7, 3, 5, 5)]
    rows = pack_examples(examples, max_length=10)
    assert all(len(r["input_ids"]) <= 10 and sum(r["seq_lengths"]) == len(r["input_ids"]) for r in rows)
    assert sorted(n for r in rows for n in r["seq_lengths"]) == [2, 3, 5, 5, 7, 8]
    assert len(rows) == 3  # 30 tokens in rows of 10: best-fit fills them exactly
    with pytest.raises(ValueError, match="longer than the packing length"):
        pack_examples(examples, max_length=7)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_same_log_probs_as_examples_one_by_one(attn, tokenizer):
    model = make_tiny_llama(len(tokenizer))
    model.config._attn_implementation = attn
    model.eval()
    rows = [{"messages": CONVERSATION}] + [
        {"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS[:4]
    ]
    examples = [
        tokenize_sft_example(e, tokenizer, "tokenizer", 512, 256, completion_only=False).as_feature()
        for row in rows
        for e in normalize_sft_rows([row])[0]
    ]
    packed = pack_examples(examples, max_length=160)
    assert len(packed) == 2 and max(len(r["seq_lengths"]) for r in packed) >= 3  # real packing, and padding
    batch = SFTCollator(pad_token_id=tokenizer.pad_token_id, padding_free=True)(packed)
    assert "attention_mask" not in batch

    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        for row, feature in enumerate(packed):
            start = 0
            for n in feature["seq_lengths"]:
                alone = model(input_ids=batch["input_ids"][row : row + 1, start : start + n]).logits
                torch.testing.assert_close(
                    logits[row : row + 1, start : start + n], alone, atol=1e-4, rtol=1e-4
                )
                start += n

        # The loss sums agree too: packed vs one by one, chunked vs full logits.
        separate = [SFTCollator(tokenizer.pad_token_id)([e]) for e in examples]
        nll_alone = sum(
            token_stats(model, b["input_ids"], b["labels"], b["attention_mask"]).nll for b in separate
        )
        targets_alone = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in separate)
        for chunked in (True, False):
            stats = token_stats(
                model,
                batch["input_ids"],
                batch["labels"],
                position_ids=batch["position_ids"],
                chunked=chunked,
            )
            assert int(stats.n_targets) == targets_alone
            torch.testing.assert_close(stats.nll, nll_alone, atol=1e-3, rtol=1e-5)


def test_chunked_token_stats_match_full_logits_with_gradients(tokenizer, monkeypatch):
    """SFT's chunked loss (one ReplyTokenLogps per chunk of a plain head) against the full logits:
    the same NLL, target and correct counts, and the same weight gradients (fp32, tight)."""
    from preftune.training import sft

    calls = []
    fused_apply = sft.ReplyTokenLogps.apply
    monkeypatch.setattr(sft.ReplyTokenLogps, "apply", lambda *a: calls.append(1) or fused_apply(*a))
    torch.manual_seed(0)
    model = make_tiny_llama(len(tokenizer))
    examples = [
        tokenize_sft_example(e, tokenizer, "tokenizer", 512, 256, completion_only=True).as_feature()
        for p in PAIRS[:3]
        for e in normalize_sft_rows([{"prompt": p["prompt"], "completion": p["chosen"]}])[0]
    ]
    batch = SFTCollator(pad_token_id=tokenizer.pad_token_id)(examples)
    results = []
    for chunked in (False, True):
        model.zero_grad()
        stats = token_stats(
            model, batch["input_ids"], batch["labels"], batch["attention_mask"], chunked=chunked, chunk_size=5
        )
        stats.nll.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((stats, grads))
    (full, full_grads), (chunks, chunk_grads) = results
    torch.testing.assert_close(chunks.nll, full.nll, rtol=1e-5, atol=1e-4)
    assert int(chunks.n_targets) == int(full.n_targets) > 5  # several chunks
    assert len(calls) == -(-int(chunks.n_targets) // 5)  # each chunk through the fused function
    assert int(chunks.n_correct) == int(full.n_correct)
    # (the tiny model ties its head to the input embedding: that gradient holds the head's part)
    assert chunk_grads.keys() == full_grads.keys() and "model.embed_tokens.weight" in chunk_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunk_grads[name], grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- training


@pytest.fixture
def sft_data(tmp_path) -> Path:
    """Chat conversations with JSON answers (held-out rows have the same form, other contents)."""
    rows = []
    for i in range(40):
        a, b = i % 7, i // 7
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f'{{"answer": "{a + b}"}}'},
                ]
            }
        )
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_full_finetune_builds_no_reference_copy(tiny_model_dir):
    prepared = prepare_models(ModelArguments(model_name_or_path=str(tiny_model_dir)), with_reference=False)
    assert prepared.reference_mode == "none" and prepared.reference_model is None


@pytest.mark.parametrize("packing", [False, True])
def test_sft_lowers_held_out_loss(packing, tiny_model_dir, sft_data, tmp_path):
    args = quiet_args(
        SFT_TYPES, tiny_model_dir, sft_data, tmp_path / "sft",
        "--test_size", "8", "--max_steps", "10", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "4", "--eval_strategy", "steps", "--eval_steps", "10",
        "--eval_on_start", "true", "--max_seq_length", "128", "--packing", str(packing).lower(),
    )  # fmt: skip
    result = run_sft(*args)
    history = result.trainer.state.log_history
    evals = [h for h in history if "eval_loss" in h]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5
    assert evals[-1]["eval_perplexity"] < evals[0]["eval_perplexity"]
    train_logs = [h for h in history if "loss" in h]
    assert all("token_accuracy" in h and h["tokens_per_second"] > 0 for h in train_logs)
    assert result.eval_metrics["eval_token_accuracy"] > evals[0]["eval_token_accuracy"]
    assert (tmp_path / "sft" / "model.safetensors").is_file()
    if packing:
        assert result.n_train < result.n_train_examples


def test_sft_adapter_feeds_dpo_as_policy_and_frozen_reference(tiny_model_dir, pairs_file, tmp_path):
    sft_args = quiet_args(
        SFT_TYPES, tiny_model_dir, pairs_file, tmp_path / "sft",
        "--use_peft_lora", "--lora_r", "8", "--max_steps", "2", "--learning_rate", "1e-2",
    )  # fmt: skip
    run_sft(*sft_args)

    dpo_args = quiet_args(DPO_TYPES, tmp_path / "sft", pairs_file, tmp_path / "dpo", "--max_steps", "1")
    result = run_dpo(*dpo_args)
    assert result.reference_mode == "reference_adapter"
    # The frozen reference is exactly the saved SFT adapter.
    saved = load_file(tmp_path / "sft" / "adapter_model.safetensors")
    reference = adapter_state(result.trainer.model, REFERENCE_ADAPTER)
    reference = {k.replace(f".{REFERENCE_ADAPTER}.", "."): v for k, v in reference.items()}
    assert saved and saved.keys() == reference.keys()
    for name, value in saved.items():
        torch.testing.assert_close(reference[name], value)


def test_sft_pairs_checkpointed_layers_with_the_same_losses(tiny_model_dir, sft_data, tmp_path, paired_steps):
    """`preftune sft` runs its steps with paired checkpointing too (preftune.training
    .paired_checkpointing); the losses and gradient norms match --paired_checkpointing false."""
    histories = {}
    for paired in ("true", "false"):
        args = quiet_args(
            SFT_TYPES, tiny_model_dir, sft_data, tmp_path / f"sft-{paired}",
            "--use_peft_lora", "--max_steps", "2", "--learning_rate", "1e-2", "--max_seq_length", "128",
            "--gradient_checkpointing", "true", "--paired_checkpointing", paired,
        )  # fmt: skip
        history = run_sft(*args).trainer.state.log_history
        histories[paired] = [(h["loss"], h["grad_norm"]) for h in history if "loss" in h]
    assert paired_steps == [1, 1]  # the tiny model's 2 layers, in each step of the paired run
    assert len(histories["true"]) == 2 and histories["true"] == histories["false"]
