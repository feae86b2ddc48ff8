"""OpenTelemetry tracing, off by default: what the gateway needs from the SDK, in one place.

When ``tracing.enabled`` is false (the default) nothing here is built and no OpenTelemetry
module is imported: the tracing layer is not in the stack and the proxy checks one attribute
per upstream attempt. When it is on, ``open_tracing`` builds a tracer provider with an OTLP
exporter (the ``otel`` extra) that the gateway owns and shuts down (flushing spans) on exit;
an app that already has a provider passes it to ``Gateway(tracer_provider=...)`` instead.

Spans carry who asked, what it cost and why it waited, never what was said: no prompt or
completion text, no key (only the key's id).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any, Final

from tenantware.config import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Tracer, TracerProvider

__all__ = ["QUOTA_DECISION", "Tracing", "open_tracing"]

#: ``ctx.extra`` key: the quota layer's decision, ``(allowed, source, limit name or "")``.
QUOTA_DECISION: Final = "quota_decision"

_INSTRUMENTATION: Final = "tenantware"


class Tracing:
    """The tracer the gateway's spans come from and the propagator of ``traceparent``.

    ``on_shutdown``: given for a provider built here (from the configuration), which
    ``shutdown()`` flushes and stops; a provider passed in belongs to the app that made it.
    """

    def __init__(
        self, provider: TracerProvider, *, on_shutdown: Callable[[], object] | None = None
    ) -> None:
        from opentelemetry import propagate

        self.provider = provider
        self._on_shutdown = on_shutdown
        self.tracer: Tracer = provider.get_tracer(_INSTRUMENTATION)
        #: The process's propagator (W3C trace context and baggage unless
        #: ``OTEL_PROPAGATORS`` says otherwise).
        self.propagator = propagate.get_global_textmap()
        self._fields = frozenset(name.encode() for name in self.propagator.fields)

    def extract(self, headers: Iterable[tuple[bytes, bytes]]) -> Context:
        """The caller's trace context from the request headers (empty when it sent none)."""
        fields = self._fields
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in fields
        }
        return self.propagator.extract(carrier)

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Add the current span's ``traceparent`` (and ``tracestate``) to upstream headers."""
        self.propagator.inject(headers)

    def shutdown(self) -> None:
        """Flush and stop an owned provider's exporter (blocking: call it in a thread)."""
        if self._on_shutdown is not None:
            self._on_shutdown()


def open_tracing(settings: TracingSettings) -> Tracing | None:
    """A provider exporting over OTLP as ``settings`` say; ``None`` when tracing is off."""
    if not settings.enabled:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        raise RuntimeError(
            "tracing.enabled needs the OpenTelemetry SDK: pip install 'tenantware[otel]'"
        ) from None
    exporter: Any
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.endpoint)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        exporter = HttpExporter(endpoint=settings.endpoint)
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider, on_shutdown=provider.shutdown)
