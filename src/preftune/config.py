"""Every knob of `preftune dpo`, as dataclasses. Each field is a command-line flag of the same name
(and a key of a YAML/JSON config file); `transformers.TrainingArguments` adds the Trainer's flags.

Flag names follow the seed recipe's run_dpo.sh (--use_peft_lora, --use_4bit_quantization, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAIRED_CHECKPOINTING_HELP = (
    "With gradient checkpointing: every second decoder layer keeps no input for the "
    "backward pass and recomputes it from the layer before's (exact; half the layer inputs "
    "held, one more layer forward per pair of layers; one process only); false: every layer keeps "
    "its input."
)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub name or local folder of a causal LM, or of a PEFT LoRA adapter (an SFT result). "
            "Default: the embedded SmolLM2-135M-Instruct."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the Hub repo (off: safer)."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the non-quantized weights: auto, float32, bfloat16, float16."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa, eager or flash_attention_2 (default: transformers' choice)."}
    )
    use_flash_attn: bool = field(
        default=False, metadata={"help": "Shortcut for --attn_implementation flash_attention_2."}
    )
    use_peft_lora: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter instead of all weights."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Comma-separated module names (q_proj,k_proj,...) or all-linear."},
    )
    use_4bit_quantization: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4 bits."})
    use_8bit_quantization: bool = field(
        default=False, metadata={"help": "Load the base in 8 bits (LLM.int8)."}
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4."})
    use_nested_quant: bool = field(
        default=False, metadata={"help": "Quantize the 4-bit quantization constants too."}
    )
    bnb_4bit_compute_dtype: str = field(
        default="float32", metadata={"help": "dtype of 4-bit matmuls: float32, bfloat16, float16."}
    )
    bnb_4bit_quant_storage_dtype: str | None = field(
        default=None, metadata={"help": "Storage dtype of 4-bit weights (set to the compute dtype for FSDP)."}
    )
    use_reentrant: bool = field(default=False, metadata={"help": "Reentrant gradient checkpointing."})
    low_cpu_memory: bool = field(
        default=False,
        metadata={
            "help": "CPU runs: give every freed tensor's memory back to the system at once (slower: "
            "each new tensor's pages are faulted in again); false: reuse freed memory from a heap "
            "kept unfragmented (see preftune/memory.py)."
        },
    )
    merge_and_unload: bool = field(
        default=False,
        metadata={
            "help": "When the model is a LoRA adapter: merge it into the base first, then train a new LoRA."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub data set name, a local file (.json/.jsonl/.jsonl.gz/.parquet/.csv) or a save_to_disk folder."
        },
    )
    splits: str = field(
        default="train,test",
        metadata={"help": "Comma-separated splits: the first trains, the second evaluates."},
    )
    test_size: float | None = field(
        default=None,
        metadata={"help": "Carve a held-out split from train: a fraction (<1) or a number of pairs."},
    )
    data_format: str = field(
        default="auto", metadata={"help": "auto, conversational, explicit, sharegpt or hh."}
    )
    chat_template_format: str = field(
        default="tokenizer", metadata={"help": "tokenizer, chatml, zephyr or none."}
    )
    max_seq_length: int = field(
        default=512, metadata={"help": "Longest prompt + reply in tokens.", "aliases": ["--max_length"]}
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Prompts are cut from the left to this many tokens (default: half of --max_seq_length)."
        },
    )
    on_bad_rows: str = field(
        default="error", metadata={"help": "error: stop at bad rows; skip: drop them and report."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training pairs."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many held-out pairs."}
    )

    def __post_init__(self) -> None:
        if self.max_prompt_length is None:
            self.max_prompt_length = self.max_seq_length // 2
        if self.max_prompt_length >= self.max_seq_length:
            raise ValueError(
                f"--max_prompt_length ({self.max_prompt_length}) must be smaller than --max_seq_length "
                f"({self.max_seq_length}): the rest is the room for the reply"
            )


@dataclass
class PreferenceArguments:
    beta: float = field(
        default=0.1, metadata={"help": "Strength of the pull towards the reference (IPO: tau)."}
    )
    loss_type: str = field(
        default="sigmoid", metadata={"help": "sigmoid (DPO), ipo, hinge, kto_pair or robust."}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "robust (cDPO): probability that a label is flipped."}
    )
    rpo_alpha: float = field(
        default=0.0,
        metadata={"help": "Weight of an NLL term on the chosen replies (RPO); 0 turns it off."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Turn every dropout of the policy off (LoRA's too), as TRL does: with dropout the "
            "policy's log-probs are noisy and the rewards start away from 0; false keeps them."
        },
    )
    chunked_logps: bool = field(
        default=True,
        metadata={
            "help": "Compute log-probs from hidden states in chunks (lean memory); false: full logits."
        },
    )
    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "Run each pair's prompt once for both replies (one [prompt|chosen|rejected] segment per "
            "pair, short pairs packed together, a custom attention mask; needs sdpa or eager attention, "
            "else padded rows are used); false: two padded rows per pair."
        },
    )
    pair_attention: bool = field(
        default=True,
        metadata={
            "help": "With --share_prompt and sdpa attention: attend pair by pair (prompt+chosen causal, "
            "rejected over prompt+itself) instead of one masked pass over the whole row, skipping the "
            "masked blocks, and pack each batch into one row; false: the masked pass."
        },
    )
    fused_lora: bool = field(
        default=True,
        metadata={
            "help": "LoRA layers over plain linear weights: fold the scaling into B, add the low-rank "
            "product into the base output in place and cast each input to the autocast dtype once; "
            "false: PEFT's own forward."
        },
    )
    paired_checkpointing: bool = field(default=True, metadata={"help": PAIRED_CHECKPOINTING_HELP})
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference log-probs once before training instead of every step."},
    )
    cache_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "With --precompute_ref_log_probs: keep them on disk ($PREFTUNE_CACHE/reference-logps, "
            "keyed by the token ids, the reference weights and the precision) and reuse them in later runs "
            "(not under FSDP or DeepSpeed)."
        },
    )


@dataclass
class SFTArguments:
    """Knobs of `preftune sft` beyond the model, data and Trainer flags."""

    completion_only_loss: bool = field(
        default=True,
        metadata={
            "help": "Train on the assistant replies only; false: on every token (prompts and templates too)."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack short examples into rows of --max_seq_length tokens (attention never crosses "
            "examples: position ids restart at each one)."
        },
    )
    chunked_loss: bool = field(
        default=True,
        metadata={
            "help": "Apply the LM head to loss tokens only, in chunks (lean memory); false: full logits."
        },
    )
    paired_checkpointing: bool = field(default=True, metadata={"help": PAIRED_CHECKPOINTING_HELP})
