//! The gRPC API, end to end: a real server on port 0 and a generated tonic client.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use solo::proto::{self, watch_response::Msg};
use tonic::Code;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temp dir")
}

/// A guard against hangs, never a performance assertion.
const PATIENCE: Duration = Duration::from_secs(30);

type Client = proto::solo_kernel_client::SoloKernelClient<tonic::transport::Channel>;

/// The code of a call that must fail.
fn code<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    result.unwrap_err().code()
}

async fn deploy(client: &mut Client, tenant: &str, id: &str, example_name: &str) -> proto::DeployResponse {
    client
        .deploy(as_tenant(tenant, grpc_deploy(id, example_name)))
        .await
        .expect("deploy succeeds")
        .into_inner()
}

/// Watches as `tenant` (the admin if empty) until an event matches.
async fn wait_until(
    client: &mut Client,
    tenant: &str,
    from_seq: u64,
    matches: impl Fn(&proto::Event) -> bool,
) -> proto::Event {
    let watch = proto::WatchRequest {
        from_seq,
        ..Default::default()
    };
    let request = if tenant.is_empty() {
        tonic::Request::new(watch)
    } else {
        as_tenant(tenant, watch)
    };
    let mut stream = client.watch(request).await.unwrap().into_inner();
    let found = async {
        while let Some(item) = stream.next().await {
            if let Some(Msg::Event(event)) = item.unwrap().msg
                && matches(&event)
            {
                return event;
            }
        }
        panic!("the watch ended");
    };
    tokio::time::timeout(PATIENCE, found).await.expect("the event arrives")
}

/// Opens a Watch of the `service_deployed` events of `tenant` (the admin if empty) from
/// `from_seq`, and collects the first `count` of them in a task.
async fn watch_deploys(
    client: &Client,
    tenant: &str,
    from_seq: u64,
    count: usize,
) -> tokio::task::JoinHandle<Vec<proto::Event>> {
    let watch = proto::WatchRequest {
        from_seq,
        kinds: vec!["service_deployed".into()],
        ..Default::default()
    };
    let request = if tenant.is_empty() {
        tonic::Request::new(watch)
    } else {
        as_tenant(tenant, watch)
    };
    let mut stream = client.clone().watch(request).await.unwrap().into_inner();
    tokio::spawn(async move {
        let mut deploys = Vec::new();
        while deploys.len() < count {
            let next = tokio::time::timeout(PATIENCE, stream.next())
                .await
                .expect("the events arrive");
            if let Some(Msg::Event(event)) = next.unwrap().unwrap().msg {
                deploys.push(event);
            }
        }
        deploys
    })
}

/// The first `count` `service_deployed` events of `tenant`'s history.
async fn deploys_in_history(client: &mut Client, tenant: &str, count: usize) -> Vec<proto::Event> {
    watch_deploys(client, tenant, 1, count).await.await.unwrap()
}

