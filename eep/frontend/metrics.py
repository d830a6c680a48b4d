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
            ("eep_requests", len(log.records), "requests accepted"),
            ("eep_requests_completed", log.completed, "requests finished"),
            ("eep_tokens", log.tokens, "tokens streamed"),
            ("eep_requeued", front.requeued, "requests moved off a dead slot"),
            ("eep_duplicate_tokens", log.duplicates, "tokens dropped as duplicates"),
            ("eep_stale_tokens", log.stale, "tokens dropped: from a rank taken off"),
            ("eep_stale_accepted", front.stale_accepted, "tokens accepted from excluded ranks"),
            ("eep_migrated", front.migrated, "requests moved with their KV"),
        ]:
            yield CounterMetricFamily(name, text, value=value)
        for name, value, text in [
            ("eep_requests_in_flight", len(log.in_flight()), "requests not finished"),
            ("eep_view_epoch", front.view.epoch if front.view else 0, "committed epoch"),
            ("eep_live_slots", len(front.live_slots()), "slots serving"),
        ]:
            yield GaugeMetricFamily(name, text, value=value)
        state = front.slots_state()["slots"]
        per_slot = [
            ("eep_slot_requests_in_flight", "in_flight", GaugeMetricFamily, "requests on it"),
            ("eep_slot_requeued", "requeued_from", CounterMetricFamily, "re-queued off it"),
            ("eep_slot_migrated", "migrated_to", CounterMetricFamily, "moved onto it with KV"),
            ("eep_slot_tokens", "tokens", CounterMetricFamily, "tokens it served"),
        ]
        for name, key, family, text in per_slot:
            metric = family(name, f"per slot: {text}", labels=["slot"])
            for slot, entry in state.items():
                metric.add_metric([slot], entry[key])
            yield metric
