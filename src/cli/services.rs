//! The request/response commands: deploy, list, status, call, kill and shutdown, each one RPC
//! (list: one per page), plus the optional wait for a deploy or a kill to take effect.

use std::io::{IsTerminal as _, Read as _};
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use super::args::{
    BackupArgs, CallArgs, DeployArgs, KillArgs, ListArgs, RemoveArgs, ShutdownArgs, StatusArgs, WaitArgs, labels_by_key,
};
use super::connect::{Client, Connector};
use super::error::{CliError, Exit};
use super::output::{
    Cell, Colour, Output, Table, human_age, human_bytes, human_duration_ms, labels_text, now_ms, printable,
    status_colour,
};
use super::spinner::Spinner;
use crate::event::crash_reason_name;
use crate::proto::{self, CrashReason, StopReason, deploy_request, event::Kind, watch_response::Msg};

pub async fn deploy(conn: &Connector, out: Output, args: DeployArgs) -> Result<(), CliError> {
    let labels = labels_by_key(&args.labels)?;
    let bytes = read_input(&args.file, "the module")?;
    let size = bytes.len() as u64;
    let module = module_of(bytes, &args.file)?;
    let request = proto::DeployRequest {
        service_id: args.service_id.clone(),
        module: Some(module),
        limits: Some(proto::Limits {
            memory_bytes: args.memory_mb.map_or(0, |mb| mb.saturating_mul(1 << 20)),
            call_timeout_ms: args.call_timeout_ms.unwrap_or(0),
            cpu_ms_per_call: args.cpu_ms.unwrap_or(0),
            mailbox_capacity: args.mailbox.unwrap_or(0),
            max_restarts: args.max_restarts.unwrap_or(0),
            restart_window_ms: args.restart_window_ms.unwrap_or(0),
        }),
        labels: labels.into_iter().collect(),
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        expected_version: args.expected_version,
    };
    let mut client = conn.connect().await?;
    let spinner = Spinner::start(
        super::output::stderr_is_terminal(),
        format!(
            "deploying {} ({}): uploading and compiling",
            args.service_id,
            human_bytes(size)
        ),
    );
    let result = client.deploy(request).await;
    spinner.finish().await;
    let response = result.map_err(|s| module_error(conn.error(&s), &args.file))?;
    let replayed = replayed(&response);
    let deployed = response.into_inner();

    let mut document = json!({
        "service_id": deployed.service_id,
        "version": deployed.version,
        "seq": deployed.seq,
        "created": deployed.created,
        "unchanged": deployed.unchanged,
        "module_sha256": deployed.module_sha256,
        "replayed": replayed,
    });
    if !out.json {
        let how = if deployed.unchanged {
            "unchanged: the same module is already deployed"
        } else if deployed.created {
            "created"
        } else {
            "upgraded"
        };
        out.line(&format!(
            "deployed {} version {} ({how}; seq {}, module {}){}",
            deployed.service_id,
            deployed.version,
            deployed.seq,
            short_hash(&deployed.module_sha256),
            replayed_note(replayed)
        ))?;
    }
    if !args.wait.wait {
        return if out.json { out.document(&document) } else { Ok(()) };
    }
    let (version, id) = (deployed.version, deployed.service_id.clone());
    let waited = wait_for(&mut client, conn, &args.wait, &id, deployed.seq, "run", |event| {
        deploy_outcome(&id, version, event)
    })
    .await;
    // The service as it is now, whether or not it came up: programs get it either way.
    let status = service_status(&mut client, conn, &id).await;
    if out.json {
        if let Ok(status) = &status {
            document["service"] = crate::api::service_json(status);
        }
        if let Err(error) = &waited {
            document["error"] = error.to_json()["error"].take();
        }
        out.document(&document)?;
    } else if let (Ok(()), Ok(status)) = (&waited, &status) {
        out.line(&format!(
            "{id} is {} (version {})",
            out.status(&status.status),
            status.version
        ))?;
    }
    waited.and(status.map(drop))
}