async fn running(client: &mut Client, tenant: &str, id: &str, from_seq: u64) {
    wait_until(client, tenant, from_seq, |e| {
        e.service_id == id && matches!(e.kind, Some(proto::event::Kind::ServiceStarted(_)))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_works_and_fails_as_documented() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;

    // Deploy: created, then unchanged for the identical module.
    let first = deploy(&mut client, "acme", "echo", "echo").await;
    assert!(first.created && !first.unchanged && first.version == 1 && first.module_sha256.len() == 64);
    let again = deploy(&mut client, "acme", "echo", "echo").await;
    assert!(again.unchanged && !again.created && again.seq == first.seq);
    running(&mut client, "acme", "echo", first.seq).await;

    // Call: bytes in, bytes out, binary-safe.
    let payload: Vec<u8> = (0..=255).collect();
    let call = proto::CallRequest {
        service_id: "echo".into(),
        payload: payload.clone(),
        timeout_ms: 0,
    };
    assert_eq!(
        client.call(as_tenant("acme", call)).await.unwrap().into_inner().payload,
        payload
    );

    // Status with live figures.
    let status = client
        .status(as_tenant(
            "acme",
            proto::StatusRequest {
                service_id: "echo".into(),
            },
        ))
        .await
        .unwrap();
    let status = status.into_inner();
    assert_eq!(
        (
            status.status.as_str(),
            status.tenant.as_str(),
            status.version,
            status.calls
        ),
        ("running", "acme", 1, 1)
    );
    assert_eq!(status.module_sha256, first.module_sha256);
    assert!(status.memory_bytes > 0 && status.limits.unwrap().memory_bytes > 0);

    // Logs.
    let logs = client.logs(as_tenant(
        "acme",
        proto::LogsRequest {
            service_id: "echo".into(),
            ..Default::default()
        },
    ));
    let lines: Vec<proto::LogLine> = logs.await.unwrap().into_inner().map(|l| l.unwrap()).collect().await;
    assert_eq!(
        lines.iter().map(|l| l.message.as_str()).collect::<Vec<_>>(),
        ["echo ready"]
    );
    assert_eq!(
        (lines[0].seq, lines[0].level.as_str(), lines[0].version),
        (1, "info", 1)
    );
    // From the next line on is fine (nothing yet); past it is refused, as a Watch past the
    // log's head is: lines are numbered afresh when a node restarts, and a client resuming
    // from its last line must learn that rather than wait for the new log to catch up.
    for follow in [false, true] {
        let from = |from_seq| {
            as_tenant(
                "acme",
                proto::LogsRequest {
                    service_id: "echo".into(),
                    follow,
                    from_seq,
                    log_id: 0,
                },
            )
        };
        let next = client.logs(from(2)).await.expect("the next line");
        if !follow {
            assert_eq!(next.into_inner().count().await, 0);
        }
        for past in [3, u64::MAX] {
            let refused = client.logs(from(past)).await.expect_err("past the next line");
            assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
            assert!(
                refused.message().contains("next log line, 2") && refused.message().contains("afresh"),
                "{}",
                refused.message()
            );
        }
    }

    // List: filters and pages.
    for id in ["b", "c", "d"] {
        let mut request = grpc_deploy(id, "counter");
        request.labels = BTreeMap::from([("team".to_string(), if id == "d" { "x" } else { "y" }.to_string())]);
        client.deploy(as_tenant("acme", request)).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut first_token = None;
    loop {
        let list = proto::ListRequest {
            page_size: 2,
            page_token: token.clone(),
            ..Default::default()
        };
        let page = client.list(as_tenant("acme", list)).await.unwrap().into_inner();
        assert!(page.services.len() <= 2);
        seen.extend(page.services.into_iter().map(|s| s.service_id));
        if page.next_page_token.is_empty() {
            break;
        }
        first_token.get_or_insert_with(|| page.next_page_token.clone());
        token = page.next_page_token;
    }
    assert_eq!(seen, ["b", "c", "d", "echo"]);
    // A page token goes on only the listing it came from: not another tenant's, nor another
    // filter's, which would skip or repeat services.
    let first_token = first_token.expect("four services make two pages");
    let elsewhere = [
        ("beta", proto::ListRequest::default()),
        (
            "acme",
            proto::ListRequest {
                status: "running".into(),
                ..Default::default()
            },
        ),
        (
            "acme",
            proto::ListRequest {
                labels: BTreeMap::from([("team".into(), "y".into())]),
                ..Default::default()
            },
        ),
    ];
    for (tenant, mut list) in elsewhere {
        list.page_token = first_token.clone();
        let refused = client.list(as_tenant(tenant, list)).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("another listing"), "{refused:?}");
    }
    // A token of this listing whose position was rewritten to name no possible service, or
    // another tenant's (which would end acme's listing there, early).
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let issued = String::from_utf8(b64.decode(&first_token).unwrap()).unwrap();
    let (listing, _) = issued.split_once('\n').unwrap();
    for position in ["acme\n../!!", "ACME\nsvc01", "acme", "beta\nsvc01"] {
        let forged = proto::ListRequest {
            page_token: b64.encode(format!("{listing}\n{position}")),
            ..Default::default()
        };
        let refused = client.list(as_tenant("acme", forged)).await.unwrap_err();
        assert!(
            refused.code() == Code::InvalidArgument && refused.message().contains("not one this node issued"),
            "{position:?}: {refused:?}"
        );
    }
    let labelled = proto::ListRequest {
        labels: BTreeMap::from([("team".into(), "y".into())]),
        ..Default::default()
    };
    let ids: Vec<String> = client
        .list(as_tenant("acme", labelled))
        .await
        .unwrap()
        .into_inner()
        .services
        .into_iter()
        .map(|s| s.service_id)
        .collect();
    assert_eq!(ids, ["b", "c"]);

    // Kill, and the errors around it.
    let kill = proto::KillRequest {
        service_id: "b".into(),
        grace_ms: 1000,
        ..Default::default()
    };
    let killed = client.kill(as_tenant("acme", kill.clone())).await.unwrap().into_inner();
    assert!(!killed.already_stopped && killed.seq > 0);
    assert!(
        client
            .kill(as_tenant("acme", kill))
            .await
            .unwrap()
            .into_inner()
            .already_stopped
    );

    let missing = || proto::StatusRequest {
        service_id: "nope".into(),
    };
    assert_eq!(code(client.status(as_tenant("acme", missing())).await), Code::NotFound);
    let kill_missing = proto::KillRequest {
        service_id: "nope".into(),
        ..Default::default()
    };
    assert_eq!(code(client.kill(as_tenant("acme", kill_missing)).await), Code::NotFound);
    let no_module = proto::DeployRequest {
        service_id: "x".into(),
        ..Default::default()
    };
    let err = client.deploy(as_tenant("acme", no_module)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("module"), "{}", err.message());
    let err = client
        .deploy(as_tenant("acme", grpc_deploy("x", "forbidden_import")))
        .await
        .unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument && err.message().contains("fd_write"),
        "{err:?}"
    );
    let bad_id = grpc_deploy("no/slashes", "echo");
    assert_eq!(
        code(client.deploy(as_tenant("acme", bad_id)).await),
        Code::InvalidArgument
    );
    let bad_status = proto::ListRequest {
        status: "sleepy".into(),
        ..Default::default()
    };
    assert_eq!(
        code(client.list(as_tenant("acme", bad_status)).await),
        Code::InvalidArgument
    );
    let bad_token = proto::ListRequest {
        page_token: "!!".into(),
        ..Default::default()
    };
    assert_eq!(
        code(client.list(as_tenant("acme", bad_token)).await),
        Code::InvalidArgument
    );
    let call_stopped = proto::CallRequest {
        service_id: "b".into(),
        ..Default::default()
    };
    assert_eq!(
        code(client.call(as_tenant("acme", call_stopped)).await),
        Code::FailedPrecondition
    );
    let bad_kind = proto::WatchRequest {
        kinds: vec!["nope".into()],
        ..Default::default()
    };
    let err = client.watch(as_tenant("acme", bad_kind)).await.map(|_| ()).unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument && err.message().contains("service_deployed"),
        "{err:?}"
    );

    // A trap is ABORTED with its kind; a call past its time is DEADLINE_EXCEEDED.
    let trap = deploy(&mut client, "acme", "trap", "unreachable").await;
    running(&mut client, "acme", "trap", trap.seq).await;
    let err = client
        .call(as_tenant(
            "acme",
            proto::CallRequest {
                service_id: "trap".into(),
                ..Default::default()
            },
        ))
        .await;
    let err = err.unwrap_err();
    assert!(
        err.code() == Code::Aborted && err.message().contains("unreachable"),
        "{err:?}"
    );
    assert_eq!(err.metadata().get("solo-error").unwrap(), "service_trapped");
    // Written for a person: the trap and where, not wasmtime's whole backtrace.
    assert!(
        err.message().lines().count() == 1
            && err.message().contains("in function #")
            && !err.message().contains("backtrace"),
        "{err:?}"
    );
    let spin = deploy(&mut client, "acme", "spin", "spin").await;
    running(&mut client, "acme", "spin", spin.seq).await;
    let slow = proto::CallRequest {
        service_id: "spin".into(),
        payload: b"800".to_vec(),
        timeout_ms: 100,
    };
    assert_eq!(code(client.call(as_tenant("acme", slow)).await), Code::DeadlineExceeded);
    // The client's own deadline (`grpc-timeout`) passing is DEADLINE_EXCEEDED too, every time,
    // and says whose deadline it was. (Tonic's client keeps that deadline itself, and says
    // CANCELLED when it passes first; so a raw client here.)
    let http = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let message = prost::Message::encode_to_vec(&proto::CallRequest {
        service_id: "spin".into(),
        payload: b"300".to_vec(),
        timeout_ms: 0,
    });
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    for (timeout, said) in [("50m", "deadline of 50 ms"), ("500u", "deadline of 0.500 ms")].repeat(5) {
        let reply = http
            .post(format!("{}/solo.v1.SoloKernel/Call", server.grpc_url()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-tenant-id", "acme")
            .header("grpc-timeout", timeout)
            .body(framed.clone())
            .send()
            .await
            .unwrap();
        let headers = reply.headers();
        assert_eq!(headers["grpc-status"], "4", "{headers:?}");
        let message = headers["grpc-message"].to_str().unwrap();
        assert!(message.contains("grpc-timeout") && message.contains(said), "{message}");
    }
    let err = client
        .call(as_tenant(
            "acme",
            proto::CallRequest {
                service_id: "kv-missing".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.metadata().get("solo-error").unwrap(), "not_found");
    // The admin naming no tenant acts for `default`, and is told so when it finds nothing.
    let err = client
        .status(proto::StatusRequest {
            service_id: "trap".into(),
        })
        .await
        .unwrap_err();
    assert!(
        err.code() == Code::NotFound
            && err.message().contains("in tenant 'default'")
            && err.message().contains("x-tenant-id"),
        "{err:?}"
    );
    let err = client
        .status(as_tenant(
            "acme",
            proto::StatusRequest {
                service_id: "nope".into(),
            },
        ))
        .await
        .unwrap_err();
    assert!(!err.message().contains("default"), "{err:?}");
    // The service's own refusal shares UNKNOWN with failures of the transport; its kind says
    // which it is.
    let kv = deploy(&mut client, "acme", "kv", "kv").await;
    running(&mut client, "acme", "kv", kv.seq).await;
    let refused = client
        .call(as_tenant(
            "acme",
            proto::CallRequest {
                service_id: "kv".into(),
                payload: b"get nothing".to_vec(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unknown, "{refused:?}");
    assert_eq!(refused.metadata().get("solo-error").unwrap(), "service_error");
    assert!(refused.message().contains("no such key"), "{refused:?}");

    // A tenant may not shut the node down (development mode: naming a tenant makes one).
    let err = client
        .shutdown(as_tenant("acme", proto::ShutdownRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    server.stop().await.unwrap();
}

/// Deploys and kills at a version: `expected_version` 0 creates only, N acts only on version
/// N; a mismatch is ABORTED, names the version, and appends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_and_kills_that_name_a_version_apply_only_at_that_version() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let at = |example: &str, expected: u64, label: &str| {
        let mut request = grpc_deploy("svc", example);
        request.expected_version = Some(expected);
        request.labels = BTreeMap::from([("by".to_string(), label.to_string())]);
        request
    };
    let created = client
        .deploy(as_tenant("acme", at("echo", 0, "a")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((created.version, created.created), (1, true));
    let refused = client.deploy(as_tenant("acme", at("echo", 0, "b"))).await.unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert_eq!(refused.metadata().get("solo-error").unwrap(), "version_mismatch");
    assert!(
        refused.message().contains("service 'svc' is at version 1")
            && refused
                .message()
                .contains("expected_version 0 is for a service that does not exist yet"),
        "{}",
        refused.message()
    );
    // Another tenant's service of the same id is neither an obstacle nor revealed.
    let theirs = client
        .deploy(as_tenant("beta", at("echo", 0, "a")))
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.created);
    let upgraded = client
        .deploy(as_tenant("acme", at("counter", 1, "a")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(upgraded.version, 2);
    let stale = client.deploy(as_tenant("acme", at("echo", 1, "a"))).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert!(
        stale.message().contains("is at version 2") && stale.message().contains("expected version 1"),
        "{}",
        stale.message()
    );
    let mut ghost = at("echo", 3, "a");
    ghost.service_id = "ghost".into();
    let missing = client.deploy(as_tenant("acme", ghost)).await.unwrap_err();
    assert_eq!(missing.code(), Code::Aborted);
    assert!(
        missing.message().contains("service 'ghost' does not exist"),
        "{}",
        missing.message()
    );

    // Racing read-modify-writes from version 2: exactly one wins.
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let mut client = client.clone();
            let request = at("echo", 2, &format!("racer-{i}"));
            tokio::spawn(async move { client.deploy(as_tenant("acme", request)).await })
        })
        .collect();
    let mut won = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(deployed) => {
                assert_eq!(deployed.into_inner().version, 3);
                won += 1;
            }
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    assert_eq!(won, 1);

    // A keyed conditional deploy: its retry gets the first answer though the version moved on;
    // the key with another expected version is a conflict.
    let mut keyed = at("counter", 3, "keyed");
    keyed.idempotency_key = "upgrade-3".into();
    let first = client
        .deploy(as_tenant("acme", keyed.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.version, 4);
    client.deploy(as_tenant("acme", at("echo", 4, "a"))).await.unwrap();
    let retry = client
        .deploy(as_tenant("acme", keyed.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((retry.version, retry.seq), (4, first.seq));
    keyed.expected_version = Some(4);
    let conflict = client.deploy(as_tenant("acme", keyed)).await.unwrap_err();
    assert_eq!(conflict.code(), Code::FailedPrecondition, "{conflict:?}");
    assert_eq!(conflict.metadata().get("solo-error").unwrap(), "idempotency_key_reused");

    // A kill at a version: a stale one is ABORTED and stops nothing; the current one stops.
    let kill_at = |expected| proto::KillRequest {
        service_id: "svc".into(),
        expected_version: Some(expected),
        ..Default::default()
    };
    let stale = client.kill(as_tenant("acme", kill_at(4))).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    assert!(stale.message().contains("is at version 5"), "{}", stale.message());
    let status = proto::StatusRequest {
        service_id: "svc".into(),
    };
    let desired = client
        .status(as_tenant("acme", status.clone()))
        .await
        .unwrap()
        .into_inner()
        .desired;
    assert_eq!(desired, "running");
    let killed = client.kill(as_tenant("acme", kill_at(5))).await.unwrap().into_inner();
    assert!(!killed.already_stopped);
    let desired = client
        .status(as_tenant("acme", status))
        .await
        .unwrap()
        .into_inner()
        .desired;
    assert_eq!(desired, "stopped");

    // The log holds the deploys that happened, each with the version it required, and none
    // of the refused.
    let required: Vec<_> = deploys_in_history(&mut client, "acme", 5)
        .await
        .into_iter()
        .map(|event| match event.kind {
            Some(proto::event::Kind::ServiceDeployed(deployed)) => (deployed.version, deployed.expected_version),
            other => panic!("not a deploy: {other:?}"),
        })
        .collect();
    assert_eq!(
        required,
        [(1, Some(0)), (2, Some(1)), (3, Some(2)), (4, Some(3)), (5, Some(4))]
    );
    server.stop().await.unwrap();
}

/// A service's log lines name their log, and a read that names the log it resumes gets a newer
/// one (the node restarted) from its first line, where a bare line number would be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_resume_in_the_log_they_name() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let deployed = deploy(&mut client, "acme", "echo", "echo").await;
    running(&mut client, "acme", "echo", deployed.seq).await;
    let logs = |log_id, from_seq, follow| {
        as_tenant(
            "acme",
            proto::LogsRequest {
                service_id: "echo".into(),
                follow,
                from_seq,
                log_id,
            },
        )
    };
    let lines: Vec<_> = client
        .logs(logs(0, 0, false))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let first = lines[0].as_ref().unwrap().clone();
    assert_eq!((first.seq, first.message.as_str()), (1, "echo ready"));
    assert_ne!(first.log_id, 0, "a line names its log");
    // In the same log, a resume after the last line gets what follows it, and a start past the
    // next line is refused as it is without a log id.
    let rest = client.logs(logs(first.log_id, 2, false)).await.unwrap().into_inner();
    assert_eq!(rest.count().await, 0);
    let past = client.logs(logs(first.log_id, 3, false)).await.unwrap_err();
    assert_eq!(past.code(), Code::InvalidArgument, "{past:?}");
    server.stop().await.unwrap();

    // The restarted node keeps the service's lines in a new log, numbered from 1 again: named
    // by the old log, the resume gets the new one from its first line, though the old log's
    // next line, 3, is past the new one's.
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let mut follow = client.logs(logs(first.log_id, 3, true)).await.unwrap().into_inner();
    let anew = tokio::time::timeout(PATIENCE, follow.next())
        .await
        .expect("the new log's first line arrives")
        .expect("a line")
        .unwrap();
    assert_eq!((anew.seq, anew.message.as_str()), (1, "echo ready"));
    assert_ne!(anew.log_id, first.log_id, "another log, another id");
    drop(follow);
    let bare = client.logs(logs(0, 3, false)).await.unwrap_err();
    assert_eq!(bare.code(), Code::InvalidArgument, "{bare:?}");
    server.stop().await.unwrap();
}

/// The next line's message, or `None` at the end of the stream.
async fn next_line(stream: &mut tonic::Streaming<proto::LogLine>) -> Option<String> {
    let next = tokio::time::timeout(PATIENCE, stream.next()).await;
    next.expect("a line or the end arrives")
        .map(|line| line.unwrap().message)
}

/// A followed log ends once its service is down for good (stopped, crashed past its restart
/// policy, failed), after its last line, as `kubectl logs -f` ends with its container; a
/// restart does not end it, and a follow of a service already down gets the lines kept and
/// ends. A new deploy brings a new follow back to following.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_log_ends_once_its_service_is_down_for_good() {
    const CRASHER: &str = r#"(module
      (import "solo" "log" (func $log (param i32 i32 i32)))
      (memory (export "memory") 1)
      (data (i32.const 16) "up")
      (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "solo_handle") (param i32 i32) (result i64) unreachable)
      (func (export "solo_init") (result i32) (call $log (i32.const 2) (i32.const 16) (i32.const 2)) (i32.const 0)))"#;
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let crasher = |version_tag: &str| proto::DeployRequest {
        service_id: "crasher".into(),
        module: Some(proto::deploy_request::Module::Wat(format!("{CRASHER};; {version_tag}"))),
        limits: Some(proto::Limits {
            max_restarts: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let deployed = client
        .deploy(as_tenant("acme", crasher("v1")))
        .await
        .unwrap()
        .into_inner();
    running(&mut client, "acme", "crasher", deployed.seq).await;
    let follow = || {
        as_tenant(
            "acme",
            proto::LogsRequest {
                service_id: "crasher".into(),
                follow: true,
                ..Default::default()
            },
        )
    };
    let mut follower = client.logs(follow()).await.unwrap().into_inner();
    assert_eq!(next_line(&mut follower).await.as_deref(), Some("up"));
    let call = || {
        as_tenant(
            "acme",
            proto::CallRequest {
                service_id: "crasher".into(),
                ..Default::default()
            },
        )
    };
    // The first crash restarts it: the follow goes on, with the fresh instance's line.
    assert_eq!(code(client.call(call()).await), Code::Aborted);
    assert_eq!(next_line(&mut follower).await.as_deref(), Some("up"));
    // The second is past its policy of one restart: it stays down, and the follow ends.
    assert_eq!(code(client.call(call()).await), Code::Aborted);
    assert_eq!(next_line(&mut follower).await, None, "the follow ends with the service");
    let status = proto::StatusRequest {
        service_id: "crasher".into(),
    };
    let status = client.status(as_tenant("acme", status)).await.unwrap().into_inner();
    assert_eq!(status.status, "crashed", "the follow ends once the crash is on record");

    // A follow of a service that is down gets what was kept, then the end.
    let mut late = client.logs(follow()).await.unwrap().into_inner();
    assert_eq!(next_line(&mut late).await.as_deref(), Some("up"));
    assert_eq!(next_line(&mut late).await.as_deref(), Some("up"));
    assert_eq!(next_line(&mut late).await, None);

    // Deployed again, a follow right after the deploy waits for the new instance's lines.
    client.deploy(as_tenant("acme", crasher("v2"))).await.unwrap();
    let mut again = client.logs(follow()).await.unwrap().into_inner();
    for _ in 0..3 {
        assert_eq!(next_line(&mut again).await.as_deref(), Some("up"));
    }
    let still = tokio::time::timeout(Duration::from_millis(300), again.next()).await;
    assert!(still.is_err(), "a running service's follow goes on: {still:?}");
    server.stop().await.unwrap();
}

/// A service's log can be read and followed as soon as its deploy is answered, before the node
/// has started it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_is_there_as_soon_as_the_deploy_is_answered() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    for i in 0..20 {
        let id = format!("echo-{i}");
        deploy(&mut client, "acme", &id, "echo").await;
        let follow = proto::LogsRequest {
            service_id: id.clone(),
            follow: true,
            ..Default::default()
        };
        let mut follower = client.logs(as_tenant("acme", follow)).await.unwrap().into_inner();
        assert_eq!(next_line(&mut follower).await.as_deref(), Some("echo ready"), "{id}");
    }
    server.stop().await.unwrap();
}

/// Remove takes a stopped service out of the registry: its id starts over, its history stays,
/// and the node remembers after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_takes_a_stopped_service_out_of_the_registry() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let first = deploy(&mut client, "acme", "svc", "echo").await;
    running(&mut client, "acme", "svc", first.seq).await;
    let remove = |key: &str| proto::RemoveRequest {
        service_id: "svc".into(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    let refused = client.remove(as_tenant("acme", remove(""))).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("kill it"), "{}", refused.message());
    let follow = proto::LogsRequest {
        service_id: "svc".into(),
        follow: true,
        ..Default::default()
    };
    let mut follower = client.logs(as_tenant("acme", follow)).await.unwrap().into_inner();

    let kill = proto::KillRequest {
        service_id: "svc".into(),
        ..Default::default()
    };
    let killed = client.kill(as_tenant("acme", kill)).await.unwrap().into_inner();
    wait_until(&mut client, "acme", killed.seq, |e| {
        matches!(e.kind, Some(proto::event::Kind::ServiceStopped(_)))
    })
    .await;
    // Another tenant cannot remove it, nor learn that it exists.
    let theirs = client.remove(as_tenant("beta", remove(""))).await.unwrap_err();
    assert_eq!(theirs.code(), Code::NotFound);

    let removed = client
        .remove(as_tenant("acme", remove("rm-1")))
        .await
        .unwrap()
        .into_inner();
    // A follower of its log lines gets the last of them, then the end of the stream.
    let mut lines = Vec::new();
    while let Some(line) = tokio::time::timeout(PATIENCE, follower.next())
        .await
        .expect("the follow ends")
    {
        lines.push(line.unwrap().message);
    }
    assert_eq!(lines, ["echo ready", "echo stopping"]);
    let retry = client
        .remove(as_tenant("acme", remove("rm-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.seq, removed.seq, "a keyed retry gets the first answer");
    let status = proto::StatusRequest {
        service_id: "svc".into(),
    };
    assert_eq!(
        code(client.status(as_tenant("acme", status.clone())).await),
        Code::NotFound
    );
    assert_eq!(code(client.remove(as_tenant("acme", remove(""))).await), Code::NotFound);
    let listed = client
        .list(as_tenant("acme", proto::ListRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.services.is_empty());

    // The event is in the history, and watchers can ask for it by name.
    let watch = proto::WatchRequest {
        from_seq: 1,
        kinds: vec!["service_removed".into()],
        ..Default::default()
    };
    let mut stream = client.watch(as_tenant("acme", watch)).await.unwrap().into_inner();
    let event = loop {
        if let Some(Msg::Event(event)) = stream.next().await.unwrap().unwrap().msg {
            break event;
        }
    };
    assert_eq!((event.seq, event.service_id.as_str()), (removed.seq, "svc"));

    // The id starts over, and stays so across a restart.
    let again = deploy(&mut client, "acme", "svc", "counter").await;
    assert_eq!((again.version, again.created), (1, true));
    running(&mut client, "acme", "svc", again.seq).await;
    server.stop().await.unwrap();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let status = client.status(as_tenant("acme", status)).await.unwrap().into_inner();
    assert_eq!((status.version, status.module_sha256), (1, again.module_sha256));
    server.stop().await.unwrap();
}

/// Kills `id` of `tenant` and waits until it has stopped; returns the seq of `service_stopped`.
async fn kill_and_wait(client: &mut Client, tenant: &str, id: &str) -> u64 {
    let kill = proto::KillRequest {
        service_id: id.into(),
        ..Default::default()
    };
    let killed = client.kill(as_tenant(tenant, kill)).await.unwrap().into_inner();
    let stopped = wait_until(client, tenant, killed.seq, |e| {
        e.service_id == id && matches!(e.kind, Some(proto::event::Kind::ServiceStopped(_)))
    })
    .await;
    stopped.seq
}

/// The ids `tenant` lists, in order.
async fn listed_ids(client: &mut Client, tenant: &str) -> Vec<String> {
    let listed = client
        .list(as_tenant(tenant, proto::ListRequest::default()))
        .await
        .unwrap()
        .into_inner();
    listed.services.into_iter().map(|s| s.service_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_keeps_at_most_its_stopped_services_and_the_node_removes_the_oldest() {
    let dir = tempdir();
    let server = start_server(dir.path(), |config| config.limits.max_stopped_services = 2).await;
    let mut client = grpc_client(&server).await;
    for (tenant, id) in [("acme", "a"), ("acme", "b"), ("acme", "c"), ("beta", "x")] {
        let deployed = deploy(&mut client, tenant, id, "echo").await;
        running(&mut client, tenant, id, deployed.seq).await;
    }
    kill_and_wait(&mut client, "acme", "b").await;
    kill_and_wait(&mut client, "acme", "a").await;
    // Another tenant's stopped services count against its own limit only.
    kill_and_wait(&mut client, "beta", "x").await;
    assert_eq!(listed_ids(&mut client, "acme").await, ["a", "b", "c"]);

    // A third stopped service: the one stopped longest ago leaves, in the same commit.
    let stopped = kill_and_wait(&mut client, "acme", "c").await;
    let removed = wait_until(&mut client, "acme", stopped, |e| {
        matches!(e.kind, Some(proto::event::Kind::ServiceRemoved(_)))
    })
    .await;
    assert_eq!(
        (removed.seq, removed.service_id.as_str(), removed.actor.as_str()),
        (stopped + 1, "b", "node")
    );
    let Some(proto::event::Kind::ServiceRemoved(removal)) = &removed.kind else {
        unreachable!()
    };
    assert_eq!(removal.reason(), proto::RemovalReason::MaxStoppedServices);
    assert_eq!(listed_ids(&mut client, "acme").await, ["a", "c"]);
    assert_eq!(listed_ids(&mut client, "beta").await, ["x"]);
    let status = proto::StatusRequest { service_id: "b".into() };
    assert_eq!(code(client.status(as_tenant("acme", status)).await), Code::NotFound);
    server.stop().await.unwrap();

    // A limit lowered while the node was down holds from its start.
    let server = start_server(dir.path(), |config| {
        config.limits.max_stopped_services = 2;
        let keep_none = [("max_stopped_services".to_string(), toml::Value::Integer(0))];
        config.tenants.insert(
            "acme".into(),
            solo::config::TenantConfig {
                limits: Some(solo::config::TenantLimitOverrides(keep_none.into())),
                ..Default::default()
            },
        );
    })
    .await;
    let mut client = grpc_client(&server).await;
    let collected = wait_until(&mut client, "acme", stopped + 2, |e| e.service_id == "c").await;
    assert!(matches!(collected.kind, Some(proto::event::Kind::ServiceRemoved(_))));
    assert_eq!(listed_ids(&mut client, "acme").await, Vec::<String>::new());
    assert_eq!(listed_ids(&mut client, "beta").await, ["x"]);
    // Removed services are gone from the history's present only: the log keeps every event.
    let history = proto::WatchRequest {
        from_seq: 1,
        kinds: vec!["service_removed".into()],
        ..Default::default()
    };
    let mut stream = client.watch(as_tenant("acme", history)).await.unwrap().into_inner();
    let mut removals = Vec::new();
    while removals.len() < 3 {
        let next = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("the history arrives");
        if let Some(Msg::Event(event)) = next.unwrap().unwrap().msg {
            removals.push(event.service_id);
        }
    }
    assert_eq!(removals, ["b", "a", "c"]);
    server.stop().await.unwrap();
}

/// Whether an answer is marked as a replay (a retry with a known idempotency key).
fn replayed<T>(answer: &tonic::Response<T>) -> bool {
    let marker = answer.metadata().get("idempotent-replayed");
    marker.is_some_and(|value| value == "true")
}

/// Asserts that `retry` carries `first`'s message again, marked as a replay; returns it.
#[track_caller]
fn assert_replay<T: PartialEq + std::fmt::Debug>(first: tonic::Response<T>, retry: tonic::Response<T>) -> T {
    assert!(!replayed(&first) && replayed(&retry));
    let first = first.into_inner();
    assert_eq!(retry.into_inner(), first);
    first
}

/// Sends `request` as acme through `client.rpc` twice; the second answer must replay the
/// first, which it returns.
macro_rules! sent_twice {
    ($client:ident . $rpc:ident ($request:expr)) => {{
        let request = $request;
        let first = $client.$rpc(as_tenant("acme", request.clone())).await.unwrap();
        let retry = $client.$rpc(as_tenant("acme", request)).await.unwrap();
        assert_replay(first, retry)
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_deploys_kills_and_removals_with_a_key_append_nothing() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let mut request = grpc_deploy("echo", "echo");
    request.idempotency_key = "agent-retry-1".into();
    // A replayed answer is the original message, marked as a replay in its metadata.
    let first = sent_twice!(client.deploy(request.clone()));
    let kill = proto::KillRequest {
        service_id: "echo".into(),
        idempotency_key: "kill-1".into(),
        ..Default::default()
    };
    let killed = sent_twice!(client.kill(kill.clone()));
    wait_until(&mut client, "acme", killed.seq, |e| {
        matches!(e.kind, Some(proto::event::Kind::ServiceStopped(_)))
    })
    .await;
    let remove = proto::RemoveRequest {
        service_id: "echo".into(),
        idempotency_key: "remove-1".into(),
        ..Default::default()
    };
    let removed = sent_twice!(client.remove(remove.clone()));
    // The same key for another service is a conflict, not a silent answer.
    let mut other = grpc_deploy("other", "echo");
    other.idempotency_key = "agent-retry-1".into();
    assert_eq!(
        client.deploy(as_tenant("acme", other)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    server.stop().await.unwrap();

    // Across a restart too.
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let retry = client.deploy(as_tenant("acme", request)).await.unwrap();
    assert!(replayed(&retry));
    assert_eq!(retry.into_inner(), first);
    let retried = client.kill(as_tenant("acme", kill)).await.unwrap();
    assert!(replayed(&retried));
    assert_eq!(retried.into_inner(), killed);
    let retried = client.remove(as_tenant("acme", remove)).await.unwrap();
    assert!(replayed(&retried));
    assert_eq!(retried.into_inner(), removed);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_one_replays_history_then_follows_live_with_progress_while_idle() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    deploy(&mut client, "acme", "a", "echo").await;
    deploy(&mut client, "acme", "b", "echo").await;

    let request = proto::WatchRequest {
        from_seq: 1,
        progress_interval_ms: 200,
        ..Default::default()
    };
    let mut stream = client.watch(request).await.unwrap().into_inner(); // the admin sees everything
    let mut kinds = Vec::new();
    let mut last = 0;
    while kinds.len() < 5 {
        if let Some(Msg::Event(e)) = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .msg
        {
            assert_eq!(e.seq, last + 1, "in order, each once");
            last = e.seq;
            kinds.push(solo::event::kind_name(&e));
        }
    }
    assert_eq!(kinds[0], "node_started");
    assert_eq!(kinds.iter().filter(|k| **k == "service_deployed").count(), 2);
    // A seq far past the head was never acknowledged here: refused, not waited for.
    let past = proto::WatchRequest {
        from_seq: last + 1000,
        ..Default::default()
    };
    let err = client.watch(past).await.unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument && err.message().contains("this node's log ends at seq"),
        "{err:?}"
    );
    // Live: a new deploy arrives on the same stream.
    let live = deploy(&mut client, "acme", "c", "echo").await;
    let seen = loop {
        if let Some(Msg::Event(e)) = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .msg
            && e.seq == live.seq
        {
            break e;
        }
    };
    assert_eq!(seen.service_id, "c");

    // A watcher whose filter matches nothing still learns how far the log has moved.
    let quiet = proto::WatchRequest {
        from_seq: 1,
        kinds: vec!["shutdown_requested".into()],
        progress_interval_ms: 150,
        ..Default::default()
    };
    let mut quiet = client.watch(quiet).await.unwrap().into_inner();
    let head = client
        .status(as_tenant("acme", proto::StatusRequest { service_id: "c".into() }))
        .await
        .unwrap();
    let head = head.into_inner().last_seq;
    let progressed = loop {
        match tokio::time::timeout(PATIENCE, quiet.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .msg
        {
            Some(Msg::Progress(p)) if p.head_seq >= head => break p.head_seq,
            Some(Msg::Progress(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(progressed >= live.seq);

    // A watch from "now" opens by naming the head, before any event or interval passes, so a
    // client cut off before the next event knows where to resume.
    let now = proto::WatchRequest {
        from_seq: 0,
        progress_interval_ms: 600_000,
        ..Default::default()
    };
    let mut now = client.watch(now).await.unwrap().into_inner();
    let first = tokio::time::timeout(PATIENCE, now.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match first.msg {
        Some(Msg::Progress(p)) => assert!(p.head_seq >= progressed, "{p:?} before {progressed}"),
        other => panic!("a watch from now opened with {other:?}"),
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_a_dropped_watch_under_concurrent_writes_misses_and_repeats_nothing() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let total = 50; // within the default quotas (4 GiB per tenant at 64 MiB each)
    let writer = {
        let mut client = client.clone();
        tokio::spawn(async move {
            for i in 0..total {
                let mut request = grpc_deploy(&format!("s{i}"), "echo");
                request.labels = BTreeMap::from([("n".to_string(), i.to_string())]);
                client.deploy(as_tenant("acme", request)).await.unwrap();
            }
        })
    };
    let mut seqs = Vec::new();
    let mut next = 1;
    let mut reconnects = 0;
    while seqs.len() < total {
        let watch = proto::WatchRequest {
            from_seq: next,
            kinds: vec!["service_deployed".into()],
            ..Default::default()
        };
        let mut stream = client.watch(as_tenant("acme", watch)).await.unwrap().into_inner();
        // Take a few, then drop the stream as a flaky network would.
        for _ in 0..7 {
            match tokio::time::timeout(PATIENCE, stream.next()).await.unwrap() {
                Some(Ok(proto::WatchResponse {
                    msg: Some(Msg::Event(e)),
                })) => {
                    seqs.push(e.seq);
                    next = e.seq + 1;
                }
                Some(Ok(_)) => {}
                other => panic!("the watch broke: {other:?}"),
            }
            if seqs.len() == total {
                break;
            }
        }
        reconnects += 1;
    }
    writer.await.unwrap();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "no event twice");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
    assert!(reconnects > 3);
    // Nothing missed: every deploy in the log is in what was received.
    let all: Vec<u64> = deploys_in_history(&mut client, "acme", total)
        .await
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(all, seqs);
    server.stop().await.unwrap();
}

/// A page of services with many long labels ends short of 4 MiB, which gRPC clients take by
/// default, and its token resumes after the last service sent: paging yields each service once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_page_fits_what_grpc_clients_take_by_default() {
    let dir = tempdir();
    let server = start_server(dir.path(), |config| {
        config.limits.max_services = 1000;
        config.limits.max_deploys_per_minute = u32::MAX;
        config.limits.max_history_mb_per_hour = u64::MAX;
        config.limits.default_memory_mb = 1;
        config.runtime.max_instances = 300;
    })
    .await;
    let mut client = grpc_client(&server).await;
    // Each about 17 KB as listed: 64 labels of 256 bytes.
    let labels: BTreeMap<String, String> = (0..64).map(|i| (format!("label-{i:02}"), "v".repeat(256))).collect();
    let total = 260;
    for i in 0..total {
        let mut request = grpc_deploy(&format!("s{i:03}"), "echo");
        request.labels = labels.clone();
        client.deploy(as_tenant("acme", request)).await.unwrap();
    }
    // A client as generated, with gRPC's default 4 MiB limit on what it receives.
    let mut default_client = proto::solo_kernel_client::SoloKernelClient::new(grpc_channel(&server).await);
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut token = String::new();
    loop {
        let list = proto::ListRequest {
            page_size: 1000,
            page_token: token,
            ..Default::default()
        };
        let page = default_client
            .list(as_tenant("acme", list))
            .await
            .expect("a page")
            .into_inner();
        pages += 1;
        seen.extend(page.services.into_iter().map(|s| s.service_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<String> = (0..total).map(|i| format!("s{i:03}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(pages, 2, "4.5 MB of services take two pages");
    server.stop().await.unwrap();
}

/// List, then Watch from the seq the listing is as of: under concurrent deploys, every service
/// is either in the listing or deployed in the watch, never both, never neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_the_seq_of_a_listing_misses_and_repeats_nothing() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let total = 40;
    let (first_done, first) = tokio::sync::oneshot::channel();
    let writer = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut first_done = Some(first_done);
            for i in 0..total {
                client
                    .deploy(as_tenant("acme", grpc_deploy(&format!("s{i:02}"), "echo")))
                    .await
                    .unwrap();
                if i == 2 {
                    first_done.take().map(|done| done.send(()));
                }
            }
        })
    };
    first.await.unwrap();
    let list = |client: &mut Client| {
        let mut client = client.clone();
        async move {
            let request = proto::ListRequest {
                page_size: 1000,
                ..Default::default()
            };
            client.list(as_tenant("acme", request)).await.unwrap().into_inner()
        }
    };
    let listing = list(&mut client).await;
    let listed: BTreeSet<String> = listing.services.iter().map(|s| s.service_id.clone()).collect();
    // Mid-way as a rule; should the writer have finished first, the watch simply has nothing to add.
    assert!(listed.len() >= 3, "listed after the third deploy: {listed:?}");
    let watch = proto::WatchRequest {
        from_seq: listing.head_seq + 1,
        kinds: vec!["service_deployed".into()],
        ..Default::default()
    };
    let mut stream = client.watch(as_tenant("acme", watch)).await.unwrap().into_inner();
    let mut watched = BTreeSet::new();
    while listed.len() + watched.len() < total {
        match tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("events arrive")
        {
            Some(Ok(proto::WatchResponse {
                msg: Some(Msg::Event(event)),
            })) => {
                assert!(event.seq > listing.head_seq);
                assert!(
                    !listed.contains(&event.service_id),
                    "{} was listed and then watched deployed",
                    event.service_id
                );
                assert!(watched.insert(event.service_id.clone()), "{} twice", event.service_id);
            }
            Some(Ok(_)) => {}
            other => panic!("the watch broke: {other:?}"),
        }
    }
    writer.await.unwrap();
    let everything: BTreeSet<String> = list(&mut client)
        .await
        .services
        .into_iter()
        .map(|s| s.service_id)
        .collect();
    assert_eq!(everything, listed.union(&watched).cloned().collect());
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_watchers_each_receive_every_event() {
    let dir = tempdir();
    let server = start_server(dir.path(), |config| config.limits.max_watchers = 500).await;
    let client = grpc_client(&server).await;
    let events = 40u64;
    let start = client
        .clone()
        .status(as_tenant("acme", proto::StatusRequest { service_id: "x".into() }))
        .await;
    assert_eq!(start.unwrap_err().code(), Code::NotFound);
    let mut watchers = Vec::new();
    for _ in 0..200 {
        let mut client = client.clone();
        let watch = proto::WatchRequest {
            from_seq: 2,
            kinds: vec!["service_deployed".into()],
            ..Default::default()
        };
        let mut stream = client.watch(as_tenant("acme", watch)).await.unwrap().into_inner();
        watchers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while (got.len() as u64) < events {
                if let Some(Msg::Event(e)) = stream.next().await.unwrap().unwrap().msg {
                    got.push(e.service_id);
                }
            }
            got
        }));
    }
    let mut writer = client.clone();
    for i in 0..events {
        deploy(&mut writer, "acme", &format!("s{i}"), "echo").await;
    }
    let expected: Vec<String> = (0..events).map(|i| format!("s{i}")).collect();
    for watcher in watchers {
        assert_eq!(
            tokio::time::timeout(PATIENCE, watcher).await.unwrap().unwrap(),
            expected
        );
    }
    server.stop().await.unwrap();
}

/// Watchers share each event's encoding: each watcher, following live or replaying the
/// history, admin or tenant, gets every event whole (the very deploy it records, labels and
/// module hash included) and the same message as every other watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watcher_gets_each_event_whole_live_or_replayed() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let client = grpc_client(&server).await;
    let services = 12;
    let live_admin = watch_deploys(&client, "", 0, services).await;
    let live_tenant = watch_deploys(&client, "acme", 0, services).await;
    let mut answers = Vec::new();
    for i in 0..services {
        let mut request = grpc_deploy(&format!("s{i}"), "echo");
        request.labels = BTreeMap::from([("n".to_string(), i.to_string())]);
        let answer = client.clone().deploy(as_tenant("acme", request)).await.unwrap();
        answers.push(answer.into_inner());
    }
    let replayed = watch_deploys(&client, "acme", 1, services).await.await.unwrap();
    assert_eq!(live_admin.await.unwrap(), replayed);
    assert_eq!(live_tenant.await.unwrap(), replayed);
    for (i, (event, answer)) in replayed.iter().zip(&answers).enumerate() {
        assert_eq!((event.seq, event.tenant.as_str()), (answer.seq, "acme"));
        assert_eq!(event.service_id, format!("s{i}"));
        let Some(proto::event::Kind::ServiceDeployed(deployed)) = &event.kind else {
            panic!("a deploy: {event:?}");
        };
        assert_eq!(deployed.module_sha256, answer.module_sha256);
        assert_eq!(deployed.labels, BTreeMap::from([("n".to_string(), i.to_string())]));
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_watch_never_carries_another_tenants_events() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let watch = proto::WatchRequest {
        from_seq: 1,
        ..Default::default()
    };
    let mut alice = client.watch(as_tenant("alice", watch)).await.unwrap().into_inner();
    let mut writer = client.clone();
    for i in 0..5 {
        deploy(&mut writer, "bob", &format!("b{i}"), "echo").await;
        deploy(&mut writer, "alice", &format!("a{i}"), "echo").await;
    }
    let mut seen = 0;
    while seen < 10 {
        // 5 deploys and 5 starts of alice's, interleaved with bob's that must not show.
        if let Some(Msg::Event(e)) = tokio::time::timeout(PATIENCE, alice.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .msg
        {
            assert_eq!(e.tenant, "alice", "{e:?}");
            seen += 1;
        }
    }
    // Another tenant's service does not exist for alice, whatever she tries.
    let status = client
        .status(as_tenant(
            "alice",
            proto::StatusRequest {
                service_id: "b0".into(),
            },
        ))
        .await;
    assert_eq!(status.unwrap_err().code(), Code::NotFound);
    server.stop().await.unwrap();
}

/// Backup streams the data file's copy to the admin, then its SHA-256; the bytes are a data
/// directory that verifies and holds the log up to the head. A tenant may not take one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_streams_a_verified_copy_to_the_admin_only() {
    use sha2::Digest as _;
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let deployed = deploy(&mut client, "acme", "echo", "echo").await;
    running(&mut client, "acme", "echo", deployed.seq).await;

    let refused = client
        .backup(as_tenant("acme", proto::BackupRequest {}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    let mut pieces = client.backup(proto::BackupRequest {}).await.unwrap().into_inner();
    let (mut bytes, mut sent) = (Vec::new(), None);
    while let Some(piece) = tokio::time::timeout(PATIENCE, pieces.next())
        .await
        .expect("the backup streams")
    {
        let piece = piece.unwrap();
        assert!(sent.is_none(), "nothing follows the SHA-256");
        assert!(piece.data.len() <= 1 << 20, "pieces fit clients' default message size");
        if piece.sha256.is_empty() {
            bytes.extend_from_slice(&piece.data);
        } else {
            assert!(piece.data.is_empty());
            sent = Some(piece.sha256);
        }
    }
    assert_eq!(
        sent.as_deref(),
        Some(hex::encode(sha2::Sha256::digest(&bytes)).as_str())
    );

    let verified = verify_backup(&bytes);
    assert!(verified.ok(), "{}", verified.summary());
    let listed = client.list(proto::ListRequest::default()).await.unwrap().into_inner();
    assert!(
        verified.head > deployed.seq,
        "the deploy and its start: {}",
        verified.summary()
    );
    assert!(verified.head <= listed.head_seq);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_streams_and_a_restart_brings_the_services_back() {
    let dir = tempdir();
    let (admin_token, admin_hash) = solo::api::auth::new_token().unwrap();
    let (acme_token, acme_hash) = solo::api::auth::new_token().unwrap();
    let tokens = move |config: &mut solo::config::Config| {
        config.security.admin_token_sha256 = vec![admin_hash.clone()];
        config.tenants.insert(
            "acme".into(),
            solo::config::TenantConfig {
                token_sha256: vec![acme_hash.clone()],
                limits: None,
            },
        );
    };
    let server = start_server(dir.path(), tokens.clone()).await;
    let mut client = grpc_client(&server).await;
    let deployed = client
        .deploy(with_token(&acme_token, grpc_deploy("counter", "counter")))
        .await
        .unwrap()
        .into_inner();
    let watch = proto::WatchRequest {
        from_seq: deployed.seq,
        ..Default::default()
    };
    let mut stream = client.watch(with_token(&acme_token, watch)).await.unwrap().into_inner();
    loop {
        let item = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(Msg::Event(e)) = item.msg
            && solo::event::kind_name(&e) == "service_started"
        {
            break;
        }
    }
    // Without credentials, or with the wrong ones, nothing.
    let status = || proto::StatusRequest {
        service_id: "counter".into(),
    };
    assert_eq!(client.status(status()).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(
        client.status(with_token("nope", status())).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        client
            .shutdown(with_token(&acme_token, proto::ShutdownRequest::default()))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    let shutdown = client
        .shutdown(with_token(&admin_token, proto::ShutdownRequest { grace_ms: 2000 }))
        .await
        .unwrap();
    assert!(shutdown.into_inner().seq > deployed.seq);
    let end = loop {
        match tokio::time::timeout(PATIENCE, stream.next()).await.unwrap() {
            Some(Ok(_)) => {}
            Some(Err(status)) => break status,
            None => panic!("the stream ended without a status"),
        }
    };
    assert_eq!(end.code(), Code::Unavailable);
    assert!(end.message().contains("shutting down"), "{}", end.message());
    tokio::time::timeout(PATIENCE, server.stopped()).await.unwrap().unwrap();

    let server = start_server(dir.path(), tokens).await;
    let mut client = grpc_client(&server).await;
    // The node serves while its services come back; until its start is recorded, the service
    // shows its last recorded status.
    let came_back = async {
        loop {
            let status = client
                .status(with_token(&acme_token, status()))
                .await
                .unwrap()
                .into_inner();
            if status.status == "running" {
                return status;
            }
            assert_eq!(status.status, "stopped", "as the shutdown left it");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let status = tokio::time::timeout(PATIENCE, came_back)
        .await
        .expect("the service came back with the node");
    assert_eq!(status.version, 1);
    let call = proto::CallRequest {
        service_id: "counter".into(),
        ..Default::default()
    };
    assert_eq!(
        client
            .call(with_token(&acme_token, call))
            .await
            .unwrap()
            .into_inner()
            .payload,
        b"1"
    );
    server.stop().await.unwrap();
}

/// The node's `/health` document.
async fn health_of(server: &solo::server::Server) -> serde_json::Value {
    let reply = reqwest::get(format!("{}/health", server.http_url())).await.unwrap();
    reply.json().await.unwrap()
}

/// The node serves while the services that come back with it compile: a deploy is
/// acknowledged and a call waits for its service; `node_started` follows once all are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_node_serves_while_its_services_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let slow = 6;
    for tag in 0..slow {
        let request = proto::DeployRequest {
            service_id: format!("s{tag}"),
            module: Some(proto::deploy_request::Module::Wat(slow_to_compile_wat(tag))),
            ..Default::default()
        };
        client.deploy(as_tenant("acme", request)).await.unwrap();
    }
    for tag in 0..slow {
        running(&mut client, "acme", &format!("s{tag}"), 1).await;
    }
    server.stop().await.unwrap();

    // Each module compiles afresh in the new process, a good fraction of a second each.
    let server = start_server(dir.path(), |_| {}).await;
    let health = health_of(&server).await;
    assert_eq!(health["status"], "ok", "{health}");
    assert!(health["services_recovering"].as_u64().unwrap() > 0, "{health}");
    let mut client = grpc_client(&server).await;
    let deployed = client
        .deploy(as_tenant("beta", grpc_deploy("quick", "echo")))
        .await
        .unwrap()
        .into_inner();
    let call = proto::CallRequest {
        service_id: format!("s{}", slow - 1),
        payload: b"still here".to_vec(),
        timeout_ms: 60_000,
    };
    let answer = client.call(as_tenant("acme", call)).await.unwrap().into_inner();
    assert_eq!(answer.payload, b"still here", "the call waited for its service");

    let node_started = wait_until(&mut client, "", deployed.seq, |e| {
        matches!(e.kind, Some(proto::event::Kind::NodeStarted(_)))
    })
    .await;
    assert!(node_started.seq > deployed.seq, "recorded once the services were back");
    let Some(proto::event::Kind::NodeStarted(recovery)) = &node_started.kind else {
        panic!("{node_started:?}")
    };
    assert_eq!(recovery.recovered.len(), slow);
    let health = health_of(&server).await;
    assert_eq!(health["services_recovering"], 0, "{health}");
    assert_eq!(health["services_running"], slow + 1, "{health}");
    server.stop().await.unwrap();
}

/// A service whose `solo_init` spins while the clock is within [from_ms, until_ms): a start
/// inside that window is slow, one before it is quick.
fn slow_to_start_within(from_ms: u64, until_ms: u64) -> proto::DeployRequest {
    let wat = format!(
        r#"(module
            (import "solo" "now_ms" (func $now (result i64)))
            (memory (export "memory") 1)
            (func (export "solo_init") (result i32)
                (block $ready
                    (loop $spin
                        (br_if $ready (i64.lt_u (call $now) (i64.const {from_ms})))
                        (br_if $ready (i64.ge_u (call $now) (i64.const {until_ms})))
                        (br $spin)))
                (i32.const 0))
            (func (export "solo_alloc") (param i32) (result i32) (i32.const 0))
            (func (export "solo_handle") (param i32 i32) (result i64) (i64.const 0)))"#
    );
    proto::DeployRequest {
        service_id: "a-slow".into(),
        module: Some(proto::deploy_request::Module::Wat(wat)),
        limits: Some(proto::Limits {
            cpu_ms_per_call: 30_000,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `/health` counts the services still coming back, each leaving the count as its start ends,
/// whatever the order they were listed in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_recovering_counts_only_the_starts_still_under_way() {
    let dir = tempfile::tempdir().unwrap();
    // The slow start spins through its window, well within its start timeout.
    let patient = |c: &mut solo::config::Config| c.runtime.start_timeout_ms = 60_000;
    let server = start_server(dir.path(), patient).await;
    let mut client = grpc_client(&server).await;
    let now = || {
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        since_epoch.unwrap().as_millis() as u64
    };
    let (from_ms, until_ms) = (now() + 3_000, now() + 15_000);
    // Slow to come back; its first start was quick.
    let slow = client
        .deploy(as_tenant("acme", slow_to_start_within(from_ms, until_ms)))
        .await
        .unwrap()
        .into_inner();
    running(&mut client, "acme", "a-slow", slow.seq).await;
    // Quick to come back, listed before or after it (the registry keeps no order).
    let quick: Vec<String> = (0..10).map(|i| format!("echo{i}")).collect();
    let mut last = slow.seq;
    for id in &quick {
        let deployed = client.deploy(as_tenant("acme", grpc_deploy(id, "echo"))).await.unwrap();
        last = deployed.into_inner().seq;
        running(&mut client, "acme", id, last).await;
    }
    server.stop().await.unwrap();
    while now() < from_ms {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let server = start_server(dir.path(), patient).await;
    let mut client = grpc_client(&server).await;
    for id in &quick {
        let call = proto::CallRequest {
            service_id: id.clone(),
            payload: b"back".to_vec(),
            timeout_ms: 30_000,
        };
        client.call(as_tenant("acme", call)).await.unwrap();
    }
    // A start leaves the count as its instance comes up; no service counts twice meanwhile.
    let total = quick.len() as u64 + 1;
    let mut health = health_of(&server).await;
    while health["services_recovering"].as_u64() > Some(1) && now() < until_ms {
        let counted = health["services_running"].as_u64().unwrap() + health["services_recovering"].as_u64().unwrap();
        assert!(counted <= total, "{health}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        health = health_of(&server).await;
    }
    assert_eq!(health["services_recovering"], 1, "{health}");
    assert!(
        now() < until_ms,
        "the slow start ended before the quick ones were counted out"
    );
    let node_started = wait_until(&mut client, "", last + 1, |e| {
        matches!(e.kind, Some(proto::event::Kind::NodeStarted(_)))
    })
    .await;
    let Some(proto::event::Kind::NodeStarted(recovery)) = &node_started.kind else {
        panic!("{node_started:?}")
    };
    assert_eq!(recovery.recovered.len(), quick.len() + 1);
    assert_eq!(health_of(&server).await["services_recovering"], 0);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let channel = grpc_channel(&server).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check = tonic_health::pb::HealthCheckRequest {
        service: "solo.v1.SoloKernel".into(),
    };
    assert_eq!(
        health.check(check).await.unwrap().into_inner().status(),
        ServingStatus::Serving
    );

    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut reflect = async |request: MessageRequest| {
        let request = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut responses = reflection
            .server_reflection_info(futures_util::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        responses.next().await.unwrap().unwrap().message_response
    };
    let response = reflect(MessageRequest::ListServices(String::new())).await;
    let Some(MessageResponse::ListServicesResponse(list)) = response else {
        panic!("{response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in ["solo.v1.SoloKernel", "grpc.health.v1.Health"] {
        assert!(names.contains(&name.to_string()), "{name} in {names:?}");
    }
    // The health service's schema is there too, for clients that build requests from it.
    let response = reflect(MessageRequest::FileContainingSymbol("grpc.health.v1.Health".into())).await;
    assert!(
        matches!(response, Some(MessageResponse::FileDescriptorResponse(_))),
        "{response:?}"
    );

    // The older protocol, the only one some language runtimes speak.
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
    let mut alpha = tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let mut responses = alpha
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(AlphaResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}")
    };
    assert!(list.service.iter().any(|s| s.name == "solo.v1.SoloKernel"), "{list:?}");
    server.stop().await.unwrap();
}

/// A status's message must fit the `grpc-message` header of any client.
#[track_caller]
fn assert_bounded(status: &tonic::Status) {
    assert!(status.message().len() <= 1024, "{} bytes", status.message().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_quoting_long_input_are_cut_to_fit_a_header() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;

    // A long id is abbreviated, so the rule after it survives.
    let deploy = proto::DeployRequest {
        service_id: "a".repeat(20_000),
        ..grpc_deploy("", "echo")
    };
    let status = client.deploy(as_tenant("acme", deploy)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_bounded(&status);
    assert!(
        status.message().contains("invalid service id 'aaaa") && status.message().contains("use 1 to 128 characters"),
        "{status:?}"
    );
    let status = client
        .status(as_tenant(
            "acme",
            proto::StatusRequest {
                service_id: "b".repeat(20_000),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_bounded(&status);

    // A WAT error quotes its line: one of 20 KB, of two-byte chars, is cut at a char boundary.
    let wat = format!(
        "(module (func (export \"f\") (result i32) (i32.const 1) {}))",
        "é".repeat(10_000)
    );
    let deploy = proto::DeployRequest {
        service_id: "wat".into(),
        module: Some(proto::deploy_request::Module::Wat(wat)),
        ..Default::default()
    };
    let status = client.deploy(as_tenant("acme", deploy)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_bounded(&status);
    assert!(
        status.message().contains("WAT syntax error") && status.message().contains("… (message cut; it was"),
        "{status:?}"
    );
    server.stop().await.unwrap();
}

/// Sends raw bytes as the request message of `method`: what a broken or hostile client sends.
async fn raw_unary(server: &solo::server::Server, method: &'static str, message: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(grpc_channel(server).await);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(method);
    let reply: Result<tonic::Response<Vec<u8>>, _> = grpc.unary(as_tenant("acme", message), path, RawCodec).await;
    reply.unwrap_err()
}

/// A codec of bytes as they are, both ways.
#[derive(Debug, Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = prost::bytes::Buf::copy_to_bytes(src, prost::bytes::Buf::remaining(src));
        Ok(Some(bytes.to_vec()))
    }
}

/// Metadata of a few tens of KiB is served; more is refused for that call alone, and other
/// calls on the same connection go on: hyper's default had the first refused and the second
/// close the connection, a Watch on it included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_metadata_is_refused_for_its_call_alone() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let padded = |bytes: usize| {
        let mut request = as_tenant(
            "acme",
            proto::StatusRequest {
                service_id: "nothing".into(),
            },
        );
        let pad = "p".repeat(bytes).parse().unwrap();
        request.metadata_mut().insert("x-padding", pad);
        request
    };
    let watch = proto::WatchRequest {
        kinds: vec!["service_deployed".into()],
        ..Default::default()
    };
    let mut watch = client.watch(as_tenant("acme", watch)).await.unwrap().into_inner();
    // 40 KB: reaches its handler, which answers for the service it names.
    let status = client.status(padded(40_000)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    // 100 KB: refused, alone.
    let status = client.status(padded(100_000)).await.unwrap_err();
    assert_ne!(status.code(), Code::NotFound, "{status:?}");
    let deployed = deploy(&mut client, "acme", "after", "echo").await;
    let event = loop {
        let next = tokio::time::timeout(PATIENCE, watch.next())
            .await
            .expect("the watch goes on")
            .expect("the stream is open")
            .expect("the watch is not cut off");
        if let Some(Msg::Event(event)) = next.msg {
            break event;
        }
    };
    assert_eq!(event.seq, deployed.seq);
    server.stop().await.unwrap();
}

/// A stream ends when the client's deadline (`grpc-timeout`) passes, as a server is to end a
/// call whose deadline passed: a Watch is not left open for a client that gave up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_at_its_deadline() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let mut request = as_tenant("acme", proto::WatchRequest::default());
    request.set_timeout(Duration::from_millis(300));
    let mut stream = client.watch(request).await.unwrap().into_inner();
    let end = async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return status,
                None => panic!("the watch ended without a status"),
            }
        }
    };
    let ended = tokio::time::timeout(PATIENCE, end)
        .await
        .expect("the watch ends at its deadline");
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert!(ended.message().contains("grpc-timeout"), "{ended:?}");
    server.stop().await.unwrap();
}

/// Clients set to compress their requests (a whole channel, as grpcio and grpc-js allow) are
/// served, gzip or deflate, where the operator takes them; one whose message inflates past the
/// limit is refused as over it. By default they are refused: a tenant's few KiB could make the
/// node inflate megabytes on the threads that serve every tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_requests_are_served_within_the_size_limit_where_taken() {
    use tonic::codec::CompressionEncoding;
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = proto::solo_kernel_client::SoloKernelClient::new(grpc_channel(&server).await)
        .send_compressed(CompressionEncoding::Gzip);
    let refused = client
        .deploy(as_tenant("acme", grpc_deploy("zipped", "echo")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    // Saying what to do about it, to the client and to the operator.
    assert!(
        refused.message().contains("`gzip`") && refused.message().contains("grpc_accept_compressed = true"),
        "{refused:?}"
    );
    assert_eq!(refused.metadata().get("solo-error").unwrap(), "not_implemented");
    server.stop().await.unwrap();

    let dir = tempdir();
    let server = start_server(dir.path(), |config| {
        config.solo.max_request_bytes = 1 << 20;
        config.solo.grpc_accept_compressed = true;
    })
    .await;
    let channel = grpc_channel(&server).await;
    for (encoding, id) in [
        (CompressionEncoding::Gzip, "zipped"),
        (CompressionEncoding::Deflate, "deflated"),
    ] {
        let mut client = proto::solo_kernel_client::SoloKernelClient::new(channel.clone()).send_compressed(encoding);
        let deployed = client.deploy(as_tenant("acme", grpc_deploy(id, "echo"))).await.unwrap();
        assert!(deployed.into_inner().created, "{encoding:?}");
        let status = proto::StatusRequest { service_id: id.into() };
        let status = client.status(as_tenant("acme", status)).await.unwrap().into_inner();
        assert_eq!(status.service_id, id);
        // A few KiB on the wire, 2 MiB once inflated.
        let mut bomb = grpc_deploy("bomb", "echo");
        bomb.labels = BTreeMap::from([("padding".to_string(), " ".repeat(2 << 20))]);
        let refused = client.deploy(as_tenant("acme", bomb)).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{encoding:?}: {refused:?}");
        assert!(
            refused.message().contains("1048576 bytes (max_request_bytes)"),
            "{refused:?}"
        );
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_is_not_protobuf_is_invalid_argument() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let cases: [(&str, Vec<u8>); 3] = [
        ("a string field of invalid UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
        ("a field cut short", vec![0x0a, 0x05, b'a']),
        ("garbage", vec![0xff; 16]),
    ];
    for (what, bytes) in cases {
        let status = raw_unary(&server, "/solo.v1.SoloKernel/Status", bytes).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains("the request is not a valid protobuf message"),
            "{what}: {status:?}"
        );
        assert_eq!(status.metadata().get("solo-error").unwrap(), "invalid_argument");
    }
    // The same client with a well-formed message reaches the handler.
    let status = raw_unary(&server, "/solo.v1.SoloKernel/Status", vec![0x0a, 0x01, b'x']).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonics_refusals_say_what_was_wrong_with_the_right_code() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| c.solo.grpc_accept_compressed = true).await;
    let http = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    // A gRPC request by hand to `path` (`package.Service/Method`).
    let post = |path: &str| {
        http.post(format!("{}/{path}", server.grpc_url()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
    };
    let raw = |method: &str, body: Vec<u8>| {
        post(&format!("solo.v1.SoloKernel/{method}"))
            .header("x-tenant-id", "a")
            .body(body)
            .send()
    };
    let status_of = |body: Vec<u8>| raw("Status", body);
    // `Status { service_id: "x" }` is 0x0a 0x01 'x'.
    let cases: [(&str, Vec<u8>); 4] = [
        ("compressed, without an encoding", vec![1, 0, 0, 0, 3, 0x0a, 1, b'x']),
        ("a prefix longer than the body", vec![0, 0, 0, 0, 9, 0x0a, 1, b'x']),
        ("a prefix cut short", vec![0, 0, 0]),
        ("no message at all", vec![]),
    ];
    for (what, body) in cases {
        let reply = status_of(body).await.unwrap();
        let header = |name: &str| reply.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(
            header("grpc-status").as_deref(),
            Some("3"),
            "{what}: {:?}",
            reply.headers()
        );
        assert!(header("grpc-message").unwrap().contains("well-framed"), "{what}");
    }
    // A method the service lacks is named.
    let reply = raw("Frobnicate", vec![0, 0, 0, 0, 0]).await.unwrap();
    assert_eq!(reply.headers()["grpc-status"], "12");
    assert_eq!(reply.headers()["solo-error"], "method_not_allowed");
    let message = reply.headers()["grpc-message"].to_str().unwrap();
    assert!(
        message.contains("Frobnicate") && message.contains("reflection"),
        "{message}"
    );
    // As on the health and reflection services.
    for path in [
        "grpc.health.v1.Health/Frobnicate",
        "grpc.reflection.v1.ServerReflection/Frobnicate",
    ] {
        let reply = post(path).body(vec![0, 0, 0, 0, 0]).send().await.unwrap();
        assert_eq!(reply.headers()["grpc-status"], "12", "{path}");
        let message = reply.headers()["grpc-message"].to_str().unwrap();
        assert!(message.contains(&format!("/{path} is not a method")), "{message}");
    }
    // So is a service the node does not serve, or a path that names none, with the services
    // it does serve.
    for (path, named) in [("foo.Bar/Baz", "'foo.Bar'"), ("", "'/' names no gRPC service")] {
        let reply = post(path).body(vec![0, 0, 0, 0, 0]).send().await.unwrap();
        assert_eq!(reply.headers()["grpc-status"], "12", "{path}");
        let message = reply.headers()["grpc-message"].to_str().unwrap();
        assert!(
            message.contains(named) && message.contains("solo.v1.SoloKernel"),
            "{message}"
        );
    }
    // A message in an encoding the node lacks is refused for its encoding, not as a missing
    // method.
    let reply = post("solo.v1.SoloKernel/Status")
        .header("grpc-encoding", "zstd")
        .body(vec![1, 0, 0, 0, 3, 0x0a, 1, b'x'])
        .send()
        .await
        .unwrap();
    assert_eq!(reply.headers()["grpc-status"], "12");
    // Encoded as the gRPC spec does: only `%` and what is not printable ASCII is escaped
    // (grpc-js would show tonic's %60 for the backquote as it is).
    let message = reply.headers()["grpc-message"].to_str().unwrap();
    assert_eq!(
        message,
        "the request is compressed with `zstd`, which this node does not take: send it uncompressed or \
         compressed with gzip or deflate"
    );
    let accepted = reply.headers()["grpc-accept-encoding"].to_str().unwrap();
    assert!(accepted.contains("gzip") && accepted.contains("deflate"), "{accepted}");
    // One that says gzip but is not is the client's mistake.
    let reply = post("solo.v1.SoloKernel/Status")
        .header("x-tenant-id", "a")
        .header("grpc-encoding", "gzip")
        .body(vec![1, 0, 0, 0, 3, 0x0a, 1, b'x'])
        .send()
        .await
        .unwrap();
    assert_eq!(reply.headers()["grpc-status"], "3");
    let message = reply.headers()["grpc-message"].to_str().unwrap();
    assert!(
        message.contains("well-framed") && message.contains("decompressing"),
        "{message}"
    );
    // A well-framed request goes on to its handler's answer.
    let reply = status_of(vec![0, 0, 0, 0, 3, 0x0a, 1, b'x']).await.unwrap();
    let trailers_or_headers = reply.headers().get("grpc-status").cloned();
    assert_eq!(trailers_or_headers.unwrap(), "5", "NOT_FOUND: no service 'x'");
    // Only gRPC is read as gRPC: another content type is 415, as the gRPC spec asks.
    for content_type in [
        Some("application/json"),
        Some("application/grpc-web"),
        Some("text/plain"),
        None,
    ] {
        let mut request = http
            .post(format!("{}/solo.v1.SoloKernel/Status", server.grpc_url()))
            .header("te", "trailers")
            .header("x-tenant-id", "a");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let reply = request.body(vec![0, 0, 0, 0, 3, 0x0a, 1, b'x']).send().await.unwrap();
        assert_eq!(reply.status(), 415, "{content_type:?}");
        assert!(
            reply.text().await.unwrap().contains("application/grpc"),
            "{content_type:?}"
        );
    }
    for content_type in ["application/grpc+proto", "Application/GRPC"] {
        let reply = http
            .post(format!("{}/solo.v1.SoloKernel/Status", server.grpc_url()))
            .header("content-type", content_type)
            .header("te", "trailers")
            .header("x-tenant-id", "a")
            .body(vec![0, 0, 0, 0, 3, 0x0a, 1, b'x'])
            .send()
            .await
            .unwrap();
        assert_eq!(reply.headers()["grpc-status"], "5", "{content_type}");
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_is_resource_exhausted_and_names_it() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| c.solo.max_request_bytes = 4096).await;
    let mut client = grpc_client(&server).await;
    let call = |payload: Vec<u8>| proto::CallRequest {
        service_id: "absent".into(),
        payload,
        timeout_ms: 0,
    };
    let status = client.call(as_tenant("acme", call(vec![7; 8000]))).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limit of 4096 bytes"), "{status:?}");
    // Under the limit, the usual answer; the connection is still good.
    let status = client.call(as_tenant("acme", call(vec![7; 100]))).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasm_field_that_is_not_wasm_is_refused_with_a_hint() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let mut client = grpc_client(&server).await;
    let deploy = |wasm: &[u8]| proto::DeployRequest {
        service_id: "svc".into(),
        module: Some(proto::deploy_request::Module::Wasm(wasm.to_vec())),
        ..Default::default()
    };
    for (body, detail) in [(&b"hello"[..], "these 5 bytes do not"), (b"", "it is empty")] {
        let status = client.deploy(as_tenant("acme", deploy(body))).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let message = status.message();
        assert!(
            message.contains("`wasm` field is not a wasm binary")
                && message.contains("\\0asm")
                && message.contains(detail)
                && message.contains("the `wat` field"),
            "{status:?}"
        );
    }
    // WAT text sent as binary is refused the same way; a real binary deploys.
    let wat = String::from_utf8(example("echo").to_vec()).unwrap();
    let status = client
        .deploy(as_tenant("acme", deploy(wat.as_bytes())))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let binary = wat::parse_str(&wat).unwrap();
    let created = client
        .deploy(as_tenant("acme", deploy(&binary)))
        .await
        .unwrap()
        .into_inner();
    assert!(created.created);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holds_at_most_its_stream_limit_and_its_further_calls_wait() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start_server(dir.path(), |c| c.solo.max_streams_per_connection = 2).await;
    let mut client = grpc_client(&server).await;
    let open_watch = |client: &mut Client| {
        let mut client = client.clone();
        async move {
            let watch = proto::WatchRequest::default();
            client.watch(as_tenant("a", watch)).await.unwrap().into_inner()
        }
    };
    let first = open_watch(&mut client).await;
    let _second = open_watch(&mut client).await;
    let list = |client: &mut Client| {
        let mut client = client.clone();
        async move { client.list(as_tenant("a", proto::ListRequest::default())).await }
    };
    // A third stream on the same connection waits for one of the two to end.
    let mut third = tokio::spawn(list(&mut client));
    let waited = tokio::time::timeout(Duration::from_millis(300), &mut third).await;
    assert!(waited.is_err(), "a third stream was served at once: {waited:?}");
    // Another connection is not held up by this one's streams.
    let mut other = grpc_client(&server).await;
    tokio::time::timeout(PATIENCE, list(&mut other))
        .await
        .expect("another connection is served")
        .unwrap();
    drop(first);
    tokio::time::timeout(PATIENCE, third)
        .await
        .expect("the waiting call goes ahead once a stream ends")
        .unwrap()
        .unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_address_cannot_take_every_grpc_connection() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start_server(dir.path(), |c| c.solo.max_connections_per_client = 2).await;
    let address = server.grpc_url().trim_start_matches("http://").to_string();
    let first = tokio::net::TcpStream::connect(&address).await.unwrap();
    let second = tokio::net::TcpStream::connect(&address).await.unwrap();
    // A third connection from the same address is closed before HTTP/2 starts.
    let refused = tonic::transport::Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .map(solo::proto::solo_kernel_client::SoloKernelClient::new);
    let failed = match refused {
        Err(_) => true,
        Ok(mut client) => client
            .list(as_tenant("a", proto::ListRequest::default()))
            .await
            .is_err(),
    };
    assert!(failed, "a third connection was served");
    // Once one closes, the address may connect again.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut client = grpc_client(&server).await;
        if client.list(as_tenant("a", proto::ListRequest::default())).await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the closed connection was never counted out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(second);
    server.stop().await.unwrap();
}

/// Reads until the node closes the connection; `None` if it is still open after `within`.
async fn closed_within(connection: &mut tokio::net::TcpStream, within: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt as _;
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(within, connection.read_to_end(&mut sink))
        .await
        .ok()
        .map(|_| started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_speaks_is_closed_and_holds_no_shutdown() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start_server(dir.path(), |c| {
        c.solo.http_header_timeout_ms = 300;
        c.solo.shutdown_grace_ms = 60_000;
    })
    .await;
    let address = server.grpc_url().trim_start_matches("http://").to_string();
    // A client pool's spare connection, dialled and never used, is closed after the timeout,
    // and so is one that stopped halfway through the HTTP/2 preface...
    let opened = std::time::Instant::now();
    let mut spare = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut half_open = tokio::net::TcpStream::connect(&address).await.unwrap();
    {
        use tokio::io::AsyncWriteExt as _;
        half_open.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    }
    for connection in [&mut spare, &mut half_open] {
        let closed = closed_within(connection, Duration::from_secs(20)).await;
        assert!(closed.is_some(), "a connection that never opened stays open");
    }
    let closed = opened.elapsed();
    assert!(closed >= Duration::from_millis(250), "closed after {closed:?}");
    // ...and one still silent when the node stops is closed at once, not after the grace.
    let mut silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    stop_closing(server, &mut silent, Duration::from_secs(20)).await;
}

/// An HTTP/2 client's hello: the preface and an empty SETTINGS frame.
const HTTP2_HELLO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// Stops a node that serves a call meanwhile, within `bound`, and sees `open` closed.
async fn stop_closing(server: solo::server::Server, open: &mut tokio::net::TcpStream, bound: Duration) {
    let mut client = grpc_client(&server).await;
    client
        .list(as_tenant("a", proto::ListRequest::default()))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    server.stop().await.unwrap();
    let stopped = started.elapsed();
    assert!(stopped < bound, "the node took {stopped:?} to stop");
    assert!(closed_within(open, Duration::from_secs(5)).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ignores_the_shutdown_is_cut_when_the_grace_is_over() {
    use tokio::io::AsyncWriteExt as _;
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start_server(dir.path(), |c| c.solo.shutdown_grace_ms = 500).await;
    let address = server.grpc_url().trim_start_matches("http://").to_string();
    // An HTTP/2 client that opens its connection, then answers neither GOAWAY nor ping.
    let mut deaf = tokio::net::TcpStream::connect(&address).await.unwrap();
    deaf.write_all(HTTP2_HELLO).await.unwrap();
    // It held the node for the grace, not past it (waiting for it to let go took seconds more).
    stop_closing(server, &mut deaf, Duration::from_secs(4)).await;
}

/// A call still under way when the shutdown's grace runs out is answered `UNAVAILABLE`, saying
/// the node is shutting down, before its connection closes: the answer, not a broken
/// connection. (Its request counts as ended a moment before the answer's last bytes are out,
/// and the connection, with nothing else open, was closed in that moment.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_shutdown_cuts_off_is_answered_unavailable() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| c.solo.shutdown_grace_ms = 2_000).await;
    let mut client = grpc_client(&server).await;
    let mut spin = grpc_deploy("spin", "spin");
    spin.limits = Some(proto::Limits {
        call_timeout_ms: 20_000,
        cpu_ms_per_call: 20_000,
        ..Default::default()
    });
    let deployed = client.deploy(as_tenant("acme", spin)).await.unwrap().into_inner();
    running(&mut client, "acme", "spin", deployed.seq).await;
    // On a connection of its own, as a client that makes one call would.
    let mut caller = grpc_client(&server).await;
    let call = tokio::spawn(async move {
        let request = proto::CallRequest {
            service_id: "spin".into(),
            payload: b"15000".to_vec(),
            timeout_ms: 0,
        };
        caller.call(as_tenant("acme", request)).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.shutdown(proto::ShutdownRequest::default()).await.unwrap();
    let cut_off = tokio::time::timeout(PATIENCE, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(cut_off.code(), Code::Unavailable, "{cut_off:?}");
    assert!(cut_off.message().contains("shutting down"), "{cut_off:?}");
    assert_eq!(
        cut_off.metadata().get("solo-error").map(|v| v.to_str().unwrap()),
        Some("shutting_down"),
        "{cut_off:?}"
    );
    tokio::time::timeout(PATIENCE, server.stopped()).await.unwrap().unwrap();
}

/// A watcher replaying a long history when the node stops is not fed the rest of it: its
/// stream ends at once with the shutdown's status (it resumes from its last seq with the next
/// start), and the node stops well within its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_replaying_history_ends_promptly_at_shutdown() {
    let dir = tempdir();
    // A history of some 5,000 events, written through the log alone: upgrades of a few
    // services, killed at the end so that nothing comes back.
    let history = {
        let mut options = options(dir.path());
        options.limits.node.max_deploys_per_minute = u32::MAX;
        let (control, _) = solo::control::Control::open(options).unwrap();
        let upgrades = (0..8).map(|s| {
            let control = control.clone();
            tokio::spawn(async move {
                let id = format!("svc{s}");
                for n in 0..600 {
                    deploy_request_to(&control, &id, n).await;
                }
                kill(&control, "acme", &id).await;
            })
        });
        for upgrade in upgrades.collect::<Vec<_>>() {
            upgrade.await.unwrap();
        }
        let head = control.head();
        control.close().await;
        head
    };
    assert!(history > 4_800, "{history}");
    let server = start_server(dir.path(), |c| c.solo.shutdown_grace_ms = 20_000).await;
    // Windows small enough that the node cannot send much of the backlog ahead of the reader.
    let (mut client, mut stream) = small_window_replay(&server).await;
    let asked = std::time::Instant::now();
    client
        .shutdown(proto::ShutdownRequest { grace_ms: 20_000 })
        .await
        .unwrap();
    // A slow reader: fed the whole backlog, it would take ten seconds.
    let mut received = 1u64;
    let end = loop {
        match tokio::time::timeout(PATIENCE, stream.next()).await.unwrap() {
            Some(Ok(_)) => received += 1,
            Some(Err(status)) => break status,
            None => panic!("the stream ended without a status"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(end.message().contains("shutting down"), "{}", end.message());
    assert!(
        received < history / 2,
        "{received} of {history} events sent after the stop"
    );
    tokio::time::timeout(PATIENCE, server.stopped()).await.unwrap().unwrap();
    assert!(asked.elapsed() < Duration::from_secs(8), "{:?}", asked.elapsed());
}

/// An upgrade of acme/`id` to a module of its own (the log takes modules as opaque bytes).
async fn deploy_request_to(control: &solo::control::Control, id: &str, n: usize) {
    let request = deploy_request("acme", id, &format!("{id}-{n}"));
    control.deploy(request).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_answering_pings_is_disconnected() {
    use tokio::io::AsyncWriteExt as _;
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start_server(dir.path(), |c| {
        c.solo.grpc_keepalive_interval_ms = 200;
        c.solo.grpc_keepalive_timeout_ms = 200;
    })
    .await;
    let address = server.grpc_url().trim_start_matches("http://").to_string();
    // An HTTP/2 client that says hello (preface, empty SETTINGS) and is then gone.
    let mut gone = tokio::net::TcpStream::connect(&address).await.unwrap();
    gone.write_all(HTTP2_HELLO).await.unwrap();
    let closed = closed_within(&mut gone, Duration::from_secs(20)).await;
    assert!(closed.is_some(), "a client that answers no ping stays connected");
    // One that answers is served as ever.
    let mut client = grpc_client(&server).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    client
        .list(as_tenant("a", proto::ListRequest::default()))
        .await
        .unwrap();
    server.stop().await.unwrap();
}

/// `max_request_bytes` bounds requests only: an answer larger than any request may be (a long
/// listing) is sent whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_not_bounded_by_the_request_limit() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| c.solo.max_request_bytes = 4096).await;
    let mut client = grpc_client(&server).await;
    for i in 0..30 {
        deploy(&mut client, "acme", &format!("service-with-a-long-name-{i:02}"), "echo").await;
    }
    let listed = client
        .list(as_tenant("acme", proto::ListRequest::default()))
        .await
        .expect("the listing is answered")
        .into_inner();
    assert_eq!(listed.services.len(), 30);
    assert!(prost::Message::encoded_len(&listed) > 4096);
    server.stop().await.unwrap();
}
