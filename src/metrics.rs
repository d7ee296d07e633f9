//! Every metric the node exports, in one place (Prometheus text format at `/metrics`).
//!
//! Labels come only from fixed sets — event kinds, statuses, results, route templates, RPC
//! names — never from a user-supplied string such as a service id or a tenant name.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
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
    /// Deploys refused by a quota, by the quota: which limits tenants run into.
    pub quota_refusals: IntCounterVec,
    /// Calls by result: ok, service_error, trapped, timeout, busy, not_running, refused.
    pub calls: IntCounterVec,
    /// Time of one call, queueing included.
    pub call_duration: Histogram,
    /// Fresh instances that replaced crashed ones.
    pub instance_restarts: IntCounter,
    /// WebAssembly instances alive, those an upgrade replaced that are finishing their calls
    /// included (set at each scrape).
    pub instances: IntGauge,
    /// Open Watch and SSE streams, by protocol (grpc, sse).
    pub watchers: IntGaugeVec,
    /// Seconds that reads waited for their tenant's rate, by what they read: `logs` (service
    /// log lines, `max_log_read_bytes_per_second`) or `history` (Watch and SSE replays,
    /// `max_history_read_bytes_per_second`).
    pub read_wait: CounterVec,
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
        let quota_refusals = counter_vec(
            "solo_quota_refusals_total",
            "Deploys refused by a quota (the key of the limit), of any tenant.",
            &["quota"],
        );
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
        let instances = gauge(
            "solo_instances",
            "WebAssembly instances alive, those an upgrade replaced that are finishing their calls included.",
        );
        let watchers = IntGaugeVec::new(
            Opts::new(
                "solo_watchers",
                "Open Watch, SSE and log-follow streams: what max_watchers bounds.",
            ),
            &["protocol"],
        )
        .expect("a valid metric");
        registry.register(Box::new(watchers.clone())).expect("registered once");
        let read_wait = CounterVec::new(
            Opts::new(
                "solo_read_wait_seconds_total",
                "Seconds that reads waited for their tenant's rate: service log lines (reads=logs, \
                 max_log_read_bytes_per_second) or Watch and SSE history (reads=history, \
                 max_history_read_bytes_per_second).",
            ),
            &["reads"],
        )
        .expect("a valid metric");
        registry.register(Box::new(read_wait.clone())).expect("registered once");
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
            "gRPC requests by method and the status code they ended with; a stream is counted as it ends (CANCELLED if its client left first).",
            &["method", "code"],
        );
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(ProcessMetrics(
                prometheus::process_collector::ProcessCollector::for_self(),
            )))
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
            quota_refusals,
            calls,
            call_duration,
            instance_restarts,
            instances,
            watchers,
            read_wait,
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
        for reads in ["logs", "history"] {
            metrics.read_wait.with_label_values(&[reads]);
        }
        for scope in ["tenant", "node", "watchers", "body_bytes"] {
            metrics.shed.with_label_values(&[scope]);
        }
        for result in ["created", "upgraded", "unchanged", "replayed", "refused"] {
            metrics.deploys.with_label_values(&[result]);
        }
        for quota in crate::control::DEPLOY_QUOTAS {
            metrics.quota_refusals.with_label_values(&[quota]);
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

/// The prometheus crate's process metrics, with `process_cpu_seconds_total` to the clock tick
/// (as Go's client reports it) rather than in whole seconds: the rate of a node at a few per
/// cent of a core would read 0 most of the time.
#[cfg(target_os = "linux")]
struct ProcessMetrics(prometheus::process_collector::ProcessCollector);

#[cfg(target_os = "linux")]
impl prometheus::core::Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.0.collect();
        if let Some(seconds) = process_cpu_seconds() {
            let cpu = families
                .iter_mut()
                .filter(|family| family.name() == "process_cpu_seconds_total");
            for metric in cpu.flat_map(|family| family.mut_metric().iter_mut()) {
                let mut counter = prometheus::proto::Counter::default();
                counter.set_value(seconds);
                metric.set_counter(counter);
            }
        }
        families
    }
}

/// The CPU time the process has used, user and system, from `/proc/self/stat`.
#[cfg(target_os = "linux")]
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_seconds_of_stat(&stat, rustix::param::clock_ticks_per_second())
}

/// `utime` plus `stime` (fields 14 and 15) of a `/proc/<pid>/stat` line, in seconds. The
/// fields are counted from the end of the command name, which may hold spaces and parentheses.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn cpu_seconds_of_stat(stat: &str, ticks_per_second: u64) -> Option<f64> {
    let after_command = &stat[stat.rfind(')')? + 1..];
    // The first field after the command is the third, the state.
    let mut fields = after_command.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_count_clock_ticks_after_an_awkward_command_name() {
        let stat = "4242 (solo (a) b) S 1 4242 4242 0 -1 4194560 1000 0 0 0 123 45 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_seconds_of_stat(stat, 100), Some(1.68));
        assert_eq!(cpu_seconds_of_stat("garbage", 100), None);
        assert_eq!(cpu_seconds_of_stat("1 (x) S 1 2", 100), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_cpu_counter_is_not_rounded_to_whole_seconds() {
        let metrics = Metrics::new();
        // Some work, so that the process has used a fraction of a second more than before.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let before = process_cpu_seconds().expect("readable");
        let text = metrics.render();
        let after = process_cpu_seconds().expect("readable");
        let line = text
            .lines()
            .find(|l| l.starts_with("process_cpu_seconds_total "))
            .expect("the counter is exported");
        let value: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        // Whole seconds would read below `before`, short of it by its fraction.
        assert!(
            before > 0.0 && before <= value && value <= after,
            "{before} {line} {after}"
        );
    }
}
