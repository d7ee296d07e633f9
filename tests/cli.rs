//! The `solo` command line, end to end: the real binary against a real node. Most tests start
//! the node in-process on port 0; the restart tests run `solo serve` as a child process on
//! fixed free ports, so it can be killed and started again where the followers expect it.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A guard against hangs, never a performance assertion.
const PATIENCE: Duration = Duration::from_secs(60);

/// Every variable the CLI reads, so the environment of whoever runs the tests cannot leak in.
const SOLO_VARS: [&str; 9] = [
    "SOLO_ENDPOINT",
    "SOLO_TOKEN",
    "SOLO_TENANT",
    "SOLO_CA_CERT",
    "SOLO_CLIENT_CERT",
    "SOLO_CLIENT_KEY",
    "SOLO_CONFIG",
    "SOLO_CONNECT_TIMEOUT_MS",
    "RUST_LOG",
];

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_solo")
}

/// `solo` with a clean environment.
fn solo() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::new(bin());
    for var in SOLO_VARS {
        cmd.env_remove(var);
    }
    cmd.timeout(PATIENCE);
    cmd
}

/// What a finished command left behind.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Ran {
    fn text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("stdout is UTF-8")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", self.text()))
    }

    /// Every line of stdout as JSON.
    fn json_lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
            .collect()
    }

    #[track_caller]
    fn ok(self) -> Ran {
        assert_eq!(self.code, 0, "expected success; stderr: {}", self.stderr);
        self
    }

    #[track_caller]
    fn fails(self, code: i32) -> Ran {
        assert_eq!(
            self.code,
            code,
            "expected exit {code}; stdout: {} stderr: {}",
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        );
        // One sentence; only the node's detail for a module (a WAT error's context) may
        // follow, indented.
        let mut lines = self.stderr.trim_end().lines();
        assert!(
            lines.next().is_some_and(|l| l.starts_with("error: ")) && lines.all(|l| l.starts_with(' ')),
            "one error sentence on stderr: {:?}",
            self.stderr
        );
        self
    }
}

fn run(cmd: &mut assert_cmd::Command) -> Ran {
    let output = cmd.output().expect("solo runs");
    Ran {
        code: output.status.code().expect("solo exited by itself"),
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn example_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/services")
        .join(format!("{name}.wat"))
}

/// A node served in-process on port 0, by a runtime of its own so the test thread can block
/// on the CLI.
struct Node {
    runtime: tokio::runtime::Runtime,
    server: Option<solo::server::Server>,
    url: String,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(tweak: impl FnOnce(&mut solo::config::Config)) -> Node {
        let dir = tempfile::tempdir().expect("a temp dir");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = runtime.block_on(common::start_server(dir.path(), tweak));
        Node {
            url: server.grpc_url(),
            server: Some(server),
            runtime,
            _dir: dir,
        }
    }

    fn dev() -> Node {
        Node::start(|_| {})
    }

    /// `solo --endpoint <this node>`.
    fn solo(&self) -> assert_cmd::Command {
        let mut cmd = solo();
        cmd.args(["--endpoint", &self.url]);
        cmd
    }

    /// `solo --endpoint <this node> --tenant <tenant> ARGS`, run.
    fn run(&self, tenant: &str, args: &[&str]) -> Ran {
        run(self.solo().args(["--tenant", tenant]).args(args))
    }

    fn deploy(&self, tenant: &str, id: &str, example: &str, extra: &[&str]) -> Ran {
        let path = example_path(example);
        let mut args = vec!["deploy", id, path.to_str().unwrap(), "--wait"];
        args.extend_from_slice(extra);
        self.run(tenant, &args).ok()
    }

    /// Waits until the node has stopped by itself (after `solo shutdown`).
    fn stopped(mut self) {
        let server = self.server.take().unwrap();
        self.runtime
            .block_on(async { tokio::time::timeout(PATIENCE, server.stopped()).await })
            .expect("the node stops in time")
            .unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = self.runtime.block_on(server.stop());
        }
    }
}

