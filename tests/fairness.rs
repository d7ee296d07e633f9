//! Fair shares of the guest threads between tenants.
//!
//! These tests measure how the CPU is shared, so they own it: they are a test binary of their
//! own (cargo runs test binaries one after another, and the tests of one binary side by side),
//! and they take turns within it. Beside other CPU-heavy tests, the operating system's own
//! scheduling of the guest threads skewed the shares they measure.

mod common;

use std::time::{Duration, Instant};

use common::*;
use solo::proto::Limits;

/// Held by each test while it runs, so that the tests of this binary do not share the cores.
static CORES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn call(control: &solo::control::Control, tenant: &str, id: &str, payload: &[u8]) {
    control.call(tenant, id, payload.to_vec(), None).await.unwrap();
}

/// The `count` example, whose calls do a fixed amount of work (a counted loop, not a clock), so
/// that the calls it answers measure the CPU it was given.
fn fixed_work(tenant: &str, id: &str) -> solo::control::DeployRequest {
    let mut request = deploy_example(tenant, id, "count");
    request.limits = Limits {
        call_timeout_ms: 30_000,
        cpu_ms_per_call: 30_000,
        ..Limits::default()
    };
    request
}

/// Deploys `count` as each of `services` (tenant, id), then calls each service in a loop with
/// `callers` callers apiece for four seconds; returns the calls each caller had answered.
async fn calls_answered_under_load(
    control: &solo::control::Control,
    services: &[(&str, String)],
    callers: usize,
) -> Vec<u32> {
    for (tenant, id) in services {
        let deployed = control.deploy(fixed_work(tenant, id)).await.unwrap();
        wait_for_kind(control, deployed.seq, tenant, id, "service_started").await;
    }
    let until = Instant::now() + Duration::from_secs(4);
    let callers: Vec<_> = services
        .iter()
        .flat_map(|service| std::iter::repeat_n(service, callers))
        .map(|(tenant, id)| {
            let (control, tenant, id) = (control.clone(), tenant.to_string(), id.clone());
            tokio::spawn(async move {
                let mut answered = 0u32;
                while Instant::now() < until {
                    call(&control, &tenant, &id, b"20000000").await;
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let mut answered = Vec::new();
    for caller in callers {
        answered.push(caller.await.unwrap());
    }
    answered
}

/// Guest threads are shared by tenants, not by services: a tenant with many busy services gets
/// no more of them than a tenant with one. Each service here has one caller calling it in a
/// loop; the quiet tenant's one service gets about one of the two threads, as the busy
/// tenant's six do between them, where sharing by service would give it a seventh of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_many_busy_services_gets_no_more_guest_time_than_one_with_one() {
    const BUSY_SERVICES: usize = 6;
    let _cores = CORES.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let node = open_node(&node_config(dir.path())).await;
    let control = &node.control;
    let mut services = vec![("quiet", "work".to_string())];
    services.extend((0..BUSY_SERVICES).map(|i| ("busy", format!("work{i}"))));
    let answered = calls_answered_under_load(control, &services, 1).await;
    let quiet = f64::from(answered[0]);
    let busy_each = f64::from(answered[1..].iter().sum::<u32>()) / BUSY_SERVICES as f64;
    // Fair by tenant, the ratio is about 6; fair by service, it would be about 1.
    assert!(
        quiet >= 3.0 * busy_each.max(1.0),
        "the quiet tenant's service answered {quiet} calls, each of the busy tenant's {busy_each:.1} ({answered:?})"
    );
    node.stop(Duration::from_secs(5)).await;
}

/// With more busy tenants than guest threads, the turns go round them: three tenants, one busy
/// service each (two callers apiece, so that its mailbox is never empty), on two guest threads,
/// get about a third each, not a whole thread for one and half of one for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_busy_tenants_than_guest_threads_get_even_shares() {
    let _cores = CORES.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let node = open_node(&node_config(dir.path())).await;
    let control = &node.control;
    let services = ["a", "b", "c"].map(|tenant| (tenant, "work".to_string()));
    let answered = calls_answered_under_load(control, &services, 2).await;
    let by_tenant: Vec<u32> = answered.chunks(2).map(|two| two.iter().sum()).collect();
    let (least, most) = (by_tenant.iter().min().unwrap(), by_tenant.iter().max().unwrap());
    // Even, the ratio is about 1; a thread for one tenant and half of one each for the other
    // two, it would be about 0.5.
    assert!(
        f64::from(*least) >= 0.75 * f64::from(*most),
        "calls answered by tenant: {by_tenant:?}"
    );
    node.stop(Duration::from_secs(5)).await;
}