/// Whether `event` settles a wait for version `version` of `id` to run.
fn deploy_outcome(id: &str, version: u64, event: &proto::Event) -> Option<Result<(), CliError>> {
    match event.kind.as_ref()? {
        Kind::ServiceStarted(e) if e.version >= version => Some(Ok(())),
        Kind::ServiceRestarted(e) if e.version >= version => Some(Ok(())),
        // A failed init or load is final whatever the restart policy; another crash is final
        // once no restart follows.
        Kind::ServiceCrashed(e)
            if e.version == version
                && (!e.restarting || matches!(e.reason(), CrashReason::InitFailure | CrashReason::LoadFailure)) =>
        {
            Some(Err(CliError::failure(format!(
                "{id} version {version} did not start: {}{}",
                crash_reason_name(e.reason()),
                if e.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", e.message)
                }
            ))))
        }
        Kind::ServiceDeployed(e) if e.version > version => Some(Err(CliError::failure(format!(
            "{id} version {version} was replaced by version {} before it started",
            e.version
        )))),
        Kind::ServiceKillRequested(_) => Some(Err(CliError::failure(format!("{id} was killed before it started")))),
        _ => None,
    }
}

/// Watches `id`'s events from `from_seq` until `decide` settles the wait, or the time is up.
async fn wait_for(
    client: &mut Client,
    conn: &Connector,
    wait: &WaitArgs,
    id: &str,
    from_seq: u64,
    goal: &str,
    mut decide: impl FnMut(&proto::Event) -> Option<Result<(), CliError>>,
) -> Result<(), CliError> {
    let request = proto::WatchRequest {
        from_seq,
        service_id: id.to_string(),
        kinds: Vec::new(),
        progress_interval_ms: 1_000,
    };
    let watching = async {
        let mut stream = client.watch(request).await.map_err(|s| conn.error(&s))?.into_inner();
        while let Some(item) = stream.message().await.map_err(|s| conn.error(&s))? {
            if let Some(Msg::Event(event)) = item.msg
                && let Some(outcome) = decide(&event)
            {
                return outcome;
            }
        }
        Err(CliError::failure(format!(
            "the node ended the watch before {id} was seen to {goal}"
        )))
    };
    let spinner = Spinner::start(
        super::output::stderr_is_terminal(),
        format!("waiting for {id} to {goal}"),
    );
    let patience = Duration::from_millis(wait.wait_timeout_ms);
    // The same command may well succeed with more time: retryable, as a call's timeout is.
    let outcome = tokio::time::timeout(patience, watching).await.unwrap_or_else(|_| {
        Err(CliError::failure(format!(
            "gave up waiting for {id} to {goal} after {}",
            human_duration_ms(wait.wait_timeout_ms)
        ))
        .retryable())
    });
    spinner.finish().await;
    outcome
}