/// A port nothing listens on (bound, then released).
/// `solo ARGS` as a child, free of the caller's SOLO_* settings, its stdout and stderr piped.
fn spawn_piped(args: &[&str]) -> std::process::Child {
    let mut cmd = std::process::Command::new(bin());
    for var in SOLO_VARS {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn help_documents_exit_codes_and_every_subcommand_has_examples() {
    let help = run(solo().arg("--help")).ok().text();
    for needle in [
        "Exit codes",
        "0  success",
        "2  usage",
        "3  not found",
        "4  unauthenticated or forbidden",
        "5  unavailable",
        "SOLO_ENDPOINT",
        "SOLO_CLIENT_CERT",
        "SOLO_CLIENT_KEY",
        "SOLO_CONNECT_TIMEOUT_MS",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
    let subcommands: &[&[&str]] = &[
        &["serve"],
        &["deploy"],
        &["list"],
        &["status"],
        &["call"],
        &["kill"],
        &["remove"],
        &["logs"],
        &["events"],
        &["shutdown"],
        &["backup"],
        &["completions"],
        &["log"],
        &["log", "verify"],
        &["log", "dump"],
        &["log", "stats"],
        &["log", "backup"],
        &["config"],
        &["config", "check"],
        &["token"],
        &["token", "new"],
    ];
    for subcommand in subcommands {
        let help = run(solo().args(*subcommand).arg("--help")).ok().text();
        assert!(
            help.contains("Examples:"),
            "solo {subcommand:?} --help has no examples:\n{help}"
        );
    }
    let deploy_help = run(solo().args(["deploy", "--help"])).ok().text();
    assert!(deploy_help.contains("Exit codes") && deploy_help.contains("--memory-mb"));
    assert!(
        deploy_help.contains("60000"),
        "the restart window's minimum:\n{deploy_help}"
    );
    assert!(deploy_help.contains("--endpoint") && deploy_help.contains("--json"));
    // Each command's help shows the global flags that do something there, and only those.
    let offline: [(&[&str], bool); 7] = [
        (&["serve"], false),
        (&["log", "verify"], true),
        (&["log", "dump"], true),
        (&["log", "stats"], true),
        (&["config", "check"], true),
        (&["token", "new"], true),
        (&["completions"], false),
    ];
    for (command, json) in offline {
        let help = run(solo().args(command).arg("--help")).ok().text();
        for flag in ["--endpoint", "--token", "--ca-cert", "--connect-timeout-ms"] {
            assert!(!help.contains(flag), "solo {command:?} --help shows {flag}:\n{help}");
        }
        assert_eq!(
            help.contains("--json"),
            json,
            "solo {command:?} --help and --json:\n{help}"
        );
    }
    assert!(!run(solo().args(["status", "--help"])).ok().text().contains("--config"));
    // Backup verifies its copy under the config's idempotency window.
    assert!(run(solo().args(["backup", "--help"])).ok().text().contains("--config"));
    // Still accepted anywhere, as global flags are.
    run(solo().args(["token", "new", "--endpoint", "http://127.0.0.1:1"])).ok();
    // The token's value never shows in help.
    let help = run(solo().env("SOLO_TOKEN", "sekrit-token").args(["list", "--help"]))
        .ok()
        .text();
    assert!(!help.contains("sekrit-token"), "{help}");
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let script = run(solo().args(["completions", shell])).ok().text();
        assert!(
            script.contains("solo") && script.contains("deploy") && script.contains("events"),
            "{shell}: {script}"
        );
    }
    assert_eq!(run(solo().args(["completions", "tcsh"])).code, 2);
}

#[test]
fn bad_usage_exits_2() {
    for args in [
        &["deploy"][..],
        &["deploy", "only-an-id"],
        &["events", "--kind", "service_exploded"],
        &["list", "--label", "no-equals-sign"],
        &["list", "--status", "sleeping"],
        &["list", "--page-size", "0"],
        &["call", "x", "--data", "a", "--file", "b"],
        &["kill", "x", "--grace-ms", "soon"],
        // An id no service could have is refused before any connection.
        &["status", "bad id!"],
        &["deploy", "a/b", "echo.wat"],
        &["no-such-command"],
        // Values that are not what they claim.
        &["list", "--endpoint", "http://127.0.0.1:abc"],
        &["list", "--connect-timeout-ms", "0"],
        &["deploy", "x", "echo.wat", "--label", "team=red", "--label", "team=blue"],
    ] {
        let ran = run(solo().args(args));
        assert_eq!(ran.code, 2, "solo {args:?}: {}", ran.stderr);
    }

    // Flags the CLI itself refuses before reaching any node.
    let ran = run(solo().args(["list", "--endpoint", "https://127.0.0.1:1"])).fails(2);
    assert!(ran.stderr.contains("--ca-cert"), "{}", ran.stderr);
    let ran = run(solo().args(["list", "--endpoint", "http://127.0.0.1:1", "--ca-cert", "x.pem"])).fails(2);
    assert!(ran.stderr.contains("https"), "{}", ran.stderr);
    // Each flag named as given.
    let ran = run(solo().args([
        "list",
        "--endpoint",
        "http://127.0.0.1:1",
        "--client-cert",
        "c.pem",
        "--client-key",
        "c.key",
    ]))
    .fails(2);
    assert!(
        ran.stderr.contains("--client-cert needs an https") && !ran.stderr.contains("--ca-cert"),
        "{}",
        ran.stderr
    );
    // A path would be dropped unsaid: gRPC's paths are its methods'.
    let ran = run(solo().args(["list", "--endpoint", "http://127.0.0.1:1/solo"])).fails(2);
    assert!(ran.stderr.contains("no path"), "{}", ran.stderr);
    // Only http and https; a bad value from the environment names its variable.
    let ran = run(solo().args(["list", "--endpoint", "ftp://x"]));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(
        ran.stderr.contains("--endpoint") && ran.stderr.contains("ftp://"),
        "{}",
        ran.stderr
    );
    let ran = run(solo().env("SOLO_ENDPOINT", "ftp://x").arg("list"));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(ran.stderr.contains("SOLO_ENDPOINT"), "{}", ran.stderr);
    let ran = run(solo().env("SOLO_CONNECT_TIMEOUT_MS", "soon").arg("list"));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(ran.stderr.contains("SOLO_CONNECT_TIMEOUT_MS"), "{}", ran.stderr);
    let ran = run(solo().args(["list", "--connect-timeout-ms", "soon"]));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(!ran.stderr.contains("SOLO_CONNECT_TIMEOUT_MS"), "{}", ran.stderr);
}

#[test]
fn a_node_that_is_not_there_exits_5() {
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    for args in [
        &["list"][..],
        &["status", "echo"],
        &["call", "echo", "--data", "x"],
        &["events"],
        &["events", "--follow"],
        &["logs", "echo", "--follow"],
        &["shutdown"],
    ] {
        let ran = run(solo().args(["--endpoint", &endpoint]).args(args)).fails(5);
        assert!(
            ran.stderr.contains(&format!("cannot reach the node at {endpoint}")),
            "solo {args:?}: {}",
            ran.stderr
        );
    }
    // SOLO_ENDPOINT works as well as the flag, and a bare host:port is taken as http.
    let ran = run(solo().env("SOLO_ENDPOINT", format!("127.0.0.1:{port}")).arg("list")).fails(5);
    assert!(ran.stderr.contains(&endpoint), "{}", ran.stderr);
}

#[test]
fn deploy_status_list_call_kill_logs_and_events_in_development_mode() {
    let node = Node::dev();

    // Deploy, WAT and wasm, waiting until it runs.
    let ran = node.deploy("acme", "echo", "echo", &[]);
    let text = ran.text();
    assert!(
        text.contains("deployed echo version 1 (created") && text.contains("echo is running"),
        "{text}"
    );
    assert!(
        !ran.stderr.contains('\r'),
        "no spinner off a terminal: {:?}",
        ran.stderr
    );
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("counter.wasm");
    std::fs::write(&wasm, wat::parse_file(example_path("counter")).unwrap()).unwrap();
    let path = wasm.to_str().unwrap();
    let keyed = [
        "deploy",
        "counter",
        path,
        "--memory-mb",
        "8",
        "--call-timeout-ms",
        "2000",
        "--cpu-ms",
        "500",
        "--mailbox",
        "7",
        "--label",
        "team=x",
        "--label",
        "tier=web",
        "--idempotency-key",
        "first-deploy",
        "--json",
    ];
    let deployed = node.run("acme", &keyed).ok().json();
    assert_eq!(deployed["created"], true);
    assert_eq!(deployed["version"], 1);
    assert_eq!(deployed["module_sha256"].as_str().unwrap().len(), 64);
    // A retry with the key is the first answer; the key with another request is a conflict;
    // the same module again is unchanged.
    let retried = node.run("acme", &keyed).ok().json();
    let relabelled = node.run(
        "acme",
        &["deploy", "counter", path, "--idempotency-key", "first-deploy"],
    );
    assert!(
        relabelled
            .fails(1)
            .stderr
            .contains("already used for a different request"),
        "the key with other limits and labels"
    );
    assert_eq!(retried["seq"], deployed["seq"]);
    assert_eq!(
        (deployed["replayed"].as_bool(), retried["replayed"].as_bool()),
        (Some(false), Some(true))
    );
    let again = node
        .run(
            "acme",
            &["deploy", "echo", example_path("echo").to_str().unwrap(), "--json"],
        )
        .ok()
        .json();
    assert_eq!(
        (again["unchanged"].as_bool(), again["version"].as_u64()),
        (Some(true), Some(1))
    );
    // `--wait --json` adds the service as it runs.
    let waited = node
        .run(
            "beta",
            &[
                "deploy",
                "echo",
                example_path("echo").to_str().unwrap(),
                "--wait",
                "--json",
            ],
        )
        .ok()
        .json();
    assert_eq!(waited["service"]["status"], "running");
    assert_eq!(waited["service"]["tenant"], "beta");

    // Deploy failures.
    let ran = node.run("acme", &["deploy", "bad", "/no/such/file.wasm"]).fails(1);
    assert!(ran.stderr.contains("/no/such/file.wasm"), "{}", ran.stderr);
    let junk = dir.path().join("junk.wat");
    std::fs::write(&junk, "(module (func $oops").unwrap();
    let ran = node.run("acme", &["deploy", "bad", junk.to_str().unwrap()]).fails(1);
    let first = ran.stderr.lines().next().unwrap();
    assert!(
        first.contains(junk.to_str().unwrap()) && first.contains("WAT"),
        "the first line names the file: {}",
        ran.stderr
    );
    assert!(!ran.stderr.contains("<anon>"), "{}", ran.stderr);
    let ran = node
        .run(
            "acme",
            &[
                "deploy",
                "init-trap",
                example_path("init_trap").to_str().unwrap(),
                "--wait",
                "--json",
            ],
        )
        .fails(1);
    assert!(ran.stderr.contains("did not start"), "{}", ran.stderr);
    let failed = ran.json();
    assert_eq!(
        (failed["created"].as_bool(), failed["service"]["status"].as_str()),
        (Some(true), Some("failed"))
    );
    // Its one document also says why the command failed.
    assert!(
        failed["error"]["message"].as_str().unwrap().contains("did not start"),
        "{failed}"
    );

    // Status: people and programs; the JSON is the REST API's, field for field.
    let status = node.run("acme", &["status", "counter"]).ok().text();
    for needle in [
        "counter",
        "acme",
        "running",
        "team=x,tier=web",
        "memory 8 MiB",
        "mailbox 7",
    ] {
        assert!(status.contains(needle), "status lacks {needle:?}:\n{status}");
    }
    assert!(!status.contains('\x1b'), "no colour off a terminal");
    let status = node.run("acme", &["status", "counter", "--json"]).ok().json();
    assert_eq!(status["limits"]["memory_bytes"], 8 << 20);
    assert_eq!(status["limits"]["call_timeout_ms"], 2000);
    assert_eq!(status["limits"]["cpu_ms_per_call"], 500);
    assert_eq!(status["labels"]["tier"], "web");
    let rest: Value = node.runtime.block_on(async {
        reqwest::Client::new()
            .get(format!(
                "http://{}/services/counter",
                node.server.as_ref().unwrap().http_addr
            ))
            .header("x-tenant-id", "acme")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    for (key, value) in status.as_object().unwrap() {
        let live = ["memory_bytes", "uptime_ms", "cpu_ms", "calls", "calls_failed"].contains(&key.as_str());
        assert!(rest.get(key).is_some(), "REST has no {key}");
        if !live {
            assert_eq!(&rest[key], value, "{key}");
        }
    }
    node.run("acme", &["status", "nope"]).fails(3);
    node.run("beta", &["status", "counter"]).fails(3);

    // List: a table, JSON, filters, and every page.
    let table = node.run("acme", &["list"]).ok().text();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID")
            && ["TENANT", "STATUS", "VERSION", "RESTARTS", "MEMORY", "AGE"]
                .iter()
                .all(|h| lines[0].contains(h)),
        "{table}"
    );
    let status_column = lines[0].find("STATUS").unwrap();
    assert!(lines.iter().skip(1).all(|l| l.len() > status_column), "{table}");
    assert!(table.contains("counter") && table.contains("echo") && table.contains("init-trap"));
    let ids = |ran: Ran| -> Vec<String> {
        ran.ok().json()["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["service_id"].as_str().unwrap().to_string())
            .collect()
    };
    let history = node.run("acme", &["events", "--json"]).ok().json_lines();
    let listed = node.run("acme", &["list", "--json"]);
    let head_seq = listed.json()["head_seq"]
        .as_u64()
        .expect("the seq the listing is as of");
    assert!(history.iter().all(|e| e["seq"].as_u64().unwrap() <= head_seq));
    assert_eq!(ids(listed), ["counter", "echo", "init-trap"]);
    assert_eq!(
        ids(node.run("acme", &["list", "--json", "--status", "failed"])),
        ["init-trap"]
    );
    assert_eq!(
        ids(node.run("acme", &["list", "--json", "--label", "team=x"])),
        ["counter"]
    );
    assert_eq!(
        ids(node.run("acme", &["list", "--json", "--label", "team=x", "--label", "tier=db"])),
        Vec::<String>::new()
    );
    for id in ["p1", "p2", "p3", "p4"] {
        node.run("acme", &["deploy", id, wasm.to_str().unwrap()]).ok();
    }
    assert_eq!(
        ids(node.run("acme", &["list", "--json", "--page-size", "2"])),
        ["counter", "echo", "init-trap", "p1", "p2", "p3", "p4"]
    );
    // The admin (no tenant) sees every tenant's services.
    let all = run(node.solo().args(["list", "--json"])).ok().json();
    let tenants: BTreeSet<&str> = all["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(tenants, BTreeSet::from(["acme", "beta"]));

    // Call: --data, --file, stdin; the response unchanged on stdout.
    assert_eq!(
        node.run("acme", &["call", "echo", "--data", "hello"]).ok().stdout,
        b"hello"
    );
    let request = dir.path().join("request.bin");
    std::fs::write(&request, b"from a file").unwrap();
    assert_eq!(
        node.run("acme", &["call", "echo", "--file", request.to_str().unwrap()])
            .ok()
            .stdout,
        b"from a file"
    );
    assert_eq!(node.run("acme", &["call", "counter"]).ok().stdout, b"1");
    let called = node
        .run("acme", &["call", "echo", "--data", "hi", "--json"])
        .ok()
        .json();
    assert_eq!(
        (called["payload_text"].as_str(), called["size"].as_u64()),
        (Some("hi"), Some(2))
    );
    assert_eq!(called["payload_base64"], "aGk=");
    node.run("acme", &["call", "nope", "--data", "x"]).fails(3);

    // Logs.
    let logs = node.run("acme", &["logs", "echo"]).ok().text();
    assert!(logs.contains("INFO") && logs.contains("echo ready"), "{logs}");
    let lines = node.run("acme", &["logs", "echo", "--json"]).ok().json_lines();
    assert_eq!(lines.len(), 1);
    let line = lines[0].as_object().unwrap();
    assert_eq!(
        line.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(["log_id", "seq", "timestamp_ms", "level", "message", "version"])
    );
    // The log's id in hex, as REST's read gives it: the same for every line of one log.
    let log_id = line["log_id"].as_str().unwrap();
    assert!(
        !log_id.is_empty() && log_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{log_id}"
    );
    let again = node.run("acme", &["logs", "echo", "--json"]).ok().json_lines();
    assert_eq!(again[0]["log_id"], log_id);
    assert_eq!(
        (line["seq"].as_u64(), line["message"].as_str()),
        (Some(1), Some("echo ready"))
    );
    assert!(
        node.run("acme", &["logs", "echo", "--from", "2", "--json"])
            .ok()
            .stdout
            .is_empty()
    );
    node.run("acme", &["logs", "nope"]).fails(3);
    node.run("acme", &["logs", "nope", "--follow"]).fails(3);

    // Kill, waiting until it stopped; then calls fail and a second kill finds it stopped.
    let killed = node
        .run("acme", &["kill", "echo", "--grace-ms", "2000", "--wait"])
        .ok()
        .text();
    assert!(
        killed.contains("kill of echo requested") && killed.contains("stopped"),
        "{killed}"
    );
    let ran = node.run("acme", &["call", "echo", "--data", "x"]).fails(1);
    assert!(ran.stderr.contains("echo"), "{}", ran.stderr);
    let again = node.run("acme", &["kill", "echo", "--json"]).ok().json();
    assert_eq!(again["already_stopped"], true);
    assert_eq!(
        (again["status"].as_str(), again["stopped"].as_bool()),
        (Some("stopped"), Some(true))
    );
    let again = node.run("acme", &["kill", "echo"]).ok().text();
    assert!(again.contains("echo was already stopped"), "{again}");
    let forced = node.run(
        "acme",
        &[
            "kill",
            "counter",
            "--force",
            "--json",
            "--idempotency-key",
            "stop-counter",
        ],
    );
    let forced = forced.ok().json();
    assert_eq!(
        (forced["service_id"].as_str(), forced["already_stopped"].as_bool()),
        (Some("counter"), Some(false))
    );
    assert_eq!(forced["replayed"], false);
    // The same fields whatever the kill found.
    assert_eq!(
        (forced["status"].as_str(), forced["stopped"].as_bool()),
        (Some("stopping"), Some(false))
    );
    let retried = node
        .run(
            "acme",
            &["kill", "counter", "--force", "--idempotency-key", "stop-counter"],
        )
        .ok()
        .text();
    assert!(
        retried.contains(&format!("(seq {})", forced["seq"]))
            && retried.contains("(replayed: the original answer to this idempotency key)"),
        "{retried}"
    );
    node.run("acme", &["kill", "nope"]).fails(3);
    let logs = node.run("acme", &["logs", "echo"]).ok().text();
    assert!(logs.contains("echo stopping"), "{logs}");

    // Events: history up to the head, then exit; the same events as the log holds.
    let events = run(node.solo().args(["events", "--json"])).ok().json_lines();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "every seq, in order");
    assert_eq!(events[0]["kind"], "node_started");
    let acme = node.run("acme", &["events", "--json"]).ok().json_lines();
    assert!(!acme.is_empty() && acme.iter().all(|e| e["tenant"] == "acme"));
    let filtered = node
        .run(
            "acme",
            &[
                "events",
                "--json",
                "--service",
                "echo",
                "--kind",
                "service_started,service_stopped",
            ],
        )
        .ok()
        .json_lines();
    let kinds: Vec<&str> = filtered.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["service_started", "service_stopped"]);
    let later = run(node.solo().args(["events", "--json", "--from", "5"]))
        .ok()
        .json_lines();
    assert_eq!(later.first().unwrap()["seq"], 5);
    assert_eq!(later.len(), seqs.len() - 4);
    let people = run(node.solo().args(["events"])).ok().text();
    assert_eq!(people.lines().count(), seqs.len());
    assert!(
        people.contains("service_deployed") && people.contains("acme/echo"),
        "{people}"
    );
    let next = seqs.len() + 1;
    assert!(
        run(node.solo().args(["events", "--from", &next.to_string()]))
            .ok()
            .stdout
            .is_empty(),
        "nothing past the head"
    );
    // A seq further on was never acknowledged: refused, with or without --follow.
    for follow in [&[][..], &["--follow"][..]] {
        let refused = run(node.solo().args(["events", "--from", "100000"]).args(follow)).fails(1);
        assert!(
            refused.stderr.contains("cannot start at seq 100000"),
            "{}",
            refused.stderr
        );
    }

    // A reader that goes away (`solo events --follow | head -1`) ends the command quietly.
    let mut follower = std::process::Command::new(bin())
        .args(["--endpoint", &node.url, "events", "--follow", "--from", "1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(follower.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"seq\":1"), "{first}");
    node.deploy("acme", "after-the-reader-left", "counter", &[]);
    let output = follower.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.stderr.is_empty(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn deploy_and_kill_at_an_expected_version() {
    let node = Node::dev();
    let at = |example: &str, version: &str| {
        let path = example_path(example);
        node.run(
            "acme",
            &["deploy", "svc", path.to_str().unwrap(), "--expected-version", version],
        )
    };
    at("echo", "0").ok();
    let taken = at("counter", "0").fails(1);
    assert!(
        taken.stderr.contains("service 'svc' is at version 1"),
        "{}",
        taken.stderr
    );
    at("counter", "1").ok();
    let stale = at("echo", "1").fails(1);
    assert!(stale.stderr.contains("is at version 2"), "{}", stale.stderr);
    let kill_at = |version: &str| node.run("acme", &["kill", "svc", "--expected-version", version, "--wait"]);
    let stale = kill_at("1").fails(1);
    assert!(stale.stderr.contains("is at version 2"), "{}", stale.stderr);
    kill_at("2").ok();
    // Removed once stopped, the id starts over.
    let removed = node.run("acme", &["--json", "remove", "svc"]).ok().json();
    assert_eq!(removed["removed"], true);
    node.run("acme", &["status", "svc"]).fails(3);
    node.run("acme", &["remove", "svc"]).fails(3);
    at("echo", "0").ok();
}

/// Reading history holds one stream at a time, so a caller allowed a single stream can read
/// it again and again; before, a first watch that only learned the head could still count
/// against the limit when the second one opened.
#[test]
fn events_reads_history_within_a_limit_of_one_stream() {
    let node = Node::start(|config| config.limits.max_watchers = 1);
    node.deploy("acme", "echo", "echo", &[]);
    for round in 0..20 {
        let events = node.run("acme", &["events", "--json"]);
        assert_eq!(events.code, 0, "round {round}: {}", events.stderr);
        assert!(events.json_lines().len() >= 2, "round {round}");
    }
}

#[test]
fn call_passes_binary_data_and_large_payloads_unchanged() {
    let node = Node::dev();
    node.deploy("acme", "echo", "echo", &[]);
    let every_byte: Vec<u8> = (0..=255).collect();
    let ran = run(node
        .solo()
        .args(["--tenant", "acme", "call", "echo"])
        .write_stdin(every_byte.clone()))
    .ok();
    assert_eq!(ran.stdout, every_byte);
    let large: Vec<u8> = (0..6 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let output = node
        .solo()
        .args(["--tenant", "acme", "call", "echo", "--file", "-"])
        .write_stdin(large.clone())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.stdout == large,
        "6 MiB came back changed ({} bytes)",
        output.stdout.len()
    );
    let called = node
        .solo()
        .args(["--tenant", "acme", "call", "echo", "--json"])
        .write_stdin(every_byte.clone())
        .output()
        .unwrap();
    let called: Value = serde_json::from_slice(&called.stdout).unwrap();
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(called["payload_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, every_byte);
    assert_eq!(called["payload_text"], Value::Null);
    // A call that runs past its time limit fails with the node's reason.
    node.deploy("acme", "spin", "spin", &["--call-timeout-ms", "300"]);
    let ran = node
        .run("acme", &["call", "spin", "--data", "1500", "--timeout-ms", "200"])
        .fails(1);
    assert!(ran.stderr.contains("spin"), "{}", ran.stderr);
}

/// A service's words reach a person's terminal with their control characters escaped: its log
/// lines, the error it answers a call with, and the last error that `status` shows the admin.
#[test]
fn what_a_service_writes_cannot_drive_the_terminal_of_who_reads_it() {
    const HOSTILE: &str = r#"
        (module
          (import "solo" "log" (func $log (param i32 i32 i32)))
          (memory (export "memory") 1)
          (data (i32.const 16) "\1b[2J\1b]0;pwned\07\1b[32mall good")
          (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
          (func (export "solo_init") (result i32)
            (call $log (i32.const 2) (i32.const 16) (i32.const 27))
            (i32.const 0))
          (func (export "solo_handle") (param i32) (param $len i32) (result i64)
            (if (i32.eq (local.get $len) (i32.const 4)) (then (call $trap)))
            (i64.or (i64.const 0x8000000000000000) (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 27))))
          (func $trap (@name "\1b]0;owned\07") unreachable))
    "#;
    let node = Node::dev();
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("hostile.wat");
    std::fs::write(&module, HOSTILE).unwrap();
    node.run("acme", &["deploy", "hostile", module.to_str().unwrap(), "--wait"])
        .ok();
    let escaped = r"\u{1b}[2J\u{1b}]0;pwned\u{7}\u{1b}[32mall good";
    let logs = node.run("acme", &["logs", "hostile"]).ok().text();
    assert!(logs.contains(escaped) && !logs.contains('\u{1b}'), "{logs:?}");
    let called = node.run("acme", &["call", "hostile", "--data", "x"]).fails(1);
    assert!(
        called.stderr.contains(escaped) && !called.stderr.contains('\u{1b}'),
        "{:?}",
        called.stderr
    );
    // A trap names the function it happened in, as the module's name section calls it.
    node.run("acme", &["call", "hostile", "--data", "trap"]).fails(1);
    let status = node.run("acme", &["status", "hostile"]).ok().text();
    assert!(
        status.contains(r"\u{1b}]0;owned\u{7}") && !status.contains('\u{1b}'),
        "{status:?}"
    );
}

/// Tokens for the admin and for tenant `acme`.
fn with_tokens() -> (String, String, impl Fn(&mut solo::config::Config) + Clone) {
    let (admin_token, admin_hash) = solo::api::auth::new_token().unwrap();
    let (acme_token, acme_hash) = solo::api::auth::new_token().unwrap();
    let tweak = move |config: &mut solo::config::Config| {
        config.security.admin_token_sha256 = vec![admin_hash.clone()];
        config.tenants.insert(
            "acme".into(),
            solo::config::TenantConfig {
                token_sha256: vec![acme_hash.clone()],
                limits: None,
            },
        );
    };
    (admin_token, acme_token, tweak)
}

#[test]
fn tokens_decide_who_may_do_what_and_shutdown_is_the_admins() {
    let (admin, acme, tweak) = with_tokens();
    let node = Node::start(tweak);
    let echo = example_path("echo");
    let echo = echo.to_str().unwrap();

    // No token, a wrong one: 4.
    let ran = run(node.solo().args(["list"])).fails(4);
    assert!(ran.stderr.contains("token"), "{}", ran.stderr);
    let ran = run(node.solo().args(["--token", "solo_wrong", "list"])).fails(4);
    assert!(ran.stderr.contains("invalid token"), "{}", ran.stderr);
    run(node
        .solo()
        .env("SOLO_TOKEN", "solo_wrong")
        .args(["deploy", "echo", echo]))
    .fails(4);

    // The tenant's token acts for the tenant, and only for it.
    run(node
        .solo()
        .env("SOLO_TOKEN", &acme)
        .args(["deploy", "echo", echo, "--wait"]))
    .ok();
    let mine = run(node.solo().args(["--token", &acme, "list", "--json"])).ok().json();
    assert_eq!(mine["services"][0]["tenant"], "acme");
    let ran = run(node.solo().args(["--token", &acme, "--tenant", "beta", "list"])).fails(4);
    assert!(ran.stderr.contains("cannot act for tenant 'beta'"), "{}", ran.stderr);
    run(node.solo().args(["--token", &acme, "shutdown"])).fails(4);

    // The admin picks a tenant with --tenant (or SOLO_TENANT).
    let theirs = run(node
        .solo()
        .args(["--token", &admin, "--tenant", "acme", "status", "echo", "--json"]))
    .ok()
    .json();
    assert_eq!(theirs["tenant"], "acme");
    run(node
        .solo()
        .env("SOLO_TOKEN", &admin)
        .env("SOLO_TENANT", "acme")
        .args(["status", "echo"]))
    .ok();
    run(node.solo().args(["--token", &admin, "status", "echo"])).fails(3);

    // Shutdown: the admin's; afterwards the node is gone (5).
    let done = run(node
        .solo()
        .args(["--token", &admin, "shutdown", "--grace-ms", "2000", "--json"]))
    .ok()
    .json();
    assert!(done["seq"].as_u64().unwrap() > 1);
    let url = node.url.clone();
    node.stopped();
    run(solo().args(["--endpoint", &url, "--token", &admin, "list"])).fails(5);
}

/// A CA, and a certificate it signed for 127.0.0.1 (server) or naming `tenant` (client).
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "solo test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes NAME.pem and NAME.key.
    fn issue(&self, name: &str, params: rcgen::CertificateParams) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.ca).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[test]
fn tls_with_the_nodes_ca_and_a_client_certificate_that_names_the_tenant() {
    let pki = Pki::new();
    pki.issue(
        "server",
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap(),
    );
    let mut client = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    client.distinguished_name.push(rcgen::DnType::CommonName, "acme");
    pki.issue("acme", client);
    let (cert, key, ca) = (pki.path("server.pem"), pki.path("server.key"), pki.path("ca.pem"));
    let node = Node::start(|config| {
        config.security.tls_cert = Some(cert);
        config.security.tls_key = Some(key);
        config.security.client_ca = Some(ca);
    });
    assert!(node.url.starts_with("https://"), "{}", node.url);
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().unwrap();
    let client_cert = pki.path("acme.pem");
    let client_key = pki.path("acme.key");
    let identity = [
        "--ca-cert",
        ca,
        "--client-cert",
        client_cert.to_str().unwrap(),
        "--client-key",
        client_key.to_str().unwrap(),
    ];
    let echo = example_path("echo");
    run(node
        .solo()
        .args(identity)
        .args(["deploy", "echo", echo.to_str().unwrap(), "--wait"]))
    .ok();
    let status = run(node.solo().args(identity).args(["status", "echo", "--json"]))
        .ok()
        .json();
    assert_eq!(status["tenant"], "acme", "the certificate named the tenant");
    // The CA from the environment, the endpoint without a scheme: https, since TLS files are given.
    let bare = node.url.trim_start_matches("https://").to_string();
    let ran = run(solo()
        .env("SOLO_CA_CERT", ca)
        .env("SOLO_ENDPOINT", &bare)
        .args([
            "--client-cert",
            client_cert.to_str().unwrap(),
            "--client-key",
            client_key.to_str().unwrap(),
        ])
        .args(["call", "echo", "--data", "over tls"]))
    .ok();
    assert_eq!(ran.stdout, b"over tls");
    // Without a client certificate this node refuses the handshake: unauthenticated. With
    // the wrong CA the node's certificate is not trusted: the node is not reached.
    let ran = run(node.solo().args(["--ca-cert", ca, "list"])).fails(4);
    assert!(
        ran.stderr
            .contains(&format!("the node at {} requires a client certificate", node.url))
            && ran.stderr.contains("--client-cert"),
        "{}",
        ran.stderr
    );
    let other = Pki::new();
    let ran = run(node
        .solo()
        .args(["--ca-cert", other.path("ca.pem").to_str().unwrap(), "list"]))
    .fails(5);
    assert!(ran.stderr.contains("certificate"), "{}", ran.stderr);
    run(node.solo().args(["--ca-cert", "/no/such/ca.pem", "list"])).fails(1);
    // A file that holds no certificate is refused at once, by name.
    let junk = pki.path("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let junk = junk.to_str().unwrap();
    for args in [
        &["--ca-cert", junk][..],
        &[
            "--ca-cert",
            ca,
            "--client-cert",
            junk,
            "--client-key",
            client_key.to_str().unwrap(),
        ],
        &[
            "--ca-cert",
            ca,
            "--client-cert",
            client_cert.to_str().unwrap(),
            "--client-key",
            junk,
        ],
    ] {
        let ran = run(node.solo().args(args).arg("list")).fails(1);
        assert!(
            ran.stderr.contains(junk) && ran.stderr.contains("PEM"),
            "{}",
            ran.stderr
        );
    }
    run(node
        .solo()
        .args(["--ca-cert", ca, "--client-cert", client_cert.to_str().unwrap(), "list"]))
    .fails(2);
}

#[test]
fn the_offline_tools_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let token = run(solo().args(["token", "new"])).ok();
    assert!(token.text().starts_with("solo_") && token.stderr.contains("admin_token_sha256"));
    let token = run(solo().args(["token", "new", "--json"])).ok().json();
    assert!(token["token"].as_str().unwrap().starts_with("solo_"), "{token}");
    assert_eq!(token["token_sha256"].as_str().unwrap().len(), 64, "{token}");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let checked = run(solo().args(["config", "check", example.to_str().unwrap()])).ok();
    assert!(checked.stderr.contains(": ok"), "{}", checked.stderr);
    let checked = run(solo().args(["config", "check", example.to_str().unwrap(), "--json"]))
        .ok()
        .json();
    assert!(checked["solo"]["grpc_addr"].is_string(), "{checked}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[solo]\nnot_a_key = 1\n").unwrap();
    assert_eq!(run(solo().args(["config", "check", bad.to_str().unwrap()])).code, 1);
    // For programs, the refusal is a document on stdout too, with the sentence on stderr.
    let ran = run(solo().args(["config", "check", bad.to_str().unwrap(), "--json"]));
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    let refused = ran.json();
    assert_eq!(refused["ok"], false, "{refused}");
    let message = refused["error"].as_str().unwrap();
    assert!(
        message.contains("not_a_key") && ran.stderr.contains(message),
        "{refused} {}",
        ran.stderr
    );
    // Values that would pass a check and break `serve` are refused by the check, by key.
    for (text, key) in [
        ("[solo]\ndata_dir = \"\"\n", "solo.data_dir"),
        (
            "[solo]\nwatch_progress_interval_ms = 0\n",
            "solo.watch_progress_interval_ms",
        ),
        (
            "[runtime]\nmax_wasm_stack_kb = 4294967295\n",
            "runtime.max_wasm_stack_kb",
        ),
        ("[runtime]\nepoch_tick_ms = 4294967295\n", "runtime.epoch_tick_ms"),
        // An instance pool within the address space but past what any system lets a process
        // map (two mappings an instance, at least).
        (
            "[runtime]\nmax_instances = 4000000\n[limits]\nmax_memory_mb = 1\ndefault_memory_mb = 1\n",
            "runtime.max_instances",
        ),
        // Refused by `serve` as it starts: no tokens, and a listener off loopback.
        ("[solo]\ngrpc_addr = \"0.0.0.0:50051\"\n", "no tokens are configured"),
    ] {
        std::fs::write(&bad, text).unwrap();
        let ran = run(solo().args(["config", "check", bad.to_str().unwrap()])).fails(1);
        assert!(ran.stderr.contains(key), "{text}: {}", ran.stderr);
    }

    // A data directory with two tenants' events, read offline.
    let data = dir.path().join("data");
    {
        let node = Node::start(|config| config.solo.data_dir = data.clone());
        node.deploy("acme", "echo", "echo", &[]);
        node.deploy("beta", "echo", "echo", &[]);
    }
    let data = data.to_str().unwrap();
    let verified = run(solo().args(["log", "verify", "--data-dir", data])).ok();
    assert!(!verified.text().is_empty());
    let verified = run(solo().args(["log", "verify", "--data-dir", data, "--json"]))
        .ok()
        .json();
    assert_eq!(verified["ok"], true, "{verified}");
    assert!(verified["records"].as_u64().unwrap() >= 5, "{verified}");
    let stats = run(solo().args(["log", "stats", "--data-dir", data, "--json"]))
        .ok()
        .json();
    assert!(stats["head"].as_u64().unwrap() >= 5, "{stats}");
    // `log dump --tenant` filters; SOLO_TENANT (the client's tenant) does not.
    let dump = |extra: &[&str], env_tenant: Option<&str>| -> Vec<Value> {
        let mut cmd = solo();
        if let Some(tenant) = env_tenant {
            cmd.env("SOLO_TENANT", tenant);
        }
        run(cmd.args(["log", "dump", "--data-dir", data, "--json"]).args(extra))
            .ok()
            .json_lines()
    };
    let all = dump(&[], Some("acme"));
    assert_eq!(all.len() as u64, stats["head"].as_u64().unwrap());
    let acme = dump(&["--tenant", "acme"], Some("beta"));
    assert!(!acme.is_empty() && acme.iter().all(|e| e["tenant"] == "acme"));
    // A range that holds nothing is a mistake in the command, not an empty answer.
    let backwards = run(solo().args(["log", "dump", "--data-dir", data, "--from", "5", "--to", "3"]));
    assert!(backwards.fails(2).stderr.contains("--from 5 is after --to 3"));
    let head = stats["head"].as_u64().unwrap();
    let past = (head + 2).to_string();
    let beyond = run(solo().args(["log", "dump", "--data-dir", data, "--from", &past])).fails(2);
    let expected = format!("--from {past} is past the log's head (seq {head})");
    assert!(beyond.stderr.contains(&expected), "{}", beyond.stderr);
    // What comes after the head is nothing yet, and that is no mistake.
    let next = (head + 1).to_string();
    assert!(dump(&["--from", &next], None).is_empty());
    let people = run(solo().args(["log", "stats", "--data-dir", data])).ok().text();
    assert!(people.contains("by kind:"), "{people}");
}

/// A `solo` child process whose stdout lines arrive on a channel and whose stderr is kept.
struct Watcher {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    seen: Vec<String>,
}

impl Watcher {
    fn spawn(args: &[&str]) -> Watcher {
        let mut child = spawn_piped(args);
        let (send, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        Watcher {
            child,
            lines,
            stderr,
            seen: Vec::new(),
        }
    }

    /// Reads lines until `done` holds for what was seen so far.
    fn until(&mut self, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(e) => panic!(
                    "{what}: {e}; seen {:?}; stderr {}",
                    self.seen,
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    /// Ends it as Ctrl-C would, which is a clean end (exit 0).
    fn interrupt(mut self) -> (Vec<String>, String) {
        let sent = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "Ctrl-C did not end it");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{status}: {}", self.stderr.lock().unwrap());
        self.stop()
    }

    fn stop(mut self) -> (Vec<String>, String) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        let stderr = self.stderr.lock().unwrap().clone();
        (self.seen, stderr)
    }
}

/// `solo serve` as a child process on fixed ports.
struct ServeProcess {
    child: Child,
    _stdout: BufReader<std::process::ChildStdout>,
}

impl ServeProcess {
    /// `prelude`, if any, runs in `sh` first and confines the node (as `ulimit` does).
    fn start(data: &Path, grpc: u16, http: u16, log: &Path, prelude: Option<&str>) -> ServeProcess {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut cmd = match prelude {
                None => std::process::Command::new(bin()),
                Some(prelude) => {
                    let mut sh = std::process::Command::new("sh");
                    sh.args(["-c", &format!("{prelude}; exec \"$0\" \"$@\""), bin()]);
                    sh
                }
            };
            for var in SOLO_VARS {
                cmd.env_remove(var);
            }
            let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
            let mut child = cmd
                .args(["serve", "--data-dir", data.to_str().unwrap()])
                .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
                .args(["--http-addr", &format!("127.0.0.1:{http}")])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log_file)
                .spawn()
                .unwrap();
            let mut stdout = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            if line.starts_with("solo listening") {
                assert!(line.contains(&format!("grpc=127.0.0.1:{grpc}")), "{line}");
                return ServeProcess { child, _stdout: stdout };
            }
            // The port may linger for a moment after the previous node; try again.
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "solo serve did not start: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -9`.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits until it has exited by itself (after `solo shutdown`).
    fn exited(mut self) {
        self.wait_exit();
    }

    /// Sends `signal` (SIGTERM, as a service manager stopping it would; SIGHUP, as a closed
    /// terminal would) and returns how it exited.
    fn signal(mut self, signal: &str) -> std::process::ExitStatus {
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the node did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A data directory, a log file and two free ports for `solo serve` child processes.
struct ServeDir {
    _dir: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
    grpc: u16,
    http: u16,
    endpoint: String,
}

impl ServeDir {
    fn new() -> ServeDir {
        let dir = tempfile::tempdir().unwrap();
        let grpc = free_port();
        ServeDir {
            data: dir.path().join("data"),
            log: dir.path().join("serve.log"),
            grpc,
            http: free_port(),
            endpoint: format!("http://127.0.0.1:{grpc}"),
            _dir: dir,
        }
    }

    fn start(&self) -> ServeProcess {
        ServeProcess::start(&self.data, self.grpc, self.http, &self.log, None)
    }

    /// Starts the node after `prelude` has run in the shell that execs it.
    fn start_confined(&self, prelude: &str) -> ServeProcess {
        ServeProcess::start(&self.data, self.grpc, self.http, &self.log, Some(prelude))
    }

    /// `GET /health`: the HTTP status, and the body as JSON.
    fn health(&self) -> (u16, Value) {
        let url = format!("http://127.0.0.1:{}/health", self.http);
        block_on(async {
            let response = reqwest::get(url).await.unwrap();
            (response.status().as_u16(), response.json().await.unwrap())
        })
    }

    /// The node's overall status from the standard gRPC health service.
    fn grpc_health(&self) -> tonic_health::pb::health_check_response::ServingStatus {
        let url = format!("http://127.0.0.1:{}", self.grpc);
        block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let check = tonic_health::pb::HealthCheckRequest { service: String::new() };
            health.check(check).await.unwrap().into_inner().status()
        })
    }

    /// The ids `solo list` shows tenant acme.
    fn service_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.cli(&["list", "--json"]).ok().json()["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["service_id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// Deploys `unreachable` as acme/`id`, running, with one restart allowed: its second
    /// crashing call leaves it down.
    fn deploy_crasher(&self, id: &str) {
        let crasher = example_path("unreachable");
        self.cli(&["deploy", id, crasher.to_str().unwrap(), "--max-restarts", "1", "--wait"])
            .ok();
    }

    /// `solo` against the node, as tenant acme.
    fn cli(&self, args: &[&str]) -> Ran {
        run(solo()
            .args(["--endpoint", &self.endpoint, "--tenant", "acme"])
            .args(args))
    }
}

#[test]
fn sigterm_stops_serve_cleanly_and_the_next_start_brings_the_services_back() {
    let serve = ServeDir::new();
    let (data, log) = (&serve.data, &serve.log);
    let cli = |args: &[&str]| serve.cli(args);

    let node = serve.start();
    cli(&["deploy", "echo", example_path("echo").to_str().unwrap(), "--wait"]).ok();
    let status = node.signal("TERM");
    let stderr = std::fs::read_to_string(log).unwrap();
    assert!(status.success(), "SIGTERM ended it with {status}: {stderr}");
    assert!(stderr.contains("shutdown signal received"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "no colour off a terminal: {stderr}");

    // The stop is on record, by the node, and says nothing about what should run.
    let dump = run(solo().args(["log", "dump", "--data-dir", data.to_str().unwrap(), "--json"]))
        .ok()
        .json_lines();
    let shutdown = dump
        .iter()
        .find(|e| e["kind"] == "shutdown_requested")
        .unwrap_or_else(|| panic!("no shutdown_requested in {dump:?}"));
    assert_eq!(shutdown["actor"], "node", "{shutdown}");
    run(solo().args(["log", "verify", "--data-dir", data.to_str().unwrap()])).ok();

    let _node = serve.start();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = cli(&["status", "echo", "--json"]).ok().json();
        if status["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "echo did not come back: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        cli(&["call", "echo", "--data", "back again"]).ok().stdout,
        b"back again"
    );
    drop(_node);

    // A hangup (the terminal closed) stops it as cleanly, rather than killing it on the spot.
    std::fs::write(log, "").unwrap();
    let status = serve.start().signal("HUP");
    let stderr = std::fs::read_to_string(log).unwrap();
    assert!(status.success(), "SIGHUP ended it with {status}: {stderr}");
    assert!(stderr.contains("SIGHUP"), "{stderr}");
    let dump = run(solo().args(["log", "dump", "--data-dir", data.to_str().unwrap(), "--json"]))
        .ok()
        .json_lines();
    let stops = dump.iter().filter(|e| e["kind"] == "shutdown_requested").count();
    assert_eq!(stops, 2, "{dump:?}");
}

/// A backup taken while the node serves is a data directory of its own: verified, never written
/// over, and a node started on it serves what the log held when it was taken.
#[test]
fn a_backup_taken_while_serving_restores_what_the_log_held_then() {
    let serve = ServeDir::new();
    let cli = |args: &[&str]| serve.cli(args);
    let node = serve.start();
    cli(&["deploy", "echo", example_path("echo").to_str().unwrap(), "--wait"]).ok();
    cli(&["deploy", "counter", example_path("counter").to_str().unwrap(), "--wait"]).ok();
    let backups = tempfile::tempdir().unwrap();
    let backup = backups.path().join("one");
    let back_up = |dest: &Path| {
        run(solo().args([
            "log",
            "backup",
            "--json",
            "--data-dir",
            serve.data.to_str().unwrap(),
            dest.to_str().unwrap(),
        ]))
    };
    let taken = back_up(&backup).ok().json();
    assert_eq!(
        (taken["ok"].as_bool(), taken["verify"]["ok"].as_bool()),
        (Some(true), Some(true)),
        "{taken}"
    );
    let head = taken["head"].as_u64().unwrap();
    assert!(head >= 4, "two deploys and two starts: {taken}");
    assert!(
        taken["bytes"].as_u64() <= taken["source_bytes"].as_u64(),
        "compacted: {taken}"
    );
    let files: Vec<_> = std::fs::read_dir(&backup)
        .unwrap()
        .map(|f| f.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files, ["data.mdb"], "the data file alone, nothing left of the staging");

    // What happens after the backup is not in it; a second backup never writes over the first.
    cli(&["deploy", "kv", example_path("kv").to_str().unwrap(), "--wait"]).ok();
    let refused = back_up(&backup).fails(1);
    assert!(
        refused.stderr.contains("already holds a data file"),
        "{}",
        refused.stderr
    );
    let again = run(solo().args(["log", "verify", "--json", "--data-dir", backup.to_str().unwrap()]))
        .ok()
        .json();
    assert_eq!(
        again["head"].as_u64(),
        Some(head),
        "the first backup is as it was: {again}"
    );

    // Over the API, as the admin (a tenant is refused, and leaves nothing behind).
    let remote = backups.path().join("remote");
    let refused = cli(&["backup", remote.to_str().unwrap()]).fails(4);
    assert!(refused.stderr.contains("only the admin"), "{}", refused.stderr);
    assert!(!remote.exists());
    let streamed = run(solo().args([
        "--endpoint",
        &serve.endpoint,
        "--json",
        "backup",
        remote.to_str().unwrap(),
    ]))
    .ok()
    .json();
    assert_eq!(streamed["verify"]["ok"].as_bool(), Some(true), "{streamed}");
    assert!(streamed["head"].as_u64() > Some(head), "kv's deploy too: {streamed}");
    assert_eq!(streamed["sha256"].as_str().map(str::len), Some(64), "{streamed}");
    node.kill();

    // Restored: a node on the backup brings back the services running when it was taken.
    let restored = ServeDir {
        data: backup,
        ..ServeDir::new()
    };
    let _node = restored.start();
    let deadline = Instant::now() + PATIENCE;
    while restored.cli(&["status", "counter", "--json"]).ok().json()["status"] != "running" {
        assert!(Instant::now() < deadline, "counter did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(restored.service_ids(), ["counter", "echo"]);
    assert_eq!(
        restored.cli(&["call", "echo", "--data", "restored"]).ok().stdout,
        b"restored"
    );
}

/// A compile cannot be cancelled: one still under way when the node has stopped does not hold
/// its process, which exits without it (it used to wait for the compile, minutes or hours).
#[test]
fn a_compile_under_way_does_not_hold_a_stopped_node_from_exiting() {
    let serve = ServeDir::new();
    let scratch = serve.log.parent().unwrap();
    // Loops nested 30,000 deep take tens of seconds to compile: let this node take them.
    let config = scratch.join("loose.toml");
    std::fs::write(&config, "[runtime]\nmax_looped_instructions = 1000000000000\n").unwrap();
    let module = scratch.join("nested.wat");
    let nested = format!("{}(nop){}", "(loop ".repeat(30_000), ")".repeat(30_000));
    std::fs::write(
        &module,
        format!(
            r#"(module (memory (export "memory") 1)
                 (func (export "solo_alloc") (param i32) (result i32) (i32.const 0))
                 (func (export "solo_handle") (param i32 i32) (result i64) {nested} (i64.const 0)))"#
        ),
    )
    .unwrap();
    let mut node = serve.start_confined(&format!("export SOLO_CONFIG='{}'", config.display()));
    let mut deploy = std::process::Command::new(bin())
        .args(["--endpoint", &serve.endpoint, "--tenant", "acme", "deploy", "nested"])
        .arg(&module)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once the compile is under way, the admin shuts the node down.
    std::thread::sleep(Duration::from_secs(2));
    run(solo().args(["--endpoint", &serve.endpoint, "shutdown", "--grace-ms", "200"])).ok();
    // The stop takes some seconds (its grace, the last answers, the data directory's release);
    // the compile, far longer.
    let deadline = Instant::now() + Duration::from_secs(25);
    let status = loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the node's process waited for the compile");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&serve.log).unwrap()
    );
    let _ = deploy.kill();
    let _ = deploy.wait();
}

#[test]
fn events_and_logs_follow_across_restarts_without_a_gap_or_a_repeat() {
    let serve = ServeDir::new();
    let (data, endpoint) = (&serve.data, serve.endpoint.clone());
    let cli = |args: &[&str]| serve.cli(args);
    let echo = example_path("echo");
    let counter = example_path("counter");

    let node = serve.start();
    cli(&["deploy", "echo", echo.to_str().unwrap(), "--wait"]).ok();
    let mut events = Watcher::spawn(&["--endpoint", &endpoint, "events", "--follow", "--from", "1", "--json"]);
    let mut logs = Watcher::spawn(&[
        "--endpoint",
        &endpoint,
        "--tenant",
        "acme",
        "logs",
        "echo",
        "--follow",
        "--json",
    ]);
    let ready = |seen: &[String], n: usize| seen.iter().filter(|l| l.contains("\"echo ready\"")).count() >= n;
    logs.until("the first echo ready", |seen| ready(seen, 1));
    cli(&["deploy", "counter", counter.to_str().unwrap(), "--wait"]).ok();
    events.until("the counter's start", |seen| {
        seen.iter()
            .any(|l| l.contains("\"service_started\"") && l.contains("counter"))
    });

    // kill -9 while the followers follow; deploys after the restart must reach them.
    node.kill();
    let node = serve.start();
    cli(&["deploy", "kv", example_path("kv").to_str().unwrap(), "--wait"]).ok();
    logs.until("echo ready after kill -9", |seen| ready(seen, 2));

    // A clean shutdown through the API, then a third node.
    cli(&["kill", "counter", "--wait"]).ok();
    run(solo().args(["--endpoint", &endpoint, "shutdown", "--grace-ms", "2000"])).ok();
    node.exited();
    let node = serve.start();
    cli(&["deploy", "counter", counter.to_str().unwrap(), "--wait"]).ok();
    logs.until("echo ready after a shutdown", |seen| ready(seen, 3));
    // The node records its start once all its services are back, which may come after the
    // deploy's: the dump below must hold it.
    events.until("the third node's start", |seen| {
        seen.iter().filter(|l| l.contains("\"node_started\"")).count() >= 3
    });

    // What the log holds, read offline while the node runs.
    let dump = run(solo().args(["log", "dump", "--data-dir", data.to_str().unwrap(), "--json"]))
        .ok()
        .json_lines();
    let head = dump.last().unwrap()["seq"].as_u64().unwrap();
    events.until("the head", |seen| {
        seen.last()
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .is_some_and(|e| e["seq"].as_u64() >= Some(head))
    });
    let (followed, notes) = events.interrupt();
    let followed: Vec<Value> = followed.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seqs: Vec<u64> = followed.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=head).collect::<Vec<_>>(),
        "every seq once, in order; stderr: {notes}"
    );
    assert_eq!(followed, dump, "the same events as the log");
    assert!(
        notes.matches("reconnected").count() >= 2,
        "each reconnect is noted on stderr: {notes}"
    );
    // Two nodes started after the first, and each was seen.
    let starts = followed.iter().filter(|e| e["kind"] == "node_started").count();
    assert_eq!(starts, 3);

    let (lines, notes) = logs.interrupt();
    let lines: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let unique: HashSet<(u64, u64, String)> = lines
        .iter()
        .map(|l| {
            (
                l["seq"].as_u64().unwrap(),
                l["timestamp_ms"].as_u64().unwrap(),
                l["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(unique.len(), lines.len(), "no line twice: {lines:?}");
    assert_eq!(
        lines.iter().filter(|l| l["message"] == "echo ready").count(),
        3,
        "one start per node: {lines:?}; stderr: {notes}"
    );
    assert!(notes.contains("reconnected"), "{notes}");
    assert_eq!(
        notes.matches("starts afresh").count(),
        2,
        "each restarted node's new log is noted once: {notes}"
    );
    drop(node);
}

/// Deploys modules of 200 KB each, each kept once in the blob store, until the node runs out
/// of room; then checks that the failure says `why` and wrote nothing, and that the node goes
/// on serving. With `make_room`, room is made while the node runs and the refused deploy then
/// succeeds at once; without, only a restart lifts the limit. Either way a restart after
/// `kill -9` finds every acknowledged deploy, and nothing else, in a log that verifies.
fn running_out_of_room(serve: &ServeDir, node: ServeProcess, why: &str, make_room: Option<&dyn Fn()>) {
    let modules = tempfile::tempdir().unwrap();
    let (mut acknowledged, (refused, module)) = fill_the_log(serve, modules.path(), why);
    let deploy_refused = || serve.cli(&["deploy", &refused, module.to_str().unwrap()]);

    // Out of room, the node still answers, and holds exactly what it acknowledged.
    assert_eq!(serve.service_ids(), acknowledged);
    deploy_refused().fails(1);
    if let Some(make_room) = make_room {
        make_room();
        deploy_refused().ok();
        acknowledged.push(refused.clone());
    }

    node.kill();
    let _node = serve.start();
    run(solo().args(["log", "verify", "--data-dir", serve.data.to_str().unwrap()])).ok();
    assert_eq!(serve.service_ids(), acknowledged);
    if make_room.is_none() {
        deploy_refused().ok();
    }
}

/// `echo` padded to 200 KB with a custom section, a module of its own for each `i`, written in
/// `dir`.
fn padded_echo(dir: &Path, i: usize) -> PathBuf {
    let echo = std::fs::read_to_string(example_path("echo")).unwrap();
    let body = echo.trim_end().strip_suffix(')').expect("a module ends with ')'");
    let path = dir.join(format!("big-{i}.wat"));
    let padding = format!("{i:02}").repeat(100_000);
    std::fs::write(&path, format!("{body}\n  (@custom \"padding\" \"{padding}\"))\n")).unwrap();
    path
}

/// Deploys modules of 200 KB each (kept in `modules`), each kept once in the blob store, until
/// the node refuses one for want of room, saying `why`. Returns the services acknowledged, and
/// the one refused with its module.
fn fill_the_log(serve: &ServeDir, modules: &Path, why: &str) -> (Vec<String>, (String, PathBuf)) {
    let mut acknowledged = Vec::new();
    let mut refused = None;
    for i in 0..64 {
        let path = padded_echo(modules, i);
        let id = format!("big-{i:02}");
        let ran = serve.cli(&["deploy", &id, path.to_str().unwrap()]);
        if ran.code == 0 {
            acknowledged.push(id);
            continue;
        }
        let ran = ran.fails(1);
        assert!(ran.stderr.contains(why), "the error says {why:?}: {}", ran.stderr);
        // Where the node keeps its data is not the client's business.
        assert!(!ran.stderr.contains(serve.data.to_str().unwrap()), "{}", ran.stderr);
        assert!(
            ran.stderr.contains("nothing of the failed batch was written"),
            "{}",
            ran.stderr
        );
        refused = Some((id, path));
        break;
    }
    let refused = refused.expect("the node ran out of room");
    assert!(!acknowledged.is_empty(), "some deploys fit");
    (acknowledged, refused)
}

#[test]
fn a_file_size_limit_fails_the_batch_says_so_and_loses_nothing() {
    let serve = ServeDir::new();
    // A few MiB (sh counts in blocks of 512 or 1024 bytes). The node itself ignores SIGXFSZ,
    // whose default would kill it, so a write past the limit fails as on a full disk.
    let node = serve.start_confined("ulimit -f 6144");
    running_out_of_room(&serve, node, "file size limit", None);
}

/// A small tmpfs mounted for one test, unmounted when it ends.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` where this process may not mount file systems (it is not root).
    fn mount(mib: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk { dir })
    }

    /// A serve directory whose data lives on a tmpfs of `mib` MiB; `None` (and a note) where
    /// this process may not mount one. CI runs as root; a developer's machine may not.
    fn serve_dir(mib: u32) -> Option<(SmallDisk, ServeDir)> {
        let Some(disk) = SmallDisk::mount(mib) else {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        };
        let mut serve = ServeDir::new();
        serve.data = disk.dir.path().join("data");
        Some((disk, serve))
    }

    fn resize(&self, mib: u32) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "the tmpfs grows");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_fails_the_batch_says_so_and_loses_nothing() {
    let Some((disk, serve)) = SmallDisk::serve_dir(4) else {
        return;
    };
    let node = serve.start();
    running_out_of_room(&serve, node, "is full", Some(&|| disk.resize(64)));
}

#[test]
fn a_crash_while_the_disk_is_full_is_recorded_once_the_disk_has_room() {
    let Some((disk, serve)) = SmallDisk::serve_dir(4) else {
        return;
    };
    let _node = serve.start();
    serve.deploy_crasher("crash");
    let modules = tempfile::tempdir().unwrap();
    fill_the_log(&serve, modules.path(), "is full");
    // Small events still fit in what the big ones left: upgrade a service with fewer and
    // fewer labels until not even the smallest fits.
    let echo = example_path("echo");
    for (labels, value_len) in [(64, 256), (1, 1)] {
        for n in 0.. {
            assert!(n < 1000, "the disk never filled");
            let mut args = vec!["deploy".to_string(), "filler".into(), echo.to_str().unwrap().into()];
            for i in 0..labels {
                args.extend(["--label".into(), format!("k{i}={n:0>value_len$}")]);
            }
            let ran = serve.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
            if ran.code != 0 {
                assert!(ran.fails(1).stderr.contains("is full"));
                break;
            }
        }
    }

    // The guest traps, restarts, traps again, and its restart policy gives up; the log can
    // take none of it.
    for _ in 0..2 {
        let ran = serve.cli(&["call", "crash", "--data", "x"]).fails(1);
        assert!(ran.stderr.contains("trapped"), "{}", ran.stderr);
    }
    let status = || serve.cli(&["status", "crash", "--json"]).ok().json()["status"].clone();
    assert_eq!(status(), "running", "the log could not take the crash yet");
    let (code, health) = serve.health();
    let waiting = health["unrecorded_observations"].as_u64().unwrap();
    assert!(waiting >= 3, "crashed, restarted, crashed wait for the log: {waiting}");
    // The node says that its log takes no writes, and why; its gRPC health follows.
    assert_eq!((code, health["status"].as_str()), (503, Some("degraded")), "{health}");
    assert!(health["log_error"].as_str().unwrap().contains("is full"), "{health}");
    let grpc_health_becomes = |expected| {
        let deadline = Instant::now() + PATIENCE;
        while serve.grpc_health() != expected {
            assert!(Instant::now() < deadline, "the gRPC health never became {expected:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    grpc_health_becomes(tonic_health::pb::health_check_response::ServingStatus::NotServing);

    // Once the disk has room, what happened is recorded, in order: in the log, and so in the
    // state.
    disk.resize(64);
    let deadline = Instant::now() + PATIENCE;
    while status() != "crashed" || serve.health().1["unrecorded_observations"] != 0 {
        assert!(Instant::now() < deadline, "the crash was never recorded");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The retries' commits cleared the alarm.
    let (code, health) = serve.health();
    assert_eq!((code, health["status"].as_str()), (200, Some("ok")), "{health}");
    assert!(health["log_error"].is_null(), "{health}");
    grpc_health_becomes(tonic_health::pb::health_check_response::ServingStatus::Serving);
    let events = serve
        .cli(&["events", "--from", "1", "--service", "crash", "--json"])
        .ok()
        .json_lines();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "service_deployed",
            "service_started",
            "service_crashed",
            "service_restarted",
            "service_crashed"
        ]
    );
}

/// A full disk's alarm clears once the disk has room again, with no client write to wait for:
/// a readiness probe that keeps clients away from a degraded node would otherwise keep it
/// degraded for good.
#[test]
fn a_full_disks_alarm_clears_once_it_has_room_though_nobody_writes() {
    let Some((disk, serve)) = SmallDisk::serve_dir(4) else {
        return;
    };
    let _node = serve.start();
    serve
        .cli(&["deploy", "echo", example_path("echo").to_str().unwrap(), "--wait"])
        .ok();
    let filler = disk.dir.path().join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        while file.write_all(&[0; 4096]).is_ok() {}
    }
    let modules = tempfile::tempdir().unwrap();
    let module = padded_echo(modules.path(), 0);
    let deploy = || serve.cli(&["deploy", "big", module.to_str().unwrap()]);
    assert!(deploy().fails(1).stderr.contains("is full"));
    let (code, health) = serve.health();
    assert_eq!((code, health["status"].as_str()), (503, Some("degraded")), "{health}");
    assert_eq!(
        health["unrecorded_observations"], 0,
        "nothing else waits to be written: {health}"
    );
    // While the disk is still full, the node's probes (a small write may fit in the data
    // file's free pages) do not call it healthy.
    std::thread::sleep(Duration::from_secs(3));
    let (code, health) = serve.health();
    assert_eq!((code, health["status"].as_str()), (503, Some("degraded")), "{health}");

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (code, health) = serve.health();
        if code == 200 {
            assert_eq!(health["status"], "ok", "{health}");
            assert!(health["log_error"].is_null(), "{health}");
            break;
        }
        assert!(Instant::now() < deadline, "the alarm never cleared: {health}");
        std::thread::sleep(Duration::from_millis(100));
    }
    deploy().ok();
}

/// With no room left for LMDB's lock file, `serve` and the `solo log` tools say the disk is
/// full. LMDB makes that file without allocating it and writes it through its map, so a node
/// died of SIGBUS with nothing said, and the tools reported the data file as damaged.
#[test]
fn with_no_room_for_lmdbs_lock_file_the_node_and_the_tools_say_the_disk_is_full() {
    let Some(disk) = SmallDisk::mount(2) else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    // A log restored as the README says: its data.mdb moved into an empty directory.
    let made = tempfile::tempdir().unwrap();
    {
        let node = Node::start(|config| config.solo.data_dir = made.path().join("data"));
        node.deploy("acme", "echo", "echo", &[]);
    }
    let restored = disk.dir.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    std::fs::copy(made.path().join("data/data.mdb"), restored.join("data.mdb")).unwrap();
    let filler = disk.dir.path().join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        while file.write_all(&[0; 4096]).is_ok() {}
    }

    let restored_arg = restored.to_str().unwrap();
    for tool in ["verify", "stats"] {
        let ran = run(solo().args(["log", tool, "--data-dir", restored_arg])).fails(1);
        assert!(ran.stderr.contains("is full"), "{tool}: {}", ran.stderr);
        assert!(!ran.stderr.contains("damaged"), "{tool}: {}", ran.stderr);
    }
    let fresh = disk.dir.path().join("fresh");
    for data in [restored_arg, fresh.to_str().unwrap()] {
        let serve = solo()
            .args(["serve", "--data-dir", data])
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&serve.stderr);
        assert_eq!(serve.status.code(), Some(1), "{data}: {stderr}");
        assert!(stderr.contains("is full"), "{data}: {stderr}");
    }
    // Nothing half-made was left behind to be taken for a damaged log.
    assert!(!restored.join("lock.mdb").exists());
    assert!(!fresh.join("data.mdb").exists());

    std::fs::remove_file(&filler).unwrap();
    let verified = run(solo().args(["log", "verify", "--data-dir", restored_arg, "--json"]))
        .ok()
        .json();
    assert_eq!(verified["ok"], true, "{verified}");
}

/// Runs one client request from these synchronous tests.
fn block_on<T>(request: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(request)
}

/// `solo serve` on `data` and free ports, for a node expected to refuse to start (one that
/// starts runs until the command's timeout).
fn serve_expecting_refusal(data: &str) -> Ran {
    run(solo()
        .args(["serve", "--data-dir", data, "--grpc-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0"]))
}

#[test]
fn a_second_node_on_a_data_directory_in_use_is_refused_and_offline_tools_still_read_it() {
    let serve = ServeDir::new();
    let first = serve.start();
    serve
        .cli(&["deploy", "echo", example_path("echo").to_str().unwrap()])
        .ok();
    let data = serve.data.to_str().unwrap();
    let second = serve_expecting_refusal(data);
    assert_ne!(second.code, 0, "{}", second.stderr);
    let pid = first.child.id().to_string();
    assert!(
        second.stderr.contains("in use by another node") && second.stderr.contains(&pid),
        "the refusal says who holds the directory: {}",
        second.stderr
    );
    // The first node is untouched and goes on writing; readers are welcome.
    serve
        .cli(&["deploy", "echo2", example_path("echo").to_str().unwrap()])
        .ok();
    run(solo().args(["log", "verify", "--data-dir", data])).ok();
    // The lock dies with its holder, kill -9 included: the next node starts at once.
    first.kill();
    let _next = serve.start();
    assert_eq!(serve.service_ids(), ["echo", "echo2"]);
}

#[test]
fn a_data_file_cut_short_is_refused_with_a_reason_not_a_crash() {
    let serve = ServeDir::new();
    let node = serve.start();
    for i in 0..20 {
        serve
            .cli(&["deploy", &format!("echo{i}"), example_path("echo").to_str().unwrap()])
            .ok();
    }
    node.kill();
    let file = serve.data.join("data.mdb");
    let length = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(length / 2)
        .unwrap();

    let data = serve.data.to_str().unwrap();
    for args in [
        vec!["log", "verify", "--data-dir", data],
        vec!["log", "stats", "--data-dir", data],
    ] {
        let ran = run(solo().args(&args));
        assert!(
            ran.code == 1 || ran.code == 2,
            "{args:?} exits with an error, not a signal: {}",
            ran.code
        );
        assert!(ran.stderr.contains("cut short"), "{args:?}: {}", ran.stderr);
    }
    // For programs: damage, which a backup repairs, not some other refusal.
    let ran = run(solo().args(["log", "verify", "--data-dir", data, "--json"]));
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    let report = ran.json();
    assert_eq!(
        (&report["ok"], &report["damaged"]),
        (&json!(false), &json!(true)),
        "{report}"
    );
    assert_eq!(
        ran.stderr.matches("restore it from a backup").count(),
        1,
        "{}",
        ran.stderr
    );
    let served = serve_expecting_refusal(data);
    assert!(
        served.code > 0 && served.stderr.contains("cut short"),
        "{}",
        served.stderr
    );
}

#[test]
fn a_data_directory_that_is_a_file_is_refused_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    std::fs::write(&file, "not a directory").unwrap();
    let data = file.to_str().unwrap();
    let served = serve_expecting_refusal(data);
    assert!(
        served.code > 0 && served.stderr.contains("it is a file, not a directory"),
        "{}",
        served.stderr
    );
    let verified = run(solo().args(["log", "verify", "--data-dir", data]));
    assert!(verified.code > 0, "{}", verified.stderr);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "not a directory",
        "left as it was"
    );
}

/// A data directory of `events` small events written straight to the store, which was opened
/// with a map of `map_size` bytes.
fn offline_data_dir(dir: &Path, map_size: u64, events: u64) {
    use prost::Message as _;
    let options = solo::log::StoreOptions {
        map_size,
        max_readers: 16,
        read_only: false,
        check_pages: true,
    };
    let store = solo::log::Store::open(dir, &options).unwrap();
    let frames: Vec<Vec<u8>> = (1..=events)
        .map(|seq| {
            let event = solo::proto::Event {
                seq,
                timestamp_ms: 1_700_000_000_000 + seq,
                tenant: "acme".into(),
                service_id: format!("svc-{seq}"),
                ..Default::default()
            };
            solo::log::frame::encode(&event.encode_to_vec())
        })
        .collect();
    store
        .append(
            1,
            frames.iter().map(Vec::as_slice),
            Default::default(),
            Default::default(),
        )
        .unwrap();
}

#[test]
fn stats_reports_the_map_the_data_directory_is_served_with() {
    let dir = tempfile::tempdir().unwrap();
    offline_data_dir(dir.path(), 1 << 20, 10);
    let data = dir.path().to_str().unwrap();
    // This process's config has the default map (64 GiB); the directory was served with 1 MiB.
    let stats = run(solo().args(["log", "stats", "--data-dir", data, "--json"]))
        .ok()
        .json();
    assert_eq!(stats["map_size_bytes"], 1 << 20, "{stats}");
    let people = run(solo().args(["log", "stats", "--data-dir", data])).ok().text();
    assert!(people.contains("of a 1048576 byte map"), "{people}");
}

#[test]
fn the_offline_tools_stop_quietly_when_stdout_closes() {
    let dir = tempfile::tempdir().unwrap();
    // Far more than a pipe holds (64 KiB), so dump is still writing when the reader goes.
    offline_data_dir(dir.path(), 64 << 20, 5_000);
    let data = dir.path().to_str().unwrap();
    let commands: [&[&str]; 6] = [
        &["log", "dump", "--data-dir", data],
        &["log", "dump", "--json", "--data-dir", data],
        &["log", "stats", "--data-dir", data],
        &["log", "stats", "--json", "--data-dir", data],
        &["log", "verify", "--data-dir", data],
        &["completions", "bash"],
    ];
    for args in commands {
        let mut child = spawn_piped(args);
        // `| head -c 10`: read a little, then close the pipe (before the short outputs are
        // even written, as the child is still starting).
        let mut stdout = child.stdout.take().unwrap();
        if args[1] == "dump" {
            let mut some = [0u8; 10];
            std::io::Read::read_exact(&mut stdout, &mut some).unwrap();
        }
        drop(stdout);
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stderr.is_empty(),
            "{args:?}: {:?}, stderr: {stderr}",
            output.status
        );
    }
}

/// A module whose `solo_stop` takes two seconds: killed gracefully, it stays `stopping` that long.
const SLOW_STOP: &str = r#"(module
  (import "solo" "now_ms" (func $now_ms (result i64)))
  (memory (export "memory") 1)
  (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "solo_handle") (param i32 i32) (result i64) (i64.const 0))
  (func (export "solo_stop")
    (local $until i64)
    (local.set $until (i64.add (call $now_ms) (i64.const 2000)))
    (loop $spin (br_if $spin (i64.lt_s (call $now_ms) (local.get $until))))))
"#;

#[test]
fn kill_wait_waits_for_a_service_that_is_still_stopping() {
    let node = Node::dev();
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("slow-stop.wat");
    std::fs::write(&module, SLOW_STOP).unwrap();
    let module = module.to_str().unwrap();
    node.run("acme", &["deploy", "slow", module, "--cpu-ms", "10000", "--wait"])
        .ok();
    let killed = node
        .run("acme", &["kill", "slow", "--grace-ms", "20000", "--json"])
        .ok()
        .json();
    assert_eq!(killed["already_stopped"], false, "{killed}");
    let status = || node.run("acme", &["status", "slow", "--json"]).ok().json()["status"].clone();
    assert_eq!(status(), "stopping");
    // Out of patience: a failure, but the same command may pass later.
    let impatient = node
        .run(
            "acme",
            &["kill", "slow", "--wait", "--wait-timeout-ms", "300", "--json"],
        )
        .fails(1)
        .json();
    assert_eq!(
        (&impatient["error"]["code"], &impatient["error"]["retryable"]),
        (&json!("failed"), &json!(true)),
        "{impatient}"
    );

    // A second kill finds a kill recorded: it says the service is stopping, not stopped, and
    // --wait waits until it has stopped.
    let started = Instant::now();
    let again = node.run("acme", &["kill", "slow", "--wait"]).ok().text();
    assert!(
        again.contains("slow is already stopping") && !again.contains("already stopped"),
        "{again}"
    );
    assert!(again.trim_end().ends_with("slow stopped"), "{again}");
    assert_eq!(status(), "stopped", "--wait returned after {:?}", started.elapsed());
    let again = node.run("acme", &["kill", "slow", "--wait", "--json"]).ok().json();
    assert_eq!(
        (
            again["already_stopped"].as_bool(),
            again["status"].as_str(),
            again["stopped"].as_bool()
        ),
        (Some(true), Some("stopped"), Some(true)),
        "{again}"
    );

    // Killed, then replaced while it stops, then the new version killed with --wait: the old
    // version's stop, recorded after this kill, does not end the wait; the new one's does.
    node.run("acme", &["deploy", "slow", module, "--cpu-ms", "10000", "--wait"])
        .ok();
    node.run("acme", &["kill", "slow", "--grace-ms", "20000"]).ok();
    node.deploy("acme", "slow", "echo", &[]);
    let killed = node.run("acme", &["kill", "slow", "--wait", "--json"]).ok().json();
    assert_eq!(killed["status"], "stopped", "{killed}");
    let status = node.run("acme", &["status", "slow", "--json"]).ok().json();
    assert_eq!(
        (status["version"].as_u64(), status["status"].as_str()),
        (Some(3), Some("stopped"))
    );
}

/// Waits for `child` to exit by itself, for at most `within`.
fn exits_within(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn follows_end_quietly_when_their_reader_goes_even_while_nothing_happens() {
    let node = Node::dev();
    node.deploy("acme", "echo", "echo", &[]);
    let commands: [&[&str]; 2] = [
        &["events", "--follow", "--from", "1", "--json"],
        &["--tenant", "acme", "logs", "echo", "--follow"],
    ];
    for args in commands {
        // `| head -1`: one line, then the reader goes; nothing new is ever printed.
        let mut child = spawn_piped(&[&["--endpoint", node.url.as_str()][..], args].concat());
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty(), "{args:?}");
        let status = exits_within(&mut child, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{args:?} still runs with no reader of its output"));
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(status.success() && stderr.is_empty(), "{args:?}: {status}: {stderr}");
    }
}

/// A listener that takes connections and answers each with `answer` (nothing: silent), for as
/// long as the test runs.
fn fake_peer(answer: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let _ = std::io::Write::write_all(&mut stream, answer);
            held.push(stream);
        }
    });
    url
}

