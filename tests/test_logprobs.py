"""Sequence log-probs: the chunked and plain paths against a naive per-token loop."""

import torch
from conftest import make_tiny_llama

from preftune.training.batching import PairCollator
from preftune.training.logprobs import chunked_sequence_logps, plain_sequence_logps, sequence_logps

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
        plain = plain_sequence_logps(model, *args)
        chunked = chunked_sequence_logps(model, *args, chunk_size=4)  # several chunks
    torch.testing.assert_close(plain.logps.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunked.logps.double(), expected, rtol=1e-5, atol=1e-4)
    assert plain.n_tokens.tolist() == [4, 2, 6, 7, 3, 1]


def test_chunked_gradients_match_plain():
    model = make_tiny_llama(VOCAB)
    _, batch = batch_of_pairs(seed=1)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    grads = []
    for fn in (plain_sequence_logps, lambda *a: chunked_sequence_logps(*a, chunk_size=3)):
        model.zero_grad()
        fn(model, *args).logps.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


def test_chunked_works_through_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        make_tiny_llama(VOCAB), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    _, batch = batch_of_pairs(seed=2)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        chunked = sequence_logps(model, *args, chunked=True).logps
        plain = sequence_logps(model, *args, chunked=False).logps
        with model.disable_adapter():
            base = sequence_logps(model, *args).logps
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(chunked, base)  # the adapter is really applied
