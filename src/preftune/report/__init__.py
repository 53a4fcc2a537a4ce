"""Run reports: training curves, held-out evaluation and samples in one self-contained HTML file."""

from preftune.report.html import REPORT_DIR, REPORT_FILE, read_trainer_state, report_run, write_report

__all__ = ["REPORT_DIR", "REPORT_FILE", "read_trainer_state", "report_run", "write_report"]