#[test]
fn a_peer_that_does_not_answer_grpc_is_reported_within_the_connect_timeout() {
    // Accepts the connection, never answers: given up on after the connect timeout.
    let silent = fake_peer(b"");
    let started = Instant::now();
    let ran = run(solo().args(["--endpoint", &silent, "--connect-timeout-ms", "1000", "status", "kv"])).fails(5);
    assert!(
        ran.stderr
            .contains(&format!("cannot reach the node at {silent}: no answer within 1000 ms")),
        "{}",
        ran.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    // A follow too: it waits out the losses of a node that served it, not a first answer that
    // never comes.
    for follow in [&["events", "--follow"][..], &["logs", "kv", "--follow"]] {
        let ran = run(solo()
            .args(["--endpoint", &silent, "--connect-timeout-ms", "1000"])
            .args(follow))
        .fails(5);
        assert!(ran.stderr.contains("no answer within 1000 ms"), "{}", ran.stderr);
        assert!(!ran.stderr.contains("reconnected"), "{}", ran.stderr);
    }

    // The node's HTTP port, and an HTTP/1 server: not gRPC, and said so.
    let node = Node::dev();
    let http = format!("http://{}", node.server.as_ref().unwrap().http_addr);
    let web = fake_peer(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
    for (endpoint, detail) in [(&http, "(HTTP 404)"), (&web, "(it answers HTTP/1)")] {
        let ran = run(solo().args(["--endpoint", endpoint, "status", "kv"])).fails(5);
        assert!(
            ran.stderr.contains(&format!(
                "{endpoint} is not a gRPC endpoint {detail}: is it the node's gRPC address?"
            )),
            "{}",
            ran.stderr
        );
    }
    let ran = run(solo().args(["--endpoint", &http, "events", "--follow"])).fails(5);
    assert!(ran.stderr.contains("is not a gRPC endpoint"), "{}", ran.stderr);
    // An https endpoint of a node that speaks plaintext.
    let pki = Pki::new();
    let plaintext = format!("https://{}", node.server.as_ref().unwrap().grpc_addr);
    let ca = pki.path("ca.pem");
    let ran = run(solo().args([
        "--endpoint",
        &plaintext,
        "--ca-cert",
        ca.to_str().unwrap(),
        "status",
        "kv",
    ]))
    .fails(5);
    assert!(
        ran.stderr
            .contains(&format!("the node at {plaintext} does not speak TLS")),
        "{}",
        ran.stderr
    );
}

/// A data directory of 25 events, copied for each way of damaging it.
fn damaged_copy(source: &Path, damage: impl FnOnce(&mut Vec<u8>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(source.join("data.mdb")).unwrap();
    damage(&mut bytes);
    std::fs::write(dir.path().join("data.mdb"), bytes).unwrap();
    dir
}

#[test]
fn damage_that_crashes_lmdb_or_loses_a_page_is_reported_as_damage() {
    let source = tempfile::tempdir().unwrap();
    offline_data_dir(source.path(), 1 << 20, 25);
    let page = 4096;
    // Every B-tree page claims to hold 65,535 bytes of node pointers: LMDB trusts the page
    // header and reads far beyond it, which kills the process without the handler.
    let crashed = damaged_copy(source.path(), |bytes| {
        for start in (2 * page..bytes.len()).step_by(page) {
            bytes[start + 12..start + 14].copy_from_slice(&[0xff, 0xff]);
        }
    });
    // Both meta pages name a root page far past the end of the file: MDB_PAGE_NOTFOUND.
    let lost = damaged_copy(source.path(), |bytes| {
        for meta in [0, page] {
            let root = meta + 16 + 24 + 48 + 40;
            bytes[root..root + 8].copy_from_slice(&1_000_000u64.to_le_bytes());
        }
    });
    for (dir, says) in [(&crashed, "LMDB crashed reading it"), (&lost, "MDB_PAGE_NOTFOUND")] {
        let data = dir.path().to_str().unwrap();
        let backup = dir.path().join("backup");
        for command in ["verify", "stats", "dump", "backup"] {
            let mut args = vec!["log", command, "--data-dir", data];
            if command == "backup" {
                args.push(backup.to_str().unwrap());
            }
            let ran = run(solo().args(&args)).fails(1);
            assert!(
                ran.stderr.contains("damaged") && ran.stderr.contains(says) && ran.stderr.contains("backup"),
                "log {command} on {says}: {}",
                ran.stderr
            );
        }
        for command in ["verify", "stats"] {
            let ran = run(solo().args(["log", command, "--json", "--data-dir", data]));
            assert_eq!(ran.code, 1, "{}", ran.stderr);
            // A crash is reported on stdout too, as the document a program reads.
            let document = ran.json();
            assert_eq!(
                (document["ok"].as_bool(), document["damaged"].as_bool()),
                (Some(false), Some(true))
            );
            assert!(document["error"].as_str().unwrap().contains(says), "{document}");
        }
        assert!(!backup.join("data.mdb").exists(), "no backup of {says} is kept");
    }
}

/// A copy of the data directory `offline_data_dir` made, one byte of record 14 flipped.
fn record_14_damaged(source: &Path) -> tempfile::TempDir {
    damaged_copy(source, |bytes| {
        let at = bytes
            .windows(6)
            .position(|w| w == b"svc-14")
            .expect("record 14's service id");
        bytes[at] ^= 0x20;
    })
}

/// `stats` of a history with a damaged record names the damage rather than print figures
/// that leave it out (and, for a damaged page, every record under it).
#[test]
fn stats_of_a_damaged_history_is_the_damage_not_figures() {
    let source = tempfile::tempdir().unwrap();
    offline_data_dir(source.path(), 1 << 20, 25);
    let damaged = record_14_damaged(source.path());
    let data = damaged.path().to_str().unwrap();
    let ran = run(solo().args(["log", "stats", "--data-dir", data])).fails(1);
    assert!(
        ran.stderr.contains("damaged") && ran.stderr.contains("record 14"),
        "{}",
        ran.stderr
    );
    let ran = run(solo().args(["log", "stats", "--json", "--data-dir", data]));
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    let document = ran.json();
    assert_eq!(
        (document["ok"].as_bool(), document["damaged"].as_bool()),
        (Some(false), Some(true)),
        "{document}"
    );
    let whole = run(solo().args(["log", "stats", "--json", "--data-dir", source.path().to_str().unwrap()]))
        .ok()
        .json();
    assert_eq!(whole["records"], 25, "{whole}");
}

/// A copy that does not verify (a record damaged in the data file it was taken from) is not
/// kept: a backup that restores nothing would only be found out when it is needed.
#[test]
fn a_backup_of_a_damaged_log_is_not_kept() {
    let source = tempfile::tempdir().unwrap();
    offline_data_dir(source.path(), 1 << 20, 25);
    let damaged = record_14_damaged(source.path());
    let backup = damaged.path().join("backup");
    let ran = run(solo().args([
        "log",
        "backup",
        "--data-dir",
        damaged.path().to_str().unwrap(),
        backup.to_str().unwrap(),
    ]))
    .fails(1);
    assert!(
        ran.stderr.contains("no backup kept") && ran.stderr.contains("first bad record is seq 14"),
        "{}",
        ran.stderr
    );
    assert_eq!(
        std::fs::read_dir(&backup).unwrap().count(),
        0,
        "nothing left in {backup:?}"
    );
}

/// Damage LMDB never notices (it does not check the page number in a page's header) is found by
/// `verify`'s walk of the file's pages, which reads the file, before anything reads through LMDB.
#[test]
fn verify_walks_lmdbs_pages_and_finds_damage_lmdb_does_not_notice() {
    let source = tempfile::tempdir().unwrap();
    offline_data_dir(source.path(), 1 << 20, 25);
    let data = source.path().to_str().unwrap();
    assert!(
        run(solo().args(["log", "verify", "--data-dir", data]))
            .ok()
            .text()
            .starts_with("ok")
    );
    let page = 4096;
    let renumbered = damaged_copy(source.path(), |bytes| {
        for start in (2 * page..bytes.len()).step_by(page) {
            bytes[start..start + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        }
    });
    // The start of the nodes past the page's end: LMDB's next insert there writes past it.
    let nodes_past_the_end = damaged_copy(source.path(), |bytes| {
        for start in (2 * page..bytes.len()).step_by(page) {
            bytes[start + 14..start + 16].copy_from_slice(&0xe000u16.to_le_bytes());
        }
    });
    for (dir, says) in [
        (&renumbered, "whose header names another page"),
        (&nodes_past_the_end, "free space is out of bounds"),
    ] {
        let data = dir.path().to_str().unwrap();
        let ran = run(solo().args(["log", "verify", "--data-dir", data]));
        assert_eq!(ran.code, 1, "{}", ran.stderr);
        let said = ran.text();
        assert!(
            said.starts_with("FAILED") && said.contains(says),
            "{said}{}",
            ran.stderr
        );
    }
}

#[test]
fn the_offline_tools_only_read_and_say_what_is_wrong_with_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ran = |data: &Path| run(solo().args(["log", "stats", "--data-dir", data.to_str().unwrap()]));

    // What is there is told apart; nothing is created where there is no log.
    let missing = root.join("missing");
    assert!(ran(&missing).fails(1).stderr.contains("does not exist"));
    assert!(!missing.exists());
    let bare = root.join("bare");
    std::fs::create_dir(&bare).unwrap();
    assert!(ran(&bare).fails(1).stderr.contains("holds no Solo log (no data.mdb)"));
    let empty = root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("data.mdb"), b"").unwrap();
    let refused = ran(&empty).fails(1);
    assert!(
        refused.stderr.contains("empty") && !refused.stderr.contains("descriptor"),
        "{}",
        refused.stderr
    );
    let other = root.join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("data.mdb"), vec![7u8; 16384]).unwrap();
    assert!(ran(&other).fails(1).stderr.contains("not an LMDB file"));
    let source = root.join("source");
    offline_data_dir(&source, 1 << 20, 25);
    let cut = root.join("cut");
    std::fs::create_dir(&cut).unwrap();
    let bytes = std::fs::read(source.join("data.mdb")).unwrap();
    std::fs::write(cut.join("data.mdb"), &bytes[..4096]).unwrap();
    assert!(ran(&cut).fails(1).stderr.contains("cut short"));
    // Cut past its meta pages: refused once LMDB has it open, its lock file taken away again.
    let cut_later = root.join("cut_later");
    std::fs::create_dir(&cut_later).unwrap();
    std::fs::write(cut_later.join("data.mdb"), &bytes[..bytes.len() / 2]).unwrap();
    assert!(ran(&cut_later).fails(1).stderr.contains("cut short"));
    // One meta page's magic number gone: an LMDB file still, damaged, not a stranger's file.
    let first_meta = root.join("first_meta");
    std::fs::create_dir(&first_meta).unwrap();
    let mut damaged = bytes.clone();
    damaged[16] ^= 0x01;
    std::fs::write(first_meta.join("data.mdb"), &damaged).unwrap();
    let refused = ran(&first_meta).fails(1);
    assert!(
        refused.stderr.contains("first meta page is damaged") && refused.stderr.contains("backup"),
        "{}",
        refused.stderr
    );
    for dir in [&bare, &empty, &other, &cut, &cut_later, &first_meta] {
        assert!(!dir.join("lock.mdb").exists(), "{} has a lock file now", dir.display());
    }

    // A directory this user may not write is read without LMDB's lock file, and says so.
    let readonly = root.join("readonly");
    std::fs::create_dir(&readonly).unwrap();
    std::fs::write(readonly.join("data.mdb"), &bytes).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |path: &Path, mode: u32| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    mode(root, 0o755);
    mode(&readonly.join("data.mdb"), 0o444);
    mode(&readonly, 0o555);
    // root may write anywhere: run the tool as nobody, where this test runs as root.
    let mut cmd = if rustix::process::geteuid().is_root() {
        let mut cmd = assert_cmd::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", bin()]);
        for var in SOLO_VARS {
            cmd.env_remove(var);
        }
        cmd.timeout(PATIENCE);
        cmd
    } else {
        solo()
    };
    let stats = run(cmd.args(["log", "stats", "--json", "--data-dir", readonly.to_str().unwrap()]));
    mode(&readonly, 0o755);
    let stats = stats.ok();
    assert_eq!(stats.json()["head"], 25, "{}", stats.stderr);
    assert_eq!(stats.json()["unlocked"], true);
    assert!(stats.stderr.contains("without LMDB's lock file"), "{}", stats.stderr);
    assert!(!readonly.join("lock.mdb").exists());
}

#[test]
fn serve_refuses_a_bad_rust_log_and_an_empty_data_directory_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ran = run(solo()
        .env("RUST_LOG", "solo=loudest")
        .args(["serve", "--data-dir", data.to_str().unwrap()])
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]));
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    assert!(
        ran.stderr.contains("RUST_LOG='solo=loudest': not a tracing filter"),
        "{}",
        ran.stderr
    );
    assert!(!data.exists());
    // A bare word that is not a level would be taken for a target, and log nothing at all.
    let ran = run(solo()
        .env("RUST_LOG", "warning")
        .args(["serve", "--data-dir", data.to_str().unwrap()])
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]));
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    assert!(ran.stderr.contains("'warning' is not a level"), "{}", ran.stderr);
    assert!(!data.exists());
    // An empty directory name is a usage error; `data_dir = ""` is refused by the config check.
    let ran = serve_expecting_refusal("");
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(ran.stderr.contains("--data-dir"), "{}", ran.stderr);
}