pub async fn list(conn: &Connector, out: Output, args: ListArgs) -> Result<(), CliError> {
    let labels = labels_by_key(&args.labels)?;
    let mut client = conn.connect().await?;
    let mut services = Vec::new();
    let mut page_token = String::new();
    // The first page's: a watch from one past it misses no change to what is listed.
    let mut head_seq = None;
    loop {
        let request = proto::ListRequest {
            status: args.status.clone().unwrap_or_default(),
            labels: labels.clone().into_iter().collect(),
            page_size: args.page_size,
            page_token: page_token.clone(),
        };
        let page = client.list(request).await.map_err(|s| conn.error(&s))?.into_inner();
        head_seq.get_or_insert(page.head_seq);
        services.extend(page.services);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    if out.json {
        let services: Vec<Value> = services.iter().map(crate::api::service_json).collect();
        return out.document(&json!({ "services": services, "head_seq": head_seq }));
    }
    if services.is_empty() {
        super::output::note("no services");
        return Ok(());
    }
    let now = now_ms();
    let mut table = Table::new(vec!["ID", "TENANT", "STATUS", "VERSION", "RESTARTS", "MEMORY", "AGE"]);
    for s in &services {
        table.row(vec![
            s.service_id.as_str().into(),
            s.tenant.as_str().into(),
            Cell::coloured(s.status.clone(), status_colour(&s.status)),
            s.version.to_string().into(),
            s.restarts.to_string().into(),
            memory_text(s).into(),
            human_age(s.created_at_ms, now).into(),
        ]);
    }
    for line in table.render(out.colour()) {
        out.line(&line)?;
    }
    Ok(())
}

/// Live memory, or its limit while nothing runs.
fn memory_text(status: &proto::ServiceStatus) -> String {
    if status.memory_bytes > 0 {
        human_bytes(status.memory_bytes)
    } else {
        "-".to_string()
    }
}

async fn service_status(client: &mut Client, conn: &Connector, id: &str) -> Result<proto::ServiceStatus, CliError> {
    let request = proto::StatusRequest {
        service_id: id.to_string(),
    };
    Ok(client.status(request).await.map_err(|s| conn.error(&s))?.into_inner())
}

/// The service's status, or `None` once it has been removed.
pub(super) async fn status_unless_removed(
    client: &mut Client,
    conn: &Connector,
    id: &str,
) -> Result<Option<proto::ServiceStatus>, CliError> {
    match service_status(client, conn, id).await {
        Ok(status) => Ok(Some(status)),
        Err(e) if e.exit == Exit::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub async fn status(conn: &Connector, out: Output, args: StatusArgs) -> Result<(), CliError> {
    let mut client = conn.connect().await?;
    let s = service_status(&mut client, conn, &args.service_id).await?;
    if out.json {
        return out.document(&crate::api::service_json(&s));
    }
    let now = now_ms();
    let limits = s.limits.unwrap_or_default();
    let mut rows: Vec<(&str, String)> = vec![
        ("ID", s.service_id.clone()),
        ("TENANT", s.tenant.clone()),
        ("STATUS", format!("{} (desired: {})", out.status(&s.status), s.desired)),
        ("VERSION", s.version.to_string()),
        (
            "MODULE",
            format!(
                "sha256:{} ({})",
                short_hash(&s.module_sha256),
                human_bytes(s.module_size)
            ),
        ),
        ("LABELS", labels_text(&s.labels)),
        (
            "LIMITS",
            format!(
                "memory {}, call timeout {}, cpu {} per call, mailbox {}, {} restarts per {}",
                human_bytes(limits.memory_bytes),
                human_duration_ms(limits.call_timeout_ms.into()),
                human_duration_ms(limits.cpu_ms_per_call.into()),
                limits.mailbox_capacity,
                limits.max_restarts,
                human_duration_ms(limits.restart_window_ms.into()),
            ),
        ),
        (
            "CREATED",
            format!(
                "{} ({} ago)",
                crate::event::format_timestamp_ms(s.created_at_ms),
                human_age(s.created_at_ms, now)
            ),
        ),
        (
            "UPDATED",
            format!(
                "{} ({} ago)",
                crate::event::format_timestamp_ms(s.updated_at_ms),
                human_age(s.updated_at_ms, now)
            ),
        ),
        ("RESTARTS", s.restarts.to_string()),
        (
            "UPTIME",
            if s.uptime_ms > 0 {
                human_duration_ms(s.uptime_ms)
            } else {
                "-".into()
            },
        ),
        ("MEMORY", memory_text(&s)),
        ("CPU", human_duration_ms(s.cpu_ms)),
        ("CALLS", format!("{} ({} failed)", s.calls, s.calls_failed)),
    ];
    if !s.last_error.is_empty() {
        rows.push(("LAST ERROR", out.paint(Colour::Red, &printable(&s.last_error))));
    }
    rows.push(("LAST SEQ", s.last_seq.to_string()));
    for (key, value) in rows {
        out.line(&format!("{}{value}", out.paint(Colour::Bold, &format!("{key:<12}"))))?;
    }
    Ok(())
}

pub async fn call(conn: &Connector, out: Output, args: CallArgs) -> Result<(), CliError> {
    let payload = match (&args.data, &args.file) {
        (Some(data), _) => data.clone().into_bytes(),
        (None, Some(file)) => read_input(file, "the request")?,
        (None, None) if std::io::stdin().is_terminal() => Vec::new(),
        (None, None) => read_input(Path::new("-"), "the request")?,
    };
    let mut client = conn.connect().await?;
    let request = proto::CallRequest {
        service_id: args.service_id.clone(),
        payload,
        timeout_ms: args.timeout_ms.unwrap_or(0),
    };
    let response = client.call(request).await.map_err(|s| conn.error(&s))?.into_inner();
    if out.json {
        let text = std::str::from_utf8(&response.payload).ok();
        return out.document(&json!({
            "service_id": args.service_id,
            "size": response.payload.len(),
            "payload_base64": base64::engine::general_purpose::STANDARD.encode(&response.payload),
            "payload_text": text,
        }));
    }
    out.bytes(&response.payload)
}

pub async fn remove(conn: &Connector, out: Output, args: RemoveArgs) -> Result<(), CliError> {
    let mut client = conn.connect().await?;
    let request = proto::RemoveRequest {
        service_id: args.service_id.clone(),
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        expected_version: args.expected_version,
    };
    let response = client.remove(request).await.map_err(|s| conn.error(&s))?;
    let replayed = replayed(&response);
    let removed = response.into_inner();
    let id = &args.service_id;
    if out.json {
        return out.document(&json!({ "service_id": id, "seq": removed.seq, "removed": true, "replayed": replayed }));
    }
    out.line(&format!(
        "{id} removed (seq {}){}",
        removed.seq,
        replayed_note(replayed)
    ))
}

pub async fn kill(conn: &Connector, out: Output, args: KillArgs) -> Result<(), CliError> {
    let mut client = conn.connect().await?;
    let request = proto::KillRequest {
        service_id: args.service_id.clone(),
        force: args.force,
        grace_ms: args.grace_ms.unwrap_or(0),
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        expected_version: args.expected_version,
    };
    let response = client.kill(request).await.map_err(|s| conn.error(&s))?;
    let replayed = replayed(&response);
    let killed = response.into_inner();
    let id = &args.service_id;
    // `already_stopped`: a kill was recorded before this one. The service may still be on its
    // way down (a graceful stop waiting on its calls), which a wait must wait out. A replayed
    // answer is of a kill recorded before too, whose service may have stopped since.
    let looked_up = if killed.already_stopped || replayed {
        Some(status_unless_removed(&mut client, conn, id).await?)
    } else {
        None
    };
    let mut status = match &looked_up {
        Some(Some(found)) => found.status.clone(),
        // Removed since: gone for good.
        Some(None) => "stopped".to_string(),
        // What the kill just recorded makes of it.
        None => "stopping".to_string(),
    };
    let mut down = matches!(status.as_str(), "stopped" | "crashed" | "failed");
    if !out.json {
        let line = if !killed.already_stopped {
            format!("kill of {id} requested (seq {})", killed.seq)
        } else if down {
            format!("{id} was already {} (seq {})", out.status(&status), killed.seq)
        } else {
            format!(
                "{id} is already {}: a kill was requested before (seq {})",
                out.status(&status),
                killed.seq
            )
        };
        out.line(&format!("{line}{}", replayed_note(replayed)))?;
    }
    if args.wait.wait && !down {
        // The version on its way down: a killed version that an earlier deploy replaced may
        // record its stop after this kill, and is not the one waited for, nor is a version an
        // upgrade replaced. (One found running again was redeployed since: the version this
        // kill stopped is older, and any stop of a killed version settles the wait.)
        let current = match looked_up {
            Some(found) => found,
            None => status_unless_removed(&mut client, conn, id).await?,
        };
        let stopping = current.filter(|s| s.status == "stopping").map(|s| s.version);
        // From the kill's seq (or the service's last event), inclusive: a stop recorded since
        // is seen too.
        wait_for(
            &mut client,
            conn,
            &args.wait,
            id,
            killed.seq,
            "stop",
            |event| match &event.kind {
                Some(Kind::ServiceStopped(e))
                    if e.reason() != StopReason::Replaced && stopping.is_none_or(|v| e.version >= v) =>
                {
                    Some(Ok(()))
                }
                Some(Kind::ServiceRemoved(_)) => Some(Ok(())),
                _ => None,
            },
        )
        .await?;
        if !out.json {
            out.line(&format!("{id} {}", out.status("stopped")))?;
        }
        (status, down) = ("stopped".to_string(), true);
    }
    if out.json {
        out.document(&json!({
            "service_id": id,
            "seq": killed.seq,
            "already_stopped": killed.already_stopped,
            "replayed": replayed,
            "status": status,
            "stopped": down,
        }))?;
    }
    Ok(())
}

/// Whether the node answered a keyed request with the answer it gave the key before.
fn replayed<T>(response: &tonic::Response<T>) -> bool {
    response
        .metadata()
        .get(crate::api::REPLAYED_HEADER)
        .is_some_and(|value| value == "true")
}

/// What a person is told of a replayed answer.
fn replayed_note(replayed: bool) -> &'static str {
    if replayed {
        " (replayed: the original answer to this idempotency key)"
    } else {
        ""
    }
}

/// A refused module's error, naming the file it came from: the node saw only its bytes.
fn module_error(mut error: CliError, file: &Path) -> CliError {
    let name = if file == Path::new("-") {
        "the module from stdin".to_string()
    } else {
        file.display().to_string()
    };
    if let Some(reason) = error.message.strip_prefix("the module was refused: ") {
        // A WAT error's excerpt names the text `<anon>`: it is this file.
        error.message = format!("{name} was refused: {}", reason.replace("<anon>", &name));
    }
    error
}

pub async fn shutdown(conn: &Connector, out: Output, args: ShutdownArgs) -> Result<(), CliError> {
    let mut client = conn.connect().await?;
    let request = proto::ShutdownRequest {
        grace_ms: args.grace_ms.unwrap_or(0),
    };
    let done = client.shutdown(request).await.map_err(|s| conn.error(&s))?.into_inner();
    if out.json {
        out.document(&json!({ "seq": done.seq }))
    } else {
        out.line(&format!(
            "the node at {} is shutting down (seq {})",
            conn.url(),
            done.seq
        ))
    }
}

/// Streams the node's backup into `args.dest`, checks it against the SHA-256 the node sends
/// last, and keeps it only if it verifies (see [`crate::inspect::StagedBackup`]).
pub async fn backup(conn: &Connector, out: Output, args: BackupArgs, config: Option<&Path>) -> Result<(), CliError> {
    let failure = |e: anyhow::Error| CliError::failure(super::offline_error(&e));
    let config = crate::config::Config::load(config).map_err(|e| failure(e.into()))?;
    let mut client = conn.connect().await?;
    let mut stream = client
        .backup(proto::BackupRequest {})
        .await
        .map_err(|s| conn.error(&s))?
        .into_inner();
    // Once the node has taken the request: one it refuses leaves nothing behind.
    let mut staged = crate::inspect::StagedBackup::create(&args.dest).map_err(failure)?;
    let spinner = Spinner::start(
        super::output::stderr_is_terminal(),
        format!("backing up the node at {} to {}", conn.url(), args.dest.display()),
    );
    let copied = receive_backup(conn, &mut stream, &mut staged, &args.dest).await;
    let report = copied.and_then(|sha256| {
        let report = staged
            .finish(&config.log_options(true).store, config.settings())
            .map_err(failure)?;
        Ok((sha256, report))
    });
    spinner.finish().await;
    let (sha256, report) = report?;
    if !report.kept() {
        return Err(CliError::failure(format!(
            "the node's backup does not verify ({}): no backup was kept; run solo log verify on the node's data directory",
            report.verified.summary()
        )));
    }
    if out.json {
        out.document(&json!({
            "path": report.path.display().to_string(),
            "bytes": report.bytes,
            "sha256": sha256,
            "head": report.verified.head,
            "verify": report.verified.to_json(),
        }))
    } else {
        out.line(&format!(
            "backed up the node at {} to {} as of seq {}: {} bytes (SHA-256 {sha256}); the copy verifies: {}",
            conn.url(),
            report.path.display(),
            report.verified.head,
            report.bytes,
            report.verified.summary()
        ))
    }
}

/// Writes the backup stream's pieces into `staged`; returns their SHA-256 once it matches the
/// one the node sent last.
async fn receive_backup(
    conn: &Connector,
    stream: &mut tonic::Streaming<proto::BackupPiece>,
    staged: &mut crate::inspect::StagedBackup,
    dest: &Path,
) -> Result<String, CliError> {
    use sha2::Digest as _;
    use std::io::Write as _;
    let mut hash = sha2::Sha256::new();
    let sent = loop {
        match stream.message().await.map_err(|s| conn.error(&s))? {
            Some(piece) if piece.sha256.is_empty() => {
                hash.update(&piece.data);
                staged
                    .file()
                    .write_all(&piece.data)
                    .map_err(|e| CliError::failure(format!("cannot write the backup in {}: {e}", dest.display())))?;
            }
            Some(piece) => break piece.sha256,
            None => {
                return Err(CliError::failure(
                    "the node's backup stream ended before its last piece: no backup was kept",
                )
                .retryable());
            }
        }
    };
    let sha256 = hex::encode(hash.finalize());
    if sha256 != sent {
        return Err(CliError::failure(format!(
            "the backup's bytes hash to {sha256}, not to the SHA-256 the node sent ({sent}): no backup was kept"
        ))
        .retryable());
    }
    Ok(sha256)
}

/// A file's bytes, or stdin's for `-`.
fn read_input(path: &Path, what: &str) -> Result<Vec<u8>, CliError> {
    if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .map_err(|e| CliError::failure(format!("cannot read {what} from stdin: {e}")))?;
        return Ok(bytes);
    }
    std::fs::read(path).map_err(|e| CliError::failure(format!("cannot read {what} from {}: {e}", path.display())))
}

/// A wasm binary (by its magic number) or WAT text.
fn module_of(bytes: Vec<u8>, path: &Path) -> Result<deploy_request::Module, CliError> {
    if bytes.starts_with(b"\0asm") {
        return Ok(deploy_request::Module::Wasm(bytes));
    }
    String::from_utf8(bytes)
        .map(deploy_request::Module::Wat)
        .map_err(|_| CliError::failure(format!("{} is neither a wasm binary nor WAT text", path.display())))
}

fn short_hash(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_told_apart_by_their_magic() {
        let path = Path::new("m");
        assert!(matches!(
            module_of(b"\0asm\x01\0\0\0".to_vec(), path),
            Ok(deploy_request::Module::Wasm(_))
        ));
        assert!(matches!(
            module_of(b"(module)".to_vec(), path),
            Ok(deploy_request::Module::Wat(_))
        ));
        assert!(module_of(vec![0xff, 0xfe], path).is_err());
    }

    #[test]
    fn a_refused_module_is_named_by_its_file() {
        let refused = CliError::failure("the module was refused: WAT syntax error: expected `)`\n  --> <anon>:1:20");
        let named = module_error(refused, Path::new("bad.wat"));
        assert_eq!(
            named.message,
            "bad.wat was refused: WAT syntax error: expected `)`\n  --> bad.wat:1:20"
        );
        let quota = CliError::failure("quota exceeded: max_services = 1 (tenant 'a' has 1 services)");
        assert_eq!(module_error(quota.clone(), Path::new("x.wat")), quota);
    }
}
