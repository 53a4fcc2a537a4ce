"""`preftune merge --model RUN_DIR --output OUT`: merge a LoRA adapter into its base model and save
a standalone model (safetensors, tokenizer, chat template, generation config).

A QLoRA adapter is merged into the base loaded UNquantized (in --dtype), never into 4-bit weights.
"""

from __future__ import annotations

import argparse

from rich.console import Console


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the adapter: a run folder or a Hub repo")
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="dtype to load the base, merge and save in (auto: the base's own)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def main(argv: list[str]) -> int:
    from preftune.models.merge import merge_adapter

    args = build_parser().parse_args(argv)
    result = merge_adapter(args.model, args.output, args.dtype, args.trust_remote_code, args.overwrite)
    console = Console()
    if result.trained_quantized:
        console.print("QLoRA adapter: merged into the base loaded unquantized, in full precision.")
    console.print(
        f"merged model ({result.dtype}) saved in [bold]{result.output_dir}[/bold]; "
        f"largest log-prob difference to base + adapter on a probe: {result.max_logprob_diff:.2e}"
    )
    return 0