#[test]
fn a_followed_log_ends_cleanly_once_its_service_has_stopped() {
    let node = Node::dev();
    node.deploy("acme", "echo", "echo", &[]);
    let mut follower = Watcher::spawn(&[
        "--endpoint",
        &node.url,
        "--tenant",
        "acme",
        "logs",
        "echo",
        "--follow",
        "--json",
    ]);
    follower.until("the start's line", |seen| !seen.is_empty());
    // Not waiting for the stop: the follow ends once it is on record, so its note says stopped.
    node.run("acme", &["kill", "echo"]).ok();
    let status = exits_within(&mut follower.child, PATIENCE).expect("the follow ends");
    // Its stderr is read by a thread of its own, which may not have the last line yet.
    let deadline = Instant::now() + PATIENCE;
    while !follower.stderr.lock().unwrap().contains("its log ends") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (stdout, stderr) = follower.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains("service 'echo' is stopped; its log ends here"),
        "{stderr}"
    );
    assert!(
        stdout.iter().any(|line| line.contains("echo stopping")),
        "the last line came first: {stdout:?}"
    );
}

#[test]
fn with_json_a_failure_is_a_json_document_on_stdout_too() {
    let node = Node::dev();
    node.deploy("acme", "echo", "echo", &[]);
    let cases: [(&[&str], i32, &str); 4] = [
        (&["status", "nosuch", "--json"], 3, "not_found"),
        (&["call", "nosuch", "--data", "x", "--json"], 3, "not_found"),
        (&["deploy", "bad", "/nonexistent/module.wasm", "--json"], 1, "failed"),
        (&["events", "--from", "100000", "--json"], 1, "invalid_argument"),
    ];
    for (args, exit, code) in cases {
        let ran = node.run("acme", args).fails(exit);
        let error = &ran.json()["error"];
        assert_eq!(error["code"], code, "{args:?}: {error}");
        assert_eq!(error["exit_code"], exit, "{args:?}: {error}");
        let message = error["message"].as_str().unwrap();
        assert!(
            ran.stderr.contains(message),
            "{args:?}: the same sentence on stderr: {}",
            ran.stderr
        );
    }
    // The node is not there: the CLI's own error, worth a retry.
    let ran = run(solo().args([
        "--endpoint",
        &format!("http://127.0.0.1:{}", free_port()),
        "list",
        "--json",
    ]))
    .fails(5);
    assert_eq!(ran.json()["error"]["code"], "unavailable");
    assert_eq!(ran.json()["error"]["retryable"], true);
    // A refusal that holds until the request changes is not worth a retry: an agent that
    // trusted `retryable` would send it again without end.
    let echo = example_path("echo");
    let ran = node
        .run(
            "acme",
            &[
                "deploy",
                "big",
                echo.to_str().unwrap(),
                "--memory-mb",
                "100000",
                "--json",
            ],
        )
        .fails(1);
    assert_eq!(
        (&ran.json()["error"]["code"], &ran.json()["error"]["retryable"]),
        (&json!("quota_exceeded"), &json!(false))
    );
    // Bad arguments are the same document, with clap's sentence on one line.
    for args in [&["status", "bad id!", "--json"][..], &["--json", "deploy"]] {
        let ran = node.run("acme", args);
        assert_eq!(ran.code, 2, "{args:?}: {}", ran.stderr);
        let error = &ran.json()["error"];
        assert_eq!(
            (&error["code"], &error["exit_code"]),
            (&json!("usage"), &json!(2)),
            "{args:?}"
        );
        let message = error["message"].as_str().unwrap();
        assert!(!message.starts_with("error") && !message.contains('\n'), "{message}");
        assert!(
            ran.stderr.contains(message.split(": ").next().unwrap()),
            "{message} {}",
            ran.stderr
        );
    }
    assert!(node.run("acme", &["status", "bad id!"]).stdout.is_empty());
    // Without --json, stdout stays empty.
    assert!(node.run("acme", &["status", "nosuch"]).fails(3).stdout.is_empty());
}

