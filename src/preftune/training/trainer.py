"""PreferenceTrainer: `transformers.Trainer` with a preference loss.

The Trainer keeps doing what it does well (optimizers, schedulers, gradient accumulation, mixed
precision, checkpoints and resume, logging integrations, distributed launch). We replace only the
loss: policy log-probs of chosen and rejected replies in one concatenated forward, reference
log-probs under no_grad, one of the preference losses, and the reward metrics logged beside it.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer

from preftune.config import PreferenceArguments
from preftune.losses import preference_loss
from preftune.memory import release_free_heap
from preftune.models.prepare import POLICY_ADAPTER, REFERENCE_ADAPTER
from preftune.training import pair_attention, paired_checkpointing, reference_cache
from preftune.training.batching import REF_KEYS
from preftune.training.logprobs import SequenceLogps, batch_logps, unwrap_causal_lm

Tensor = torch.Tensor
logger = logging.getLogger("preftune")

HEAP_RELEASE_EVERY_LAYERS = 5  # on a CPU (see PreferenceTrainer._release_cpu_heap_between_layers)


class PreferenceTrainer(Trainer):
    """Trains the policy on preference pairs; the reference is computed as `reference_mode` says.

    reference_mode:
      - "adapter_disabled": the policy is base + LoRA; the reference is the base (adapter off).
      - "reference_adapter": the policy is the `default` adapter; the reference is the frozen
        `reference` adapter on the same base model.
      - "model_copy": a separate frozen model (full fine-tuning).
    """

    def __init__(
        self,
        *args,
        preference_args: PreferenceArguments,
        reference_mode: str,
        reference_model: torch.nn.Module | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        # Our loss is already a mean over pairs: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.pref = preference_args
        self.reference_mode = reference_mode
        self.reference_model = reference_model
        self._reference_weights: str | None = None  # fingerprint, for the reference log-prob cache
        if reference_model is not None:
            self.reference_model = reference_model.to(self.args.device)
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    # ---- log-probs --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _pair_attention(self) -> Iterator[None]:
        """Shared-prompt rows attended pair by pair (preftune.training.pair_attention) for the
        duration of a step, its backward (and activation recomputation) included."""
        if not self.pref.pair_attention:
            yield
            return
        configs = [unwrap_causal_lm(self.model).config]
        if self.reference_model is not None:
            configs.append(unwrap_causal_lm(self.reference_model).config)
        with contextlib.ExitStack() as stack:
            for config in configs:
                stack.enter_context(pair_attention.enabled(config))
            yield

    def _release_cpu_heap(self) -> None:
        """On a CPU, hand the heap's free pages back (preftune.memory.release_free_heap): at the
        start of a step, after the reference pass and before the backward pass, so the blocks a
        phase freed do not stay resident through the next one."""
        if self.args.device.type == "cpu":
            release_free_heap()

    @contextlib.contextmanager
    def _release_cpu_heap_between_layers(self) -> Iterator[None]:
        """On a CPU, also hand the heap's free pages back after every HEAP_RELEASE_EVERY_LAYERS-th
        decoder layer in the forward passes and before it in the backward pass, for the duration
        of a training step (not in generation, where it would cost more than a token's compute).

        Within a pass the layers' activations free blocks of other sizes than the next layer asks
        for, so the resident heap creeps up through the pass: about 100 MiB over a bf16 policy
        forward of the embedded model. bf16, 4 steps, five runs each: peak RSS 1005-1018 MiB
        (mean 1012) against 1019-1041 (mean 1031), for ~3 ms per release, ~1% of a step."""
        if self.args.device.type != "cpu":
            yield
            return
        decoder = unwrap_causal_lm(self.model).get_decoder()
        layers = list(getattr(decoder, "layers", []))[
            HEAP_RELEASE_EVERY_LAYERS - 1 :: HEAP_RELEASE_EVERY_LAYERS
        ]

        def release_before_backward(grad: Tensor) -> None:
            release_free_heap()

        def after_layer(module, inputs, output) -> None:
            release_free_heap()
            hidden = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, Tensor) and hidden.requires_grad:
                hidden.register_hook(release_before_backward)

        handles = [layer.register_forward_hook(after_layer) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def training_step(self, *args, **kwargs) -> Tensor:
        self._release_cpu_heap()
        paired = paired_checkpointing.for_training_step(
            self.model, self.pref.paired_checkpointing, self.args.world_size
        )
        with self._pair_attention(), self._release_cpu_heap_between_layers(), paired:
            return super().training_step(*args, **kwargs)

    def _sequence_logps(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> SequenceLogps:
        return batch_logps(model, batch, chunked=self.pref.chunked_logps)

    def _split_pairs(self, out: SequenceLogps) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) halves of the 2B rows, in the form the loss is defined on."""
        # IPO is defined on per-token average log-probs (Azar et al. 2023); the others on sums.
        logps = out.mean_per_token() if self.pref.loss_type == "ipo" else out.logps
        n_pairs = logps.shape[0] // 2
        return logps[:n_pairs], logps[n_pairs:]

    def _logps(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) log-probs of one model over the 2B concatenated rows."""
        return self._split_pairs(self._sequence_logps(model, batch))

    @contextlib.contextmanager
    def _as_reference(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily turn the policy into its reference (eval mode: no dropout), then back."""
        if self.reference_mode == "model_copy":
            yield self.reference_model
            return
        peft_model = self.accelerator.unwrap_model(model)
        was_training = peft_model.training
        # PEFT's adapter switches flip requires_grad. What is trainable stays as it was, inside too:
        # FSDP2 settles which gradients it reduces (and in what dtype) at its first forward, which
        # may be this no-grad reference pass.
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        peft_model.eval()
        try:
            if self.reference_mode == "adapter_disabled":
                switch = peft_model.disable_adapter()
            elif self.reference_mode == "reference_adapter":
                switch = _active_adapter(peft_model, REFERENCE_ADAPTER)
            else:
                raise ValueError(f"unknown reference mode {self.reference_mode!r}")
            with switch:
                _set_trainable(peft_model, trainable)
                yield peft_model
        finally:
            _set_trainable(peft_model, trainable)
            peft_model.train(was_training)

    def reference_logps(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if all(k in batch for k in REF_KEYS):
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad(), self._as_reference(model) as reference:
            return self._logps(reference, batch)

    def precompute_reference_logps(
        self, dataset: list[dict], desc: str = "reference log-probs", use_cache: bool = True
    ) -> None:
        """One no-grad pass over `dataset`, storing the reference log-probs in each pair.

        Under several processes each one scores its shard and the results are gathered, so the
        pass is done once in total, not once per process. With `use_cache`, the results are kept
        on disk (preftune.training.reference_cache) and a later run with the same pairs, reference
        and settings reads them instead of computing them.
        """
        path = self._reference_cache_path(dataset) if use_cache else None
        cached = reference_cache.load(path, len(dataset)) if path else None
        hit = cached is not None
        if path is not None and self.accelerator.num_processes > 1:
            # every process must take the same branch: the pass below gathers across processes
            flag = torch.tensor(float(hit), device=self.args.device)
            hit = self.accelerator.reduce(flag, "min").item() == 1.0
        if hit:
            for pair, c, r in zip(dataset, *cached):
                pair["ref_chosen_logps"], pair["ref_rejected_logps"] = c, r
            logger.info("%s: read from %s", desc, path)
            return
        batch_size = self.args.per_device_eval_batch_size
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        loader = self.accelerator.prepare_data_loader(loader)  # shards across processes, in order
        position = 0
        # A DataLoader draws from the global RNG: fork it, so precomputing does not change the
        # shuffling and dropout of the training run that follows.
        with torch.random.fork_rng(devices=[]), self._pair_attention():
            for batch in tqdm(loader, desc=desc, disable=not self.is_world_process_zero()):
                batch = self._prepare_inputs({k: v for k, v in batch.items() if k not in REF_KEYS})
                chosen, rejected = self.accelerator.gather_for_metrics(
                    self.reference_logps(self.model, batch)
                )
                for c, r in zip(chosen.tolist(), rejected.tolist()):
                    dataset[position]["ref_chosen_logps"] = c
                    dataset[position]["ref_rejected_logps"] = r
                    position += 1
        if position != len(dataset):
            raise RuntimeError(f"reference precompute scored {position} of {len(dataset)} pairs")
        if path is not None and self.is_world_process_zero():
            reference_cache.save(
                path, [p["ref_chosen_logps"] for p in dataset], [p["ref_rejected_logps"] for p in dataset]
            )

    def _reference_cache_path(self, dataset: list[dict]):
        """The on-disk cache file for these pairs, this reference and these compute settings."""
        if self._reference_weights is None:
            reference = self.reference_model if self.reference_mode == "model_copy" else self.model
            self._reference_weights = reference_cache.reference_weights_fingerprint(
                reference, self.reference_mode
            )
        causal_lm = unwrap_causal_lm(self.model)
        compute = {
            "autocast": "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "none",
            "attention": causal_lm.config._attn_implementation,
            "per_token_mean": self.pref.loss_type == "ipo",  # what _split_pairs returns for IPO
        }
        return reference_cache.cache_path(self._reference_weights, dataset, compute)

    # ---- loss and metrics -------------------------------------------------------------------

    def _pair_loss(self, model: torch.nn.Module, batch: dict[str, Tensor], split: str) -> Tensor:
        ref_chosen, ref_rejected = self.reference_logps(model, batch)
        if split == "train":
            self._release_cpu_heap()
        policy = self._sequence_logps(model, batch)
        policy_chosen, policy_rejected = self._split_pairs(policy)
        out = preference_loss(
            self.pref.loss_type,
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            beta=self.pref.beta,
            label_smoothing=self.pref.label_smoothing,
        )
        loss = out.losses.mean()
        if self.pref.rpo_alpha:
            # RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 2): add the
            # per-token NLL of the chosen replies, so the chosen reply (and its end-of-turn token)
            # stays likely while the margin grows; plain DPO may lower both and derail generation.
            n_pairs = policy.logps.shape[0] // 2
            nll = -(policy.logps[:n_pairs].sum() / policy.n_tokens[:n_pairs].sum().clamp(min=1))
            loss = loss + self.pref.rpo_alpha * nll
        margins = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "rewards/margins": margins.mean(),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
        }
        if self.pref.rpo_alpha:
            metrics["nll_loss"] = nll
        for name, value in metrics.items():
            # mean over processes, so every rank logs the same numbers
            self._metrics[split][name].append(self.accelerator.reduce(value.detach(), "mean").item())
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self._pair_loss(model, inputs, "train")
        self._release_cpu_heap()
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self._pair_attention():
            loss = self._pair_loss(model, inputs, "eval")
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for name, values in self._metrics[split].items():
            logs[prefix + name] = sum(values) / len(values)
        self._metrics[split].clear()
        super().log(logs, start_time)


@contextlib.contextmanager
def _active_adapter(peft_model: torch.nn.Module, name: str) -> Iterator[None]:
    peft_model.set_adapter(name)
    try:
        yield
    finally:
        peft_model.set_adapter(POLICY_ADAPTER)


def _set_trainable(model: torch.nn.Module, names: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
