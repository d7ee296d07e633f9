//! Every metric the node exports, in one place (Prometheus text format at `/metrics`).
//!
//! Labels come only from fixed sets — event kinds, statuses, results, route templates, RPC
//! names — never from a user-supplied string such as a service id or a tenant name.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::event::EventKind;
use crate::proto::Event;
use crate::state::Status;

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Events appended to the log, by kind.
    pub events_appended: IntCounterVec,
    /// Events per committed batch (group commit at work).
    pub append_batch_size: Histogram,
    /// Time of one durable commit.
    pub commit_duration: Histogram,
    /// Seq of the last committed event.
    pub log_head_seq: IntGauge,
    /// 1 once the check at start found the history before the snapshot damaged.
    pub log_history_damaged: IntGauge,
    /// Services by status (set at each scrape from the state).
    pub services: IntGaugeVec,
    /// Observations the log could not take yet, waiting for a retry (set at each scrape).
    pub unrecorded_observations: IntGauge,
    /// Counted bytes of request bodies in flight (set at each scrape).
    pub body_bytes_in_flight: IntGauge,
    /// Deploys by result: created, upgraded, unchanged, replayed, refused.
    pub deploys: IntCounterVec,
    /// Calls by result: ok, service_error, trapped, timeout, busy, not_running, refused.
    pub calls: IntCounterVec,
    /// Time of one call, queueing included.
    pub call_duration: Histogram,
    /// Fresh instances that replaced crashed ones.
    pub instance_restarts: IntCounter,
    /// Open Watch and SSE streams, by protocol (grpc, sse).
    pub watchers: IntGaugeVec,
    /// Requests refused by load shedding, by scope (tenant, node, watchers, and body_bytes for
    /// bodies in flight).
    pub shed: IntCounterVec,
    /// HTTP requests by route template and status code.
    pub http_requests: IntCounterVec,
    /// gRPC requests by method and status code.
    pub grpc_requests: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
            registry.register(Box::new(metric.clone())).expect("registered once");
            metric
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("a valid metric");
            registry.register(Box::new(metric.clone())).expect("registered once");
            metric
        };
        let events_appended = counter_vec(
            "solo_events_appended_total",
            "Events appended to the log, by kind.",
            &["kind"],
        );
        let append_batch_size = histogram(
            "solo_append_batch_size",
            "Events per committed batch.",
            vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0],
        );
        let commit_duration = histogram(
            "solo_commit_duration_seconds",
            "Time of one durable commit.",
            LATENCY_BUCKETS.to_vec(),
        );
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("a valid metric");
            registry.register(Box::new(metric.clone())).expect("registered once");
            metric
        };
        let log_head_seq = gauge("solo_log_head_seq", "Seq of the last committed event.");
        let log_history_damaged = gauge(
            "solo_log_history_damaged",
            "1 if the check at start found a record before the snapshot damaged or missing.",
        );
        let services =
            IntGaugeVec::new(Opts::new("solo_services", "Services by status."), &["status"]).expect("a valid metric");
        registry.register(Box::new(services.clone())).expect("registered once");
        let unrecorded_observations = gauge(
            "solo_unrecorded_observations",
            "Observations (crashes, restarts) the log could not take yet, waiting for a retry.",
        );
        let body_bytes_in_flight = gauge(
            "solo_body_bytes_in_flight",
            "Bytes of request bodies in flight, past each body's free share, against [solo] max_in_flight_body_bytes.",
        );
        let deploys = counter_vec("solo_deploys_total", "Deploys by result.", &["result"]);
        let calls = counter_vec("solo_calls_total", "Calls by result.", &["result"]);
        let call_duration = histogram(
            "solo_call_duration_seconds",
            "Time of one call, queueing included.",
            LATENCY_BUCKETS.to_vec(),
        );
        let instance_restarts = IntCounter::new(
            "solo_instance_restarts_total",
            "Fresh instances that replaced crashed ones.",
        )
        .expect("valid");
        registry
            .register(Box::new(instance_restarts.clone()))
            .expect("registered once");
        let watchers = IntGaugeVec::new(
            Opts::new(
                "solo_watchers",
                "Open Watch, SSE and log-follow streams: what max_watchers bounds.",
            ),
            &["protocol"],
        )
        .expect("a valid metric");
        registry.register(Box::new(watchers.clone())).expect("registered once");
        let shed = counter_vec(
            "solo_shed_total",
            "Requests refused by load shedding, by scope.",
            &["scope"],
        );
        let http_requests = counter_vec(
            "solo_http_requests_total",
            "HTTP requests by route and status code.",
            &["route", "code"],
        );
        let grpc_requests = counter_vec(
            "solo_grpc_requests_total",
            "gRPC requests by method and status code.",
            &["method", "code"],
        );
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("registered once");
        let metrics = Metrics {
            registry,
            events_appended,
            append_batch_size,
            commit_duration,
            log_head_seq,
            log_history_damaged,
            services,
            unrecorded_observations,
            body_bytes_in_flight,
            deploys,
            calls,
            call_duration,
            instance_restarts,
            watchers,
            shed,
            http_requests,
            grpc_requests,
        };
        // Every label value exists from the start, so rates work from the first scrape.
        for kind in EventKind::ALL {
            metrics.events_appended.with_label_values(&[kind.as_str()]);
        }
        for status in Status::ALL {
            metrics.services.with_label_values(&[status.as_str()]);
        }
        for protocol in ["grpc", "sse"] {
            metrics.watchers.with_label_values(&[protocol]);
        }
        for scope in ["tenant", "node", "watchers", "body_bytes"] {
            metrics.shed.with_label_values(&[scope]);
        }
        for result in ["created", "upgraded", "unchanged", "replayed", "refused"] {
            metrics.deploys.with_label_values(&[result]);
        }
        for result in [
            "ok",
            "service_error",
            "trapped",
            "timeout",
            "busy",
            "not_running",
            "refused",
        ] {
            metrics.calls.with_label_values(&[result]);
        }
        Arc::new(metrics)
    }

    /// Records one committed batch.
    pub fn committed(&self, events: &[Arc<Event>], took: Duration) {
        self.append_batch_size.observe(events.len() as f64);
        self.commit_duration.observe(took.as_secs_f64());
        for event in events {
            if let Some(kind) = EventKind::of_event(event) {
                self.events_appended.with_label_values(&[kind.as_str()]).inc();
                if kind == EventKind::ServiceRestarted {
                    self.instance_restarts.inc();
                }
            }
        }
        if let Some(last) = events.last() {
            self.log_head_seq.set(last.seq as i64);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