/// A self-signed X.509 version 1 certificate for CN=acme and its key: what `openssl x509 -req`
/// signs without `-extfile`.
const X509_V1_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBGjCBwQIUW7b+avybOQWg2hQwfDzTLaJDCNwwCgYIKoZIzj0EAwIwDzENMAsG\nA1UEAwwEYWNtZTAgFw0yNjEyMDYyMDM3MzJaGA8yMTI2MTExMjIwMzczMlowDzEN\nMAsGA1UEAwwEYWNtZTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABA5S6yfmcAS6\n1rLRBoL5rICWcLE+T2njUADujssR9OcsM5AF4yTgJEscLWCLM/TRHkUyEgJKo9HK\nnsSdZut8VJAwCgYIKoZIzj0EAwIDSAAwRQIhAN2Oeu6ck+U8r5E6dAXAq/pJSlre\nwY0W2/68qLIXXHGTAiBn/50GXQ5Z59p1UhhWe2NvTxWJ3JgkJaP7FYuxMYzVkg==\n-----END CERTIFICATE-----";
const X509_V1_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgYzwJnJP9emGJA8QB\nAOCTGyv8ylATIVG3U6nHvK61gEyhRANCAAQOUusn5nAEutay0QaC+ayAlnCxPk9p\n41AA7o7LEfTnLDOQBeMk4CRLHC1gizP00R5FMhICSqPRyp7EnWbrfFSQ\n-----END PRIVATE KEY-----";

