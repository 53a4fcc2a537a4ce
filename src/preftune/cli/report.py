"""`preftune report RUN_DIR`: (re)write the run report, RUN_DIR/report/report.html (self-contained: its
figures are embedded) plus the PNGs beside it: training and eval curves from trainer_state.json, and,
after `preftune eval`, the held-out pair metrics, reward-margin histograms, the judges' win rates and
sample generations from eval_results.json. Open the HTML file in any browser.
"""

from __future__ import annotations

import argparse

from rich.console import Console


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("run_dir", help="a preftune run folder")
    parser.add_argument(
        "--screenshot", default=None, metavar="PNG", help="also save a headless-Chromium screenshot"
    )
    return parser


def main(argv: list[str]) -> int:
    from preftune.report import write_report

    args = build_parser().parse_args(argv)
    console = Console()
    path = write_report(args.run_dir)
    console.print(f"report: [bold]{path}[/bold] (open it in a browser; figures are embedded)")
    console.print(f"figures: {', '.join(sorted(p.name for p in path.parent.glob('*.png')))}")
    if args.screenshot:
        from preftune.report.browser import screenshot

        console.print(f"screenshot: {screenshot(path, args.screenshot)}")
    return 0
