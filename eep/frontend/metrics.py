"""The front-end's Prometheus metrics, read from its state at each scrape (a
``prometheus_client`` collector), so no counter is kept twice."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .core import Frontend


class FrontendCollector:
    def __init__(self, front: Frontend):
        self.front = front

    def collect(self):
        front, log = self.front, self.front.log
        for name, value, text in [
            ("eep_requests", log.accepted, "requests admitted"),
            ("eep_requests_completed", log.completed, "requests finished"),
            ("eep_requests_failed", log.failed, "admitted requests that failed"),
            ("eep_tokens", log.tokens, "tokens streamed"),
            ("eep_requeued", front.requeued, "requests moved off a dead slot"),
            ("eep_duplicate_tokens", log.duplicates, "tokens dropped as duplicates"),
            ("eep_stale_tokens", log.stale, "tokens dropped: from a rank taken off"),
            ("eep_late_tokens", log.late, "tokens dropped: their request had ended"),
            ("eep_stale_accepted", front.stale_accepted, "tokens accepted from excluded ranks"),
            ("eep_migrated", front.migrated, "requests moved with their KV"),
        ]:
            yield CounterMetricFamily(name, text, value=value)
        for name, counts, text in [
            ("eep_rejected", front.rejected, "requests answered 4xx at the door, by reason"),
            ("eep_aborted", front.aborted, "admitted requests ended early, by reason"),
        ]:
            family = CounterMetricFamily(name, text, labels=["reason"])
            for reason, value in counts.items():
                family.add_metric([reason], value)
            yield family
        state = front.slots_state()
        for name, value, text in [
            ("eep_requests_in_flight", len(log.in_flight()), "requests not finished"),
            ("eep_requests_queued", state["queued"], "requests waiting for a slot"),
            ("eep_records", state["records"], "requests held in the log (not yet answered)"),
            ("eep_max_context", front.max_context, "prompt + max_tokens of one request, at most"),
            ("eep_view_epoch", front.view.epoch if front.view else 0, "committed epoch"),
            ("eep_live_slots", len(front.live_slots()), "slots serving"),
        ]:
            yield GaugeMetricFamily(name, text, value=value)
        per_slot = [
            ("eep_slot_requests_in_flight", "in_flight", GaugeMetricFamily, "requests on it"),
            ("eep_slot_requeued", "requeued_from", CounterMetricFamily, "re-queued off it"),
            ("eep_slot_migrated", "migrated_to", CounterMetricFamily, "moved onto it with KV"),
            ("eep_slot_tokens", "tokens", CounterMetricFamily, "tokens it served"),
        ]
        for name, key, family, text in per_slot:
            metric = family(name, f"per slot: {text}", labels=["slot"])
            for slot, entry in state["slots"].items():
                metric.add_metric([slot], entry[key])
            yield metric
