"""Tests for preftune.evaluation.generation on a tiny random Llama with a local character tokenizer."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from preftune.evaluation.generation import generate_replies, render_prompt, stop_token_ids

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPTS = [
    "Hi",
    "What is the capital of France?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color, please."}],
    "2+2?",
    "Tell me something about the sea and the sky.",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level chatml tokenizer built locally (no Hub access); it has no pad token."""
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + ["<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
    )
    # float64 so that padded and unpadded batches cannot differ by a rounding-level argmax flip
    return LlamaForCausalLM(config).to(torch.float64)


def test_render_prompt_string_is_one_user_message(tokenizer):
    text = render_prompt(tokenizer, "Hi")
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert text == render_prompt(tokenizer, [{"role": "user", "content": "Hi"}])


def test_stop_token_ids_include_end_of_turn(tokenizer):
    ids = stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in ids


def test_batched_greedy_equals_one_at_a_time(model, tokenizer):
    batched = generate_replies(
        model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, show_progress=False
    )
    single = [
        generate_replies(model, tokenizer, [p], max_new_tokens=12, batch_size=1, show_progress=False)[0]
        for p in PROMPTS
    ]
    assert batched == single
    assert len(batched) == len(PROMPTS)
    assert any(batched), "the random model should generate some non-special text"
    assert all(r == r.strip() and "<|im_end|>" not in r for r in batched)


def test_restores_tokenizer_and_training_mode(model, tokenizer):
    model.train()
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"
    generate_replies(model, tokenizer, PROMPTS[:2], max_new_tokens=2, show_progress=False)
    assert model.training
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"
    model.eval()
    generate_replies(model, tokenizer, PROMPTS[:2], max_new_tokens=2, show_progress=False)
    assert not model.training


def test_sampling_is_seeded_and_leaves_global_rng_alone(model, tokenizer):
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, show_progress=False)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate_replies(model, tokenizer, PROMPTS, seed=1, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate_replies(model, tokenizer, PROMPTS, seed=1, **kwargs)
    assert a == b


def test_empty_prompts(model, tokenizer):
    assert generate_replies(model, tokenizer, [], show_progress=False) == []


def test_peft_model_and_disable_adapter(model, tokenizer):
    base = generate_replies(model, tokenizer, PROMPTS, max_new_tokens=8, show_progress=False)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    try:
        tuned = generate_replies(
            peft_model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2, show_progress=False
        )
        tuned_single = [
            generate_replies(peft_model, tokenizer, [p], max_new_tokens=8, show_progress=False)[0]
            for p in PROMPTS
        ]
        assert tuned == tuned_single
        assert tuned != base  # the random (non-zero) LoRA weights change the replies
        with peft_model.disable_adapter():
            reference = generate_replies(
                peft_model, tokenizer, PROMPTS, max_new_tokens=8, show_progress=False
            )
        assert reference == base
    finally:
        peft_model.unload()  # leave the module-scoped base model as it was
