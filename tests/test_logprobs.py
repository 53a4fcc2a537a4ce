"""Sequence log-probs: the chunked and plain paths, padded and shared-prompt layouts, against a naive
per-token loop."""

import pytest
import torch
from conftest import make_tiny_llama

from preftune.training.batching import PairCollator, SharedPromptCollator
from preftune.training.logprobs import (
    batch_logps,
    chunked_sequence_logps,
    plain_sequence_logps,
    supports_shared_prompt,
)

VOCAB = 97


def naive_logps(model, input_ids, attention_mask, loss_mask):
    """For each row, one forward of the unpadded sequence and a Python loop over reply tokens."""
    sums = []
    for ids, att, mask in zip(input_ids, attention_mask, loss_mask):
        n = int(att.sum())
        logits = model(input_ids=ids[:n].unsqueeze(0)).logits[0].double()
        logp = logits.log_softmax(-1)
        total = 0.0
        for t in range(1, n):
            if mask[t]:
                total += logp[t - 1, ids[t]].item()
        sums.append(total)
    return torch.tensor(sums, dtype=torch.float64)


def batch_of_pairs(seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    features = [
        {"prompt_ids": ids(5), "chosen_ids": ids(4), "rejected_ids": ids(7)},
        {"prompt_ids": ids(9), "chosen_ids": ids(2), "rejected_ids": ids(3)},
        {"prompt_ids": ids(1), "chosen_ids": ids(6), "rejected_ids": ids(1)},
    ]
    return features, PairCollator(pad_token_id=0)(features)


def test_collator_layout():
    features, batch = batch_of_pairs()
    assert batch["input_ids"].shape == (6, 12)  # longest row: prompt 5 + rejected 7
    for i, f in enumerate(features):
        chosen_row, rejected_row = batch["input_ids"][i], batch["input_ids"][i + 3]
        n_c = len(f["prompt_ids"]) + len(f["chosen_ids"])
        assert chosen_row[:n_c].tolist() == f["prompt_ids"] + f["chosen_ids"]
        assert batch["loss_mask"][i].sum() == len(f["chosen_ids"])
        assert batch["loss_mask"][i + 3].sum() == len(f["rejected_ids"])
        assert rejected_row[: len(f["prompt_ids"])].tolist() == f["prompt_ids"]
        assert not batch["loss_mask"][i][: len(f["prompt_ids"])].any()  # no loss on the prompt
    assert not (batch["loss_mask"] & ~batch["attention_mask"].bool()).any()  # no loss on padding


def test_plain_and_chunked_match_naive():
    model = make_tiny_llama(VOCAB).eval()
    _, batch = batch_of_pairs()
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        expected = naive_logps(model, *args)
        plain = plain_sequence_logps(model, batch)
        chunked = chunked_sequence_logps(model, batch, chunk_size=4)  # several chunks
    torch.testing.assert_close(plain.logps.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunked.logps.double(), expected, rtol=1e-5, atol=1e-4)
    assert plain.n_tokens.tolist() == [4, 2, 6, 7, 3, 1]


def test_chunked_gradients_match_plain():
    model = make_tiny_llama(VOCAB)
    _, batch = batch_of_pairs(seed=1)
    grads = []
    for fn in (plain_sequence_logps, lambda *a: chunked_sequence_logps(*a, chunk_size=3)):
        model.zero_grad()
        fn(model, batch).logps.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


def test_chunked_under_bf16_autocast_matches_plain():
    """Under autocast the head's weight is cast once for all chunks: same numbers as the full
    logits (which autocast also computes from the bf16 weight), gradients included."""
    model = make_tiny_llama(VOCAB)
    _, batch = batch_of_pairs(seed=5)
    results = []
    for fn in (plain_sequence_logps, lambda *a: chunked_sequence_logps(*a, chunk_size=3)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = fn(model, batch).logps
        logps.sum().backward()
        results.append((logps.detach(), model.lm_head.weight.grad.clone()))
    (plain, plain_grad), (chunked, chunked_grad) = results
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(chunked_grad, plain_grad, rtol=2e-2, atol=2e-2)


def test_chunked_path_runs_the_lm_head_on_no_position():
    """The model's own head call gets no position (the head runs on reply tokens in chunks only):
    `logits_to_keep=1` would cost a bf16 copy of the whole head weight per row on a CPU."""
    model = make_tiny_llama(VOCAB)
    _, batch = batch_of_pairs(seed=6)
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(tuple(args[0].shape)))
    chunked_sequence_logps(model, batch, chunk_size=4).logps.sum().backward()
    assert seen and all(shape[1] == 0 for shape in seen), seen
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_chunked_works_through_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        make_tiny_llama(VOCAB), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    _, batch = batch_of_pairs(seed=2)
    with torch.no_grad():
        chunked = batch_logps(model, batch, chunked=True).logps
        plain = batch_logps(model, batch, chunked=False).logps
        with model.disable_adapter():
            base = batch_logps(model, batch).logps
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(chunked, base)  # the adapter is really applied


# ---- shared-prompt layout: [prompt | chosen | rejected] per pair, short pairs packed together -----


def shared_features(seed=3):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    # lengths 16, 6, 5, 4, 12: the short pairs share rows of the longest pair's length
    return [
        {"prompt_ids": ids(5), "chosen_ids": ids(4), "rejected_ids": ids(7)},
        {"prompt_ids": ids(3), "chosen_ids": ids(2), "rejected_ids": ids(1)},
        {"prompt_ids": ids(1), "chosen_ids": ids(3), "rejected_ids": ids(1)},
        {"prompt_ids": ids(2), "chosen_ids": ids(1), "rejected_ids": ids(1)},
        {"prompt_ids": ids(9), "chosen_ids": ids(2), "rejected_ids": ids(1)},
    ]


def test_shared_prompt_collator_layout():
    features = shared_features()
    batch = SharedPromptCollator(pad_token_id=0)(features)
    rows, length = batch["input_ids"].shape
    assert length == 16 and rows < len(features)  # packed: fewer rows than pairs
    n = len(features)
    assert batch["reply_lengths"].tolist() == [4, 2, 3, 1, 2, 7, 1, 1, 1, 1]
    flat_ids = batch["input_ids"].flatten()
    for i, f in enumerate(features):
        where = (batch["segment_ids"] == i).nonzero()
        r, cols = where[0, 0].item(), where[:, 1]
        assert (where[:, 0] == r).all()  # a pair never straddles rows
        p, c, j = f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]
        assert batch["input_ids"][r, cols].tolist() == p + c + j
        assert batch["position_ids"][r, cols].tolist() == list(range(len(p) + len(c))) + list(
            range(len(p), len(p) + len(j))
        )
        assert batch["branch_ids"][r, cols].tolist() == [0] * len(p) + [1] * len(c) + [2] * len(j)
        # every reply token is predicted by the token before it in its own sequence
        for row_id, reply in ((i, c), (n + i, j)):
            picked = batch["target_rows"] == row_id
            assert batch["target_ids"][picked].tolist() == reply
            predictors = flat_ids[batch["predict_index"][picked]].tolist()
            assert predictors == [p[-1]] + reply[:-1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("attention_ratio", [None, 0.0], ids=["rows-of-the-longest-pair", "one-row"])
def test_shared_prompt_matches_padded(attn, attention_ratio):
    """Same sums and token counts as the padded layout's plain path, fp32, within 1e-4."""
    model = make_tiny_llama(VOCAB)
    model.config._attn_implementation = attn
    model.eval()
    features = shared_features()
    padded = PairCollator(pad_token_id=0)(features)
    shared = SharedPromptCollator(pad_token_id=0, attention_ratio=attention_ratio)(features)
    if attention_ratio == 0.0:  # attention for free: everything in one row
        assert shared["input_ids"].shape == (1, sum(len(v) for f in features for v in f.values()))
    assert supports_shared_prompt(model, max_length=64)
    with torch.no_grad():
        expected = plain_sequence_logps(model, padded)
        for out in (plain_sequence_logps(model, shared), chunked_sequence_logps(model, shared, chunk_size=5)):
            torch.testing.assert_close(out.logps, expected.logps, rtol=0, atol=1e-4)
            assert out.n_tokens.tolist() == expected.n_tokens.tolist()


def test_shared_prompt_gradients_match_padded():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        make_tiny_llama(VOCAB), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    features = shared_features(seed=4)
    grads = []
    for batch in (PairCollator(pad_token_id=0)(features), SharedPromptCollator(pad_token_id=0)(features)):
        model.zero_grad()
        logps = batch_logps(model, batch).logps
        (logps * torch.linspace(0.5, 1.5, logps.shape[0])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


def test_shared_prompt_needs_a_mask_taking_attention():
    model = make_tiny_llama(VOCAB)
    model.config._attn_implementation = "flash_attention_2"
    assert not supports_shared_prompt(model, max_length=64)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 32
    assert not supports_shared_prompt(model, max_length=64)  # the window would be ignored
    assert supports_shared_prompt(model, max_length=16)


def test_packing_weighs_padding_against_attention():
    from preftune.training.batching import attention_cost_ratio

    config = make_tiny_llama(VOCAB).config
    ratio = attention_cost_ratio(config)
    # tiny Llama: hidden 32, 4 heads, 2 kv heads, intermediate 64 -> 4*32 / (2 * (2048 + 1024 + 6144))
    assert ratio == pytest.approx(128 / (2 * 9216))
    collator = SharedPromptCollator(pad_token_id=0, attention_ratio=0.002)
    rows, length = collator._rows([300, 140])  # 2 x 300 x 1.6 = 960 > 1 x 440 x 1.88 = 827
    assert (len(rows), length) == (1, 440)
    rows, length = collator._rows([300, 300])  # 2 x 300 x 1.6 = 960 < 1 x 600 x 2.2 = 1320
    assert (len(rows), length) == (2, 300)


# --------------------------------------------------------------------------- pair attention


def edge_features(seed=7):
    """Pairs of every shape pair attention treats apart: no prompt, empty replies, long prompts."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return shared_features(seed) + [
        {"prompt_ids": [], "chosen_ids": ids(4), "rejected_ids": ids(3)},
        {"prompt_ids": [], "chosen_ids": [], "rejected_ids": ids(3)},
        {"prompt_ids": ids(4), "chosen_ids": ids(2), "rejected_ids": []},
        {"prompt_ids": ids(12), "chosen_ids": ids(1), "rejected_ids": ids(1)},
    ]


@pytest.mark.parametrize("attention_ratio", [None, 0.0], ids=["rows-of-the-longest-pair", "one-row"])
def test_pair_attention_matches_the_masked_row(attention_ratio):
    """Block-by-block attention gives the masked pass's log-probs (fp32, 1e-4) and gradients."""
    from peft import LoraConfig, get_peft_model

    from preftune.training import pair_attention

    model = get_peft_model(
        make_tiny_llama(VOCAB), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    config = model.get_base_model().config
    batch = SharedPromptCollator(pad_token_id=0, attention_ratio=attention_ratio)(edge_features())
    padded = PairCollator(pad_token_id=0)(edge_features())
    results = []
    for by_pair in (False, True):
        model.zero_grad()
        with pair_attention.enabled(config) if by_pair else torch.enable_grad():
            calls = pair_attention.calls_with_layout
            logps = batch_logps(model, batch).logps
            (logps * torch.linspace(0.5, 1.5, logps.shape[0])).sum().backward()
            assert (pair_attention.calls_with_layout > calls) == by_pair
        results.append(
            (logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    assert config._attn_implementation == "sdpa"  # restored after the block
    (masked, masked_grads), (by_pair, by_pair_grads) = results
    with torch.no_grad():
        expected = plain_sequence_logps(model, padded).logps
    torch.testing.assert_close(masked, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(by_pair, masked, rtol=0, atol=1e-4)
    for name in masked_grads:
        torch.testing.assert_close(by_pair_grads[name], masked_grads[name], rtol=1e-4, atol=1e-5)


def test_pair_attention_leaves_eager_attention_masked():
    from preftune.training import pair_attention

    model = make_tiny_llama(VOCAB)
    model.config._attn_implementation = "eager"
    with pair_attention.enabled(model.config) as on:
        assert not on and model.config._attn_implementation == "eager"


def test_a_model_that_drops_the_layout_is_a_clear_error(monkeypatch):
    """If a model's attention never receives `pair_layout`, the forward says so instead of silently
    attending without the mask."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from preftune.training import pair_attention

    model = make_tiny_llama(VOCAB)
    batch = SharedPromptCollator(pad_token_id=0)(shared_features())
    monkeypatch.setitem(
        AttentionInterface._global_mapping, pair_attention.PAIR_ATTENTION, sdpa_attention_forward
    )
    with pair_attention.enabled(model.config), pytest.raises(RuntimeError, match="--pair_attention false"):
        batch_logps(model, batch)


# --------------------------------------------------------------------------- fused LoRA forward


def lora_pair(dropout=0.0):
    """The same LoRA model twice: PEFT's forward and the fused one."""
    import copy

    from peft import LoraConfig, get_peft_model

    from preftune.training.lora_forward import use_lean_lora_forward

    peft_model = get_peft_model(
        make_tiny_llama(VOCAB),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout),
    )
    fused = copy.deepcopy(peft_model)
    assert use_lean_lora_forward(fused) == 2 * 7  # q k v o gate up down in both layers
    return peft_model, fused


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_lora_forward_matches_peft(precision):
    """Same log-probs and LoRA gradients as PEFT's forward: fp32 to rounding, bf16 autocast within
    bf16's precision; with the adapter disabled, the base model's."""
    peft_model, fused = lora_pair()
    batch = SharedPromptCollator(pad_token_id=0)(edge_features())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    tolerance = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=5e-2)
    results = []
    for model in (peft_model, fused):
        with autocast:
            logps = batch_logps(model, batch).logps
        logps.sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad(), model.disable_adapter(), autocast:
            base = batch_logps(model, batch).logps
        results.append((logps.detach(), grads, base))
    (logps, grads, base), (f_logps, f_grads, f_base) = results
    torch.testing.assert_close(f_logps, logps, **tolerance)
    torch.testing.assert_close(f_base, base, **tolerance)
    assert (logps - base).abs().max() > 1e-3  # the adapter does change the output
    for name in grads:
        if precision == "fp32":
            torch.testing.assert_close(f_grads[name], grads[name], rtol=1e-4, atol=1e-6)
        else:  # bf16 roundings differ per element: the direction must agree
            cosine = torch.nn.functional.cosine_similarity(
                f_grads[name].flatten(), grads[name].flatten(), dim=0
            )
            assert cosine > 0.99, (name, cosine)


def test_fused_lora_forward_leaves_other_cases_to_peft():
    """Merged adapters, a second active adapter's switch and dropout keep PEFT's results."""
    peft_model, fused = lora_pair(dropout=0.5)
    x = torch.randint(3, VOCAB, (2, 9))
    for model in (peft_model, fused):
        model.eval()  # dropout off: the fused forward may run
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=x).logits, peft_model(input_ids=x).logits)
    torch.manual_seed(0)
    fused.train()
    with torch.no_grad():
        a = fused(input_ids=x).logits
        b = fused(input_ids=x).logits
    assert not torch.allclose(a, b)  # training-mode dropout is applied (PEFT's forward)
    fused.eval()
    fused.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(
            fused(input_ids=x).logits, peft_model(input_ids=x).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "masked"])
def test_padded_attention_blocks_equal_unpadded(monkeypatch, causal):
    """Blocks padded to LENGTH_BUCKET (as on a CPU in bf16) give the unpadded outputs and gradients;
    forced here in fp32 so the comparison is tight."""
    import torch.nn.functional as F

    from preftune.training import pair_attention

    torch.manual_seed(0)
    n_q, n_prompt = 37, 21
    n_k = n_q if causal else n_prompt + n_q
    q, k, v = (torch.randn(1, 4, n, 16, requires_grad=True) for n in (n_q, n_k, n_k))
    mask = None if causal else torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_prompt)
    weights = torch.randn(1, 4, n_q, 16)
    real_sdpa = F.scaled_dot_product_attention
    seen = []  # query lengths SDPA was called with

    def recording_sdpa(*args, **kwargs):
        seen.append(args[0].shape[2])
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    results = []
    for padded in (False, True):
        monkeypatch.setattr(pair_attention, "_bucketed_lengths", lambda query, padded=padded: padded)
        seen.clear()
        out = pair_attention.attend(q, k, v, mask, 0.0, None)
        (out * weights).sum().backward()
        assert seen == [64 if padded else n_q] and out.shape[2] == n_q
        results.append((out.detach(), [t.grad.clone() for t in (q, k, v)]))
        for t in (q, k, v):
            t.grad = None
    (plain, plain_grads), (padded_out, padded_grads) = results
    torch.testing.assert_close(padded_out, plain, rtol=0, atol=1e-5)
    for a, b in zip(padded_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_attention_lengths_are_bucketed_on_cpu_in_bf16_only():
    from preftune.training import pair_attention

    assert pair_attention._bucketed_lengths(torch.zeros(1, dtype=torch.bfloat16))
    assert pair_attention._bucketed_lengths(torch.zeros(1, dtype=torch.float16))
    assert not pair_attention._bucketed_lengths(torch.zeros(1, dtype=torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 queries (rotary in fp32), bf16 SDPA
        assert pair_attention._bucketed_lengths(torch.zeros(1, dtype=torch.float32))
    q = torch.randn(1, 2, 10, 8, dtype=torch.bfloat16)
    out = pair_attention.attend(q, q, q, None, 0.0, None)
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_reply_token_logps_function_matches_cross_entropy():
    """The fused chunk function: -cross_entropy's values and its gradients for the hidden states
    and the head weight (fp32, tight), and whether each target is the argmax."""
    import torch.nn.functional as F

    from preftune.training.logprobs import ReplyTokenLogps

    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    upstream = torch.randn(7)
    results = []
    for fn in (
        lambda h, w: -F.cross_entropy(F.linear(h, w), targets, reduction="none"),
        lambda h, w: ReplyTokenLogps.apply(h, targets, w)[0],
    ):
        out = fn(hidden, weight)
        (out * upstream).sum().backward()
        results.append((out.detach(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    targets[:3] = F.linear(hidden, weight)[:3].argmax(dim=1)  # three targets the model ranks first
    _, is_argmax = ReplyTokenLogps.apply(hidden, targets, weight)
    assert not is_argmax.requires_grad
    assert is_argmax.tolist() == (F.linear(hidden, weight).argmax(dim=1) == targets).tolist()
    assert is_argmax[:3].all()


def test_default_chunk_size_is_smaller_on_cpu():
    from preftune.training.logprobs import default_chunk_size

    assert default_chunk_size(49152, torch.device("cpu")) == 21  # 2**20 fp32 logits
    assert default_chunk_size(49152, torch.device("cuda")) == 85  # 2**22
    assert default_chunk_size(256_000, torch.device("cpu")) == 16  # never below 16 tokens