#[test]
fn a_client_certificate_of_x509_version_1_is_refused_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("v1.pem"), dir.path().join("v1.key"));
    std::fs::write(&cert, X509_V1_CERT).unwrap();
    std::fs::write(&key, X509_V1_KEY).unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let ran = run(solo().args([
        "--endpoint",
        &format!("https://127.0.0.1:{}", free_port()),
        "--ca-cert",
        cert,
        "--client-cert",
        cert,
        "--client-key",
        key,
        "list",
    ]))
    .fails(1);
    assert!(ran.stderr.contains("X.509 version 1"), "{}", ran.stderr);
}

/// What the operator's log says of a tenant's crashing service: nothing per crash (its events
/// say it), one line once its restart policy gives up and it stays down.
#[test]
fn the_nodes_log_says_once_that_a_service_stays_down() {
    let serve = ServeDir::new();
    let node = serve.start();
    serve.deploy_crasher("crasher");
    let deadline = Instant::now() + PATIENCE;
    while serve.cli(&["status", "crasher", "--json"]).ok().json()["status"] != "crashed" {
        assert!(Instant::now() < deadline, "the crasher never stayed down");
        serve.cli(&["call", "crasher", "--data", "x"]).fails(1);
    }
    drop(node);
    let log = std::fs::read_to_string(&serve.log).unwrap();
    let gave_up: Vec<&str> = log.lines().filter(|l| l.contains("restart policy gave up")).collect();
    assert_eq!(gave_up.len(), 1, "{log}");
    assert!(gave_up[0].contains("crasher"), "{log}");
    assert!(!log.contains("restarting it"), "each crash is at debug: {log}");
}

