"""The SFT recipe, top to bottom: model -> data -> (packing) -> trainer -> train -> evaluate -> save.

Supervised fine-tuning with full weights, LoRA or QLoRA (the same `prepare_models` as DPO, without a
reference). The loss is the mean negative log-likelihood of the target tokens: the assistant replies
by default, every token with --completion_only_loss false. Logged beside it: token accuracy and
tokens/s; on the held-out split: eval_loss, eval_token_accuracy and eval_perplexity.

A LoRA run saves a PEFT adapter that `preftune dpo --model_name_or_path OUTPUT_DIR` trains further,
with the same adapter, frozen, as its reference.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed

from preftune.config import DataArguments, ModelArguments, SFTArguments
from preftune.data import apply_template
from preftune.data.sft import load_sft_splits, tokenize_sft_examples
from preftune.models.prepare import PreparedModels, prepare_models
from preftune.training import common, distributed, paired_checkpointing
from preftune.training.logprobs import (
    ReplyTokenLogps,
    catch_decoder_output,
    chunk_logits,
    default_chunk_size,
    head_for_chunks,
    no_logits,
    supports_chunked_logps,
    unwrap_causal_lm,
)
from preftune.training.packing import IGNORE_INDEX, SFTCollator, pack_examples

logger = logging.getLogger("preftune")

Tensor = torch.Tensor


# --------------------------------------------------------------------------- loss


@dataclass
class TokenStats:
    """Sums over the target tokens of a batch."""

    nll: Tensor  # summed negative log-likelihood (differentiable)
    n_targets: Tensor  # number of target tokens
    n_correct: Tensor  # targets that are the argmax prediction


def _chunk_stats(hidden: Tensor, targets: Tensor, head: torch.nn.Module | Tensor, softcap: float | None):
    logits = chunk_logits(hidden, head, softcap)
    nll = F.cross_entropy(logits, targets, reduction="sum")
    return nll, (logits.detach().argmax(dim=-1) == targets).sum()


def token_stats(
    model: torch.nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    chunked: bool = True,
    chunk_size: int | None = None,
) -> TokenStats:
    """NLL, target count and correct count of `labels` (position t predicts labels[t + 1]).

    chunked: run the model for its last hidden states and apply the LM head to target positions only,
    a chunk at a time under activation checkpointing (the fp32 logits of the whole batch never exist);
    otherwise take the model's full logits. Both give the same numbers. A plain bias-free head (no
    logit softcap) takes `ReplyTokenLogps`, one autograd function per chunk, as DPO's log-probs do.
    """
    targets = labels[:, 1:]
    predict = targets != IGNORE_INDEX
    targets = targets[predict]
    inputs = dict(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    if not (chunked and supports_chunked_logps(model)):
        logits = model(**inputs).logits[:, :-1][predict]
        nll, correct = _chunk_stats(logits, targets, torch.nn.Identity(), None)
        return TokenStats(nll, predict.sum(), correct)

    causal_lm = unwrap_causal_lm(model)
    lm_head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    with catch_decoder_output(model) as caught:
        model(**inputs, logits_to_keep=no_logits(input_ids.device))
    hidden = caught[-1][:, :-1][predict]  # [n_targets, hidden]
    head = head_for_chunks(lm_head, hidden.device)
    chunk_size = chunk_size or default_chunk_size(lm_head.weight.shape[0], hidden.device)
    fused = isinstance(head, Tensor) and not softcap
    nll = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if fused:
            logps, is_argmax = ReplyTokenLogps.apply(h, t, head)
            chunk_nll, chunk_correct = -logps.sum(), is_argmax.sum()
        elif torch.is_grad_enabled() and h.requires_grad:
            # Recompute this chunk's logits in the backward pass instead of keeping them alive.
            chunk_nll, chunk_correct = checkpoint(_chunk_stats, h, t, head, softcap, use_reentrant=False)
        else:
            chunk_nll, chunk_correct = _chunk_stats(h, t, head, softcap)
        nll, correct = nll + chunk_nll, correct + chunk_correct
    return TokenStats(nll, predict.sum(), correct)


# --------------------------------------------------------------------------- trainer


class SFTTrainer(Trainer):
    """`transformers.Trainer` with a target-token NLL loss, token accuracy, tokens/s and perplexity.

    Gradient accumulation is exact: each micro-batch's NLL sum is divided by the number of target
    tokens in the whole accumulated batch (the Trainer's `num_items_in_batch`), not averaged per
    micro-batch.
    """

    def __init__(self, *args, chunked_loss: bool = True, paired_checkpointing: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunked_loss = chunked_loss
        self.paired_checkpointing = paired_checkpointing
        # We normalize by num_items_in_batch ourselves: have the Trainer count it and not rescale.
        self.model_accepts_loss_kwargs = True
        self._sums = {split: self._zero_sums() for split in ("train", "eval")}
        # tokens/s clock: runs from the first training step after a log to the next log, paused
        # during evaluation.
        self._window_start: float | None = None
        self._window_seconds = 0.0
        self.trained_tokens = 0
        self.training_seconds = 0.0

    @staticmethod
    def _zero_sums() -> dict[str, float]:
        return {"nll": 0.0, "targets": 0, "correct": 0, "tokens": 0}

    def _stats(self, model: torch.nn.Module, inputs: dict[str, Tensor]) -> TokenStats:
        return token_stats(
            model,
            inputs["input_ids"],
            inputs["labels"],
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            chunked=self.chunked_loss,
        )

    def _record(self, split: str, stats: TokenStats, n_tokens: Tensor) -> None:
        sums = self._sums[split]
        sums["nll"] += stats.nll.detach().item()
        sums["targets"] += int(stats.n_targets)
        sums["correct"] += int(stats.n_correct)
        sums["tokens"] += int(n_tokens.sum())

    def training_step(self, *args, **kwargs) -> Tensor:
        # checkpointed decoder layers in pairs (preftune.training.paired_checkpointing)
        with paired_checkpointing.for_training_step(
            self.model, self.paired_checkpointing, self.args.world_size
        ):
            return super().training_step(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._window_start is None:
            self._window_start = time.perf_counter()  # (re)start the tokens/s clock
        stats = self._stats(model, inputs)
        denominator = num_items_in_batch if num_items_in_batch is not None else stats.n_targets.clamp(min=1)
        loss = stats.nll / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's targets, and DDP averages gradients.
            loss = loss * self.accelerator.num_processes
        self._record("train", stats, inputs["n_tokens"])
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            stats = self._stats(model, inputs)
        self._record("eval", stats, inputs["n_tokens"])
        return (stats.nll / stats.n_targets.clamp(min=1)).detach(), None, None

    def _pause_clock(self) -> None:
        if self._window_start is not None:
            self._window_seconds += time.perf_counter() - self._window_start
            self._window_start = None

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        self._pause_clock()  # evaluation time is not training time
        return super().evaluate(*args, **kwargs)

    def _reduced_sums(self, split: str) -> dict[str, float]:
        """This split's sums since the last log, over every process; then reset."""
        sums = self._sums[split]
        values = torch.tensor(
            [sums["nll"], sums["targets"], sums["correct"], sums["tokens"]], dtype=torch.float64
        )
        values = self.accelerator.reduce(values.to(self.args.device), "sum").tolist()
        self._sums[split] = self._zero_sums()
        return dict(zip(("nll", "targets", "correct", "tokens"), values))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        sums = self._reduced_sums(split)
        if sums["targets"]:
            if split == "eval":
                logs["eval_token_accuracy"] = sums["correct"] / sums["targets"]
                logs["eval_perplexity"] = math.exp(min(sums["nll"] / sums["targets"], 50.0))
            else:
                logs["token_accuracy"] = sums["correct"] / sums["targets"]
        if split == "train":
            self._pause_clock()
            if sums["tokens"] and self._window_seconds > 0:
                logs["tokens_per_second"] = sums["tokens"] / self._window_seconds
            self.trained_tokens += int(sums["tokens"])
            self.training_seconds += self._window_seconds
            self._window_seconds = 0.0
        super().log(logs, start_time)


# --------------------------------------------------------------------------- recipe


@dataclass
class SFTResult:
    output_dir: str
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    n_train: int  # training rows (packed rows with --packing)
    n_eval: int
    n_train_examples: int
    trainer: SFTTrainer


def tokenized_sft_splits(
    data_args: DataArguments, sft_args: SFTArguments, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[list[dict], list[dict]]:
    """Load, normalize and tokenize the train and held-out examples."""
    if not data_args.dataset_name:
        raise ValueError("--dataset_name is required (a Hub name, a local file or a save_to_disk folder)")
    splits = [s.strip() for s in data_args.splits.split(",") if s.strip()]
    loaded = load_sft_splits(
        data_args.dataset_name,
        splits=splits,
        test_size=data_args.test_size,
        data_format=data_args.data_format,
        seed=seed,
        on_bad_rows=data_args.on_bad_rows,
    )
    limits = [data_args.max_train_samples, data_args.max_eval_samples]
    tokenized = []
    for split_name, limit in zip(splits[:2], limits):
        examples, _ = tokenize_sft_examples(
            loaded.get(split_name, [])[:limit],
            tokenizer,
            data_args.chat_template_format,
            max_length=data_args.max_seq_length,
            max_prompt_length=data_args.max_prompt_length,
            completion_only=sft_args.completion_only_loss,
            on_bad_rows=data_args.on_bad_rows,
            source=f"{data_args.dataset_name} [{split_name}]",
        )
        tokenized.append([e.as_feature() for e in examples])
    train, held_out = tokenized[0], (tokenized[1] if len(tokenized) > 1 else [])
    if not train:
        raise ValueError(f"{data_args.dataset_name}: no usable training examples in split {splits[0]!r}")
    return train, held_out


def build_sft_trainer(
    prepared: PreparedModels,
    sft_args: SFTArguments,
    training_args: TrainingArguments,
    train: list[dict],
    held_out: list[dict],
) -> SFTTrainer:
    return SFTTrainer(
        model=prepared.model,
        args=training_args,
        data_collator=SFTCollator(
            pad_token_id=prepared.tokenizer.pad_token_id, padding_free=sft_args.packing
        ),
        train_dataset=train,
        eval_dataset=held_out or None,
        processing_class=prepared.tokenizer,
        chunked_loss=sft_args.chunked_loss,
        paired_checkpointing=sft_args.paired_checkpointing,
    )


def run_sft(
    model_args: ModelArguments,
    data_args: DataArguments,
    sft_args: SFTArguments,
    training_args: TrainingArguments,
) -> SFTResult:
    """Supervised fine-tuning end to end; returns the final metrics."""
    set_seed(training_args.seed)
    resume = common.resume_path(training_args)
    prepared = prepare_models(
        model_args, gradient_checkpointing=training_args.gradient_checkpointing, with_reference=False
    )
    apply_template(prepared.tokenizer, data_args.chat_template_format)
    train, held_out = tokenized_sft_splits(data_args, sft_args, prepared.tokenizer, training_args.seed)
    n_examples = len(train)
    if sft_args.packing:
        train = pack_examples(train, data_args.max_seq_length)
        held_out = pack_examples(held_out, data_args.max_seq_length) if held_out else []
        logger.info(
            "packed %d training examples into %d rows of <= %d tokens",
            n_examples,
            len(train),
            data_args.max_seq_length,
        )
    logger.info("%d training rows, %d held-out rows", len(train), len(held_out))

    common.configure_training_args(training_args, model_args, has_eval=bool(held_out))
    distributed.no_unsupported_chunking(sft_args, "chunked_loss", prepared.model)
    trainer = build_sft_trainer(prepared, sft_args, training_args, train, held_out)
    if trainer.is_world_process_zero():
        common.save_run_config(
            training_args.output_dir, model=model_args, data=data_args, sft=sft_args, training=training_args
        )

    train_output = common.train(trainer, resume)
    train_metrics = dict(train_output.metrics)
    if trainer.training_seconds:
        train_metrics["train_tokens_per_second"] = trainer.trained_tokens / trainer.training_seconds
    eval_metrics = common.finish(trainer, prepared, has_eval=bool(held_out))
    return SFTResult(
        output_dir=training_args.output_dir,
        train_metrics=train_metrics,
        eval_metrics=eval_metrics,
        n_train=len(train),
        n_eval=len(held_out),
        n_train_examples=n_examples,
        trainer=trainer,
    )
