"""Which target serves a request, and which candidates get a shadow copy of it.

The canary is sticky: a request's key (the client's session header, else its tenant) hashed
with the rule's name gives a point in [0, 10000); each candidate owns a range of
``canary_percent * 100`` points, so the same key always lands on the same target while the
shares stay put, and raising a share only moves keys from the primary to the candidate.
Shadow copies are drawn at random per request (a share of requests, not of sessions).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from tenantware.config import MigrationCandidate, MigrationRule, MigrationSettings

__all__ = ["POINTS", "Plan", "RuleTable", "Trial", "sticky_point"]

#: Resolution of the canary split: shares are honoured to 0.01 %.
POINTS = 10_000


class Trial:
    """One candidate of one rule: the upstream and the catalogue model it serves."""

    __slots__ = ("candidate", "key", "model", "rule", "upstream")

    def __init__(self, rule: MigrationRule, candidate: MigrationCandidate) -> None:
        self.rule = rule
        self.candidate = candidate
        self.upstream = candidate.upstream
        self.model = candidate.model or rule.model
        #: ``rule/upstream/model``: its rollback window, report rows and shadow limiter.
        self.key = f"{rule.name}/{self.upstream}/{self.model}"

    def __repr__(self) -> str:
        return f"Trial({self.key!r})"


class Plan:
    """What one request does: the canary trial serving it (``None``: the primary), the
    primary upstream asked for, and the trials that get a shadow copy."""

    __slots__ = ("canary", "primary", "rule", "shadows")

    def __init__(
        self,
        rule: MigrationRule,
        canary: Trial | None,
        primary: str | None,
        shadows: tuple[Trial, ...],
    ) -> None:
        self.rule = rule
        self.canary = canary
        self.primary = primary
        self.shadows = shadows


def sticky_point(rule: str, key: str) -> int:
    """The key's point in [0, POINTS) for this rule (a stable hash: every process agrees)."""
    digest = hashlib.blake2b(f"{rule}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % POINTS


class _Compiled:
    __slots__ = ("allow_residency", "ranges", "rule", "shadowing", "tenants", "tiers")

    def __init__(self, rule: MigrationRule) -> None:
        self.rule = rule
        self.allow_residency = frozenset(rule.allow_residency)
        self.tenants = frozenset(rule.tenants)
        self.tiers = frozenset(rule.tiers)
        trials = [Trial(rule, c) for c in rule.candidates]
        edge = 0.0
        #: (end point, trial): a key below ``end`` (and past the previous end) is canaried.
        self.ranges: list[tuple[float, Trial]] = []
        for trial in trials:
            if trial.candidate.canary_percent > 0:
                edge += trial.candidate.canary_percent * POINTS / 100
                self.ranges.append((edge, trial))
        self.shadowing = [
            (t.candidate.shadow_percent / 100, t) for t in trials if t.candidate.shadow_percent > 0
        ]


class RuleTable:
    """The rules of one configuration, compiled once; ``plan(...)`` per request."""

    def __init__(self, settings: MigrationSettings, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.rng = rng or random.Random()
        self.no_shadow = frozenset(settings.no_shadow_tenants)
        self._by_model: dict[str, list[_Compiled]] = {}
        for rule in settings.rules:
            self._by_model.setdefault(rule.model, []).append(_Compiled(rule))
        #: Every trial by key (the rollback and the report name them so).
        self.trials = {
            trial.key: trial
            for compiled in self._by_model.values()
            for entry in compiled
            for trial in [t for _e, t in entry.ranges] + [t for _s, t in entry.shadowing]
        }

    def __bool__(self) -> bool:
        return bool(self._by_model)

    def plan(
        self,
        model: str,
        tenant: str,
        tier: str,
        session: str | None,
        rolled_back: Callable[[Trial], bool],
        *,
        residency: str | None = None,
    ) -> Plan | None:
        """The plan of a request for ``model`` (``None``: no rule applies). The first rule of
        the model that names this tenant (or its tier, or nobody) applies; a tenant with a
        data-residency label the rule does not allow is left out of it (``None``)."""
        for compiled in self._by_model.get(model, ()):
            rule = compiled.rule
            if compiled.tenants and tenant not in compiled.tenants:
                continue
            if compiled.tiers and tier not in compiled.tiers:
                continue
            if tenant in rule.exclude_tenants:
                return None
            if residency is not None and residency not in compiled.allow_residency:
                return None
            canary = None
            if compiled.ranges:
                point = sticky_point(rule.name, session or "tenant:" + tenant)
                for end, trial in compiled.ranges:
                    if point < end:
                        if not rolled_back(trial):
                            canary = trial
                        break
            shadows: tuple[Trial, ...] = ()
            if compiled.shadowing and tenant not in self.no_shadow:
                draw = self.rng.random
                shadows = tuple(
                    trial
                    for share, trial in compiled.shadowing
                    if trial is not canary and draw() < share and not rolled_back(trial)
                )
            return Plan(rule, canary, rule.primary, shadows)
        return None
