"""results.json, Markdown/HTML reports and plots. Reports read only results files."""

from retain.reporting.results import finalize, load_results
from retain.reporting.report import write_report
from retain.reporting.compare import compare_runs

__all__ = ["compare_runs", "finalize", "load_results", "write_report"]
