"""Migration without fear: canary splits, shadow traffic, their comparison and rollback.

Decisions only (this package does no I/O): which target a request goes to (``rules``), the
candidates' health against the primary's and when to roll one back (``rollback``), how two
answers compare (``compare``) and the report over the comparisons (``book``). The proxy acts
on them (``proxy/shadow.py`` sends the shadow copies).
"""

from tenantware.migration.book import (
    Comparison,
    ComparisonBook,
    ReportRow,
    percentile,
    report_csv,
)
from tenantware.migration.compare import Answer, agreement, answer_of
from tenantware.migration.rollback import Rollbacks
from tenantware.migration.rules import Plan, RuleTable, Trial

__all__ = [
    "Answer",
    "Comparison",
    "ComparisonBook",
    "Plan",
    "ReportRow",
    "Rollbacks",
    "RuleTable",
    "Trial",
    "agreement",
    "answer_of",
    "percentile",
    "report_csv",
]