/// With a JSON log, why the node cannot serve is a JSON line too: a log pipeline takes every
/// line of it as JSON.
#[test]
fn with_a_json_log_a_refused_start_is_a_json_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("solo.toml");
    std::fs::write(&config, "[telemetry]\nlog_format = \"json\"\n").unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let data = dir.path().join("data");
    let ran = run(solo().args([
        "--config",
        config.to_str().unwrap(),
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--grpc-addr",
        &busy_addr,
        "--http-addr",
        "127.0.0.1:0",
    ]));
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    let lines: Vec<Value> = ran
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let refusal = lines
        .iter()
        .find(|l| l["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no error line: {}", ran.stderr));
    assert!(
        refusal["fields"]["error"].as_str().unwrap().contains(&busy_addr),
        "{refusal}"
    );
}

/// A tenant given but blank is a mistake, never the admin that no tenant at all is in
/// development mode: an agent whose SOLO_TENANT is exported empty would act for every tenant.
#[test]
fn a_blank_tenant_is_refused_rather_than_taken_for_the_admin() {
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    for ran in [
        run(solo().args(["--endpoint", &endpoint, "--tenant", "", "list"])),
        run(solo().env("SOLO_TENANT", " ").args(["--endpoint", &endpoint, "list"])),
    ] {
        let ran = ran.fails(2);
        assert!(
            ran.stderr.contains("tenant (--tenant or SOLO_TENANT) is empty"),
            "{}",
            ran.stderr
        );
    }
}
