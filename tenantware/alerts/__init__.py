"""Alerts: rules over the gateway's own data, judged on a timer, delivered to webhooks.

The engine (``AlertEngine``) counts usage records off the request path, judges the rules
once per interval (on Redis, one replica at a time under a lease), keeps each alert firing
once while its condition holds and sends a signed message when it fires and when it clears.
``export_rules`` writes the same rules for Prometheus.
"""

from tenantware.alerts.engine import AlertEngine
from tenantware.alerts.memory import MemoryAlertStore
from tenantware.alerts.model import Alert, AlertEvent, Finding
from tenantware.alerts.payload import PAYLOAD_VERSION, Payload
from tenantware.alerts.probes import Probe, ProbeInput
from tenantware.alerts.prometheus import export_rules
from tenantware.alerts.rules import DEFAULT_ALERT_RULES, rules_in_force
from tenantware.alerts.signing import SIGNATURE_HEADER, sign, verify_signature
from tenantware.alerts.store import AlertStore

__all__ = [
    "DEFAULT_ALERT_RULES",
    "PAYLOAD_VERSION",
    "SIGNATURE_HEADER",
    "Alert",
    "AlertEngine",
    "AlertEvent",
    "AlertStore",
    "Finding",
    "MemoryAlertStore",
    "Payload",
    "Probe",
    "ProbeInput",
    "export_rules",
    "rules_in_force",
    "sign",
    "verify_signature",
]
