//! Reaching a node: the endpoint, TLS, the connect timeout, and the credentials every request
//! carries (`authorization: Bearer`, `x-tenant-id`).
//!
//! The connect timeout bounds the whole connection attempt: the TCP connect and the TLS
//! handshake, and then the peer's first HTTP/2 bytes. A peer that accepts the connection but
//! never answers (a stuck process, the wrong port) is given up on after the timeout, as is an
//! absent one. TLS is done here rather than by tonic, so that what the peer did (its first
//! bytes, a TLS alert refusing the client's certificate) is kept for the error to say, where a
//! request would only learn that its connection closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::either::Either;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::args::{ConnectionArgs, DEFAULT_ENDPOINT};
use super::error::{CliError, Exit};
use crate::api::TENANT_HEADER;
use crate::proto::solo_kernel_client::SoloKernelClient;

/// A gRPC client of the node, every request carrying the credentials.
pub type Client = SoloKernelClient<InterceptedService<GrpcOnly, Credentials>>;

/// Largest message the client accepts: a call's response or a list page. The node limits
/// requests; this only guards against a runaway answer.
const MAX_DECODING_BYTES: usize = 1 << 30;

/// Pings keep a quiet follow stream honest: a node that vanished without closing the
/// connection is noticed, and the stream reconnects.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The metadata every request carries.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
    tenant: Option<MetadataValue<Ascii>>,
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let metadata = request.metadata_mut();
        if let Some(value) = &self.authorization {
            metadata.insert("authorization", value.clone());
        }
        if let Some(value) = &self.tenant {
            metadata.insert(TENANT_HEADER, value.clone());
        }
        Ok(request)
    }
}

/// What the peer of the latest connection did. Kept beside the channel, since a connection's
/// failure reaches the request only as "connection closed".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Peer {
    /// Nothing yet, or nothing worth saying: it answered as a node would.
    #[default]
    Unknown,
    /// It took the connection and sent nothing within the connect timeout.
    Silent,
    /// It closed the connection without a byte.
    Closed,
    /// It answered in HTTP/1 (`HTTP/1.1 400 …`): a web server, not gRPC.
    Http1,
    /// It answered with something other than HTTP/2's first frame (SETTINGS).
    NotHttp2,
    /// It answered a plaintext connection with TLS: the endpoint wants https://.
    Tls,
    /// It ended the TLS session with this alert (`CertificateRequired`, `UnknownCA`, …).
    Alert(String),
}

/// Where the connections record what their peer did.
type PeerLog = Arc<Mutex<Peer>>;

fn record(log: &PeerLog, peer: Peer) {
    if let Ok(mut slot) = log.lock() {
        *slot = peer;
    }
}

/// How to reach the node; connects on demand (again after a drop).
#[derive(Debug, Clone)]
pub struct Connector {
    url: String,
    endpoint: Endpoint,
    credentials: Credentials,
    timeout: Duration,
    tls: Option<Tls>,
    peer: PeerLog,
}

impl Connector {
    /// Checks the flags and reads the certificate files; nothing touches the network yet.
    pub fn new(args: &ConnectionArgs) -> Result<Connector, CliError> {
        let tls_wanted = args.ca_cert.is_some() || args.client_cert.is_some();
        let url = normalise_url(&args.endpoint, tls_wanted);
        check_scheme(&url)?;
        let timeout = Duration::from_millis(args.connect_timeout_ms);
        let not_a_url = |e: &dyn std::fmt::Display| {
            CliError::usage(format!(
                "--endpoint (or SOLO_ENDPOINT) '{}' is not a URL: {e}",
                args.endpoint
            ))
        };
        let uri: http::Uri = url.parse().map_err(|e| not_a_url(&e))?;
        // gRPC's paths are the methods' own: a path here would be dropped, unsaid.
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(not_a_url(
                &"a gRPC endpoint is a scheme, a host and a port, with no path",
            ));
        }
        // `http::Uri` takes anything as a port, and a port it cannot read as one would be
        // dropped for the scheme's default: another server reached.
        if let Some(port) = uri.authority().and_then(|a| port_text(a.as_str()))
            && !port.parse::<u16>().is_ok_and(|port| port > 0)
        {
            return Err(not_a_url(&format_args!(
                "the port '{port}' is not a number from 1 to 65535"
            )));
        }
        let https = uri.scheme_str().is_some_and(|s| s.eq_ignore_ascii_case("https"));
        let tls = if https {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| CliError::usage(format!("--endpoint '{url}': {e}")))?;
            Some(Tls {
                config: tls_config(args)?,
                name,
            })
        } else if tls_wanted {
            let flag = if args.ca_cert.is_some() {
                "--ca-cert"
            } else {
                "--client-cert"
            };
            return Err(CliError::usage(format!("{flag} needs an https:// endpoint, not {url}")));
        } else {
            None
        };
        // TLS is this module's, not tonic's: tonic connects to an http:// address, while the
        // requests name the https:// origin.
        let connect_to = match &tls {
            Some(_) => format!("http://{}", uri.authority().map(|a| a.as_str()).unwrap_or_default()),
            None => url.clone(),
        };
        let endpoint = Endpoint::from_shared(connect_to)
            .map_err(|e| not_a_url(&e))?
            .origin(uri)
            .connect_timeout(timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        Ok(Connector {
            url,
            endpoint,
            credentials: credentials(args)?,
            timeout,
            tls,
            peer: PeerLog::default(),
        })
    }

    /// The endpoint, as errors name it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connects now, so an absent node is reported as such (exit 5) before any request.
    pub async fn connect(&self) -> Result<Client, CliError> {
        record(&self.peer, Peer::Unknown);
        let tcp = TcpConnector {
            timeout: self.timeout,
            tls: self.tls.clone(),
            peer: Arc::clone(&self.peer),
        };
        let connecting = self.endpoint.connect_with_connector(tcp);
        let channel = match tokio::time::timeout(self.timeout + Duration::from_millis(500), connecting).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(self.transport_error(&e, false)),
            Err(_) => return Err(self.silent()),
        };
        Ok(
            SoloKernelClient::with_interceptor(GrpcOnly { inner: channel }, self.credentials.clone())
                .max_decoding_message_size(MAX_DECODING_BYTES),
        )
    }

    /// A failed request as a `CliError` naming this endpoint.
    pub fn error(&self, status: &tonic::Status) -> CliError {
        match std::error::Error::source(status) {
            // A status the client made up: the connection broke, or the answer was not gRPC.
            Some(source) => self.transport_error(source, true),
            None => CliError::from_status(status, &self.url),
        }
    }

    /// The node accepted the connection and said nothing within the timeout.
    fn silent(&self) -> CliError {
        CliError::new(
            Exit::Unavailable,
            format!(
                "cannot reach the node at {}: no answer within {} ms (--connect-timeout-ms)",
                self.url,
                self.timeout.as_millis()
            ),
        )
        .retryable()
    }

    /// What went wrong below gRPC: on connecting, or (`lost`) during a request.
    fn transport_error(&self, cause: &(dyn std::error::Error + 'static), lost: bool) -> CliError {
        if let Some(not_grpc) = find::<NotGrpc>(cause) {
            return self.not_grpc(&format!("HTTP {}", not_grpc.describe()));
        }
        let text = super::error::causes(cause);
        // What a TLS client makes of a plaintext node's first bytes.
        if self.tls.is_some() && text.contains("InvalidContentType") {
            return CliError::new(
                Exit::Unavailable,
                format!(
                    "the node at {} does not speak TLS: give it as http://… without --ca-cert",
                    self.url
                ),
            );
        }
        let peer = self.peer.lock().map(|p| p.clone()).unwrap_or_default();
        match peer {
            Peer::Alert(alert) => {
                if let Some(denied) = self.certificate_refused(&alert) {
                    return denied;
                }
            }
            Peer::Silent => return self.silent(),
            Peer::Http1 => return self.not_grpc("it answers HTTP/1"),
            Peer::NotHttp2 => return self.not_grpc("it does not answer HTTP/2"),
            Peer::Tls => {
                return CliError::new(
                    Exit::Unavailable,
                    format!(
                        "the node at {} speaks TLS: give it as https://… with --ca-cert (SOLO_CA_CERT)",
                        self.url
                    ),
                );
            }
            Peer::Closed if !lost => {
                return CliError::new(
                    Exit::Unavailable,
                    format!(
                        "cannot reach the node at {}: it closed the connection without answering \
                         (is it the node's gRPC address?)",
                        self.url
                    ),
                )
                .retryable();
            }
            Peer::Closed | Peer::Unknown => {}
        }
        if lost {
            CliError::new(
                Exit::Unavailable,
                format!("lost the connection to the node at {}: {text}", self.url),
            )
            .retryable()
        } else {
            CliError::unreachable(&self.url, cause)
        }
    }

    /// The endpoint answers, but not in gRPC: most likely the node's HTTP port.
    fn not_grpc(&self, detail: &str) -> CliError {
        CliError::new(
            Exit::Unavailable,
            format!(
                "{} is not a gRPC endpoint ({detail}): is it the node's gRPC address? \
                 (--endpoint or SOLO_ENDPOINT, default {DEFAULT_ENDPOINT})",
                self.url
            ),
        )
    }

    /// A TLS session the node ended (`alert`) for want of an acceptable client certificate.
    fn certificate_refused(&self, alert: &str) -> Option<CliError> {
        const REFUSALS: [&str; 7] = [
            "BadCertificate",
            "UnsupportedCertificate",
            "CertificateRevoked",
            "CertificateExpired",
            "CertificateUnknown",
            "UnknownCA",
            "AccessDenied",
        ];
        let message = if alert == "CertificateRequired" {
            format!(
                "the node at {} requires a client certificate: give one with --client-cert and --client-key \
                 (SOLO_CLIENT_CERT, SOLO_CLIENT_KEY)",
                self.url
            )
        } else if REFUSALS.contains(&alert) {
            format!(
                "the node at {} refused the client certificate (TLS alert {alert}): it must be signed by the \
                 node's client CA",
                self.url
            )
        } else {
            return None;
        };
        Some(CliError::new(Exit::Denied, message))
    }
}

/// The first error of type `E` in `error`'s chain.
fn find<'a, E: std::error::Error + 'static>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// TLS for an https endpoint: the client's configuration, and the name the node's
/// certificate must carry.
#[derive(Debug, Clone)]
struct Tls {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

/// Opens the connection (TCP, then TLS for https) and watches what the peer does.
#[derive(Debug, Clone)]
struct TcpConnector {
    timeout: Duration,
    tls: Option<Tls>,
    peer: PeerLog,
}

/// A connection to the node, plain or TLS.
type Stream = Either<tokio::net::TcpStream, tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<http::Uri> for TcpConnector {
    type Response = hyper_util::rt::TokioIo<FirstAnswer>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the endpoint names no host"))?;
            // An IPv6 literal comes bracketed, as URLs write it.
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let default_port = if this.tls.is_some() { 443 } else { 80 };
            let port = uri.port_u16().unwrap_or(default_port);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = match &this.tls {
                None => Either::Left(tcp),
                Some(tls) => match tokio_rustls::TlsConnector::from(Arc::clone(&tls.config))
                    .connect(tls.name.clone(), tcp)
                    .await
                {
                    Ok(stream) => Either::Right(stream),
                    Err(e) => {
                        // TLS 1.2 refuses a client certificate during the handshake.
                        if let Some(alert) = tls_alert(&e) {
                            record(&this.peer, Peer::Alert(alert));
                        }
                        return Err(e);
                    }
                },
            };
            Ok(hyper_util::rt::TokioIo::new(FirstAnswer {
                inner: stream,
                deadline: Some(Box::pin(tokio::time::sleep(this.timeout))),
                timeout: this.timeout,
                plaintext: this.tls.is_none(),
                peer: this.peer,
            }))
        })
    }
}

/// The alert of a TLS session the peer ended, as rustls names it (`CertificateRequired`).
fn tls_alert(error: &std::io::Error) -> Option<String> {
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(format!("{alert:?}")),
        _ => None,
    }
}

/// A connection that must say something within the connect timeout: an HTTP/2 server sends
/// its SETTINGS as soon as it has the client's preface, so a peer silent for that long is not
/// a node that works. It records what the peer did (see [`Peer`]).
#[derive(Debug)]
pub struct FirstAnswer {
    inner: Stream,
    /// Until the first byte arrives.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
    plaintext: bool,
    peer: PeerLog,
}

impl FirstAnswer {
    /// What the first bytes say about the peer: an HTTP/2 server's first frame is its
    /// SETTINGS (type 4, in the fourth byte).
    fn first_bytes(&self, bytes: &[u8]) -> Peer {
        match bytes {
            [] => Peer::Closed,
            [b'H', b'T', b'T', b'P', b'/', ..] => Peer::Http1,
            [0x15 | 0x16, 0x03, ..] if self.plaintext => Peer::Tls,
            [_, _, _, kind, ..] if *kind != 0x04 => Peer::NotHttp2,
            _ => Peer::Unknown,
        }
    }
}

impl AsyncRead for FirstAnswer {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &polled
            && let Some(alert) = tls_alert(e)
        {
            record(&this.peer, Peer::Alert(alert));
        }
        let Some(deadline) = this.deadline.as_mut() else {
            return polled;
        };
        match &polled {
            Poll::Ready(Ok(())) => {
                let peer = this.first_bytes(&buf.filled()[before..]);
                record(&this.peer, peer);
                this.deadline = None;
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                record(&this.peer, Peer::Silent);
                this.deadline = None;
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} ms", this.timeout.as_millis()),
                )));
            }
            Poll::Pending | Poll::Ready(Err(_)) => {}
        }
        polled
    }
}

impl FirstAnswer {
    /// A write that failed before the node said anything may be the node closing the
    /// connection after a TLS alert (one refusing the client's certificate, sent as the
    /// handshake ends): the alert waits to be read, and would go unread, the connection closing
    /// on the write's error. So the error waits until the read has its answer (the alert, or
    /// the end of the connection), within the connect timeout.
    fn wrote<T>(&mut self, cx: &mut Context<'_>, result: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        let refused = matches!(&result, Poll::Ready(Err(e)) if matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ));
        if !refused || self.plaintext || self.deadline.is_none() {
            return result;
        }
        let mut scratch = [0; 512];
        let mut unread = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *self).poll_read(cx, &mut unread) {
            // Nothing to read yet, and time left: the read wakes this write again.
            Poll::Pending if self.deadline.is_some() => Poll::Pending,
            _ => result,
        }
    }
}

impl AsyncWrite for FirstAnswer {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.wrote(cx, result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// An answer that is not gRPC: an HTTP status other than 200, or another content type,
/// without a `grpc-status`.
#[derive(Debug, thiserror::Error)]
#[error("the answer is not gRPC (HTTP {})", self.describe())]
pub struct NotGrpc {
    status: http::StatusCode,
    content_type: Option<String>,
}

impl NotGrpc {
    fn describe(&self) -> String {
        match (&self.content_type, self.status) {
            (Some(kind), http::StatusCode::OK) => format!("200, {kind}"),
            (_, status) => status.as_u16().to_string(),
        }
    }
}

/// The channel, refusing answers that are not gRPC before tonic tries to decode them (a web
/// server's 404 page would otherwise read as "invalid compression flag: 123").
#[derive(Debug, Clone)]
pub struct GrpcOnly {
    inner: Channel,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Request<tonic::body::Body>> for GrpcOnly {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            let headers = response.headers();
            let content_type = headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
            let grpc = headers.contains_key("grpc-status")
                || (response.status() == http::StatusCode::OK
                    && content_type.is_some_and(|t| t.starts_with("application/grpc")));
            if grpc {
                Ok(response)
            } else {
                Err(NotGrpc {
                    status: response.status(),
                    content_type: content_type.map(str::to_string),
                }
                .into())
            }
        })
    }
}

/// Refuses an endpoint of another scheme than http or https (`ftp://…`) before any lookup.
fn check_scheme(url: &str) -> Result<(), CliError> {
    match url.split_once("://") {
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") => Ok(()),
        Some((scheme, _)) => Err(CliError::usage(format!(
            "--endpoint (or SOLO_ENDPOINT) '{url}': the scheme must be http:// or https://, not {scheme}://"
        ))),
        None => Ok(()),
    }
}

/// The port of a URL's authority as written (`None` without one): what follows the last `:`
/// after the host, an IPv6 host being in brackets.
fn port_text(authority: &str) -> Option<&str> {
    let host_and_port = authority.rsplit_once('@').map_or(authority, |(_, after)| after);
    let after_host = host_and_port.rfind(']').map_or(0, |end| end + 1);
    let port = host_and_port[after_host..].rfind(':')?;
    Some(&host_and_port[after_host + port + 1..])
}

/// Adds a scheme to a bare `host:port`: https when TLS files are given.
fn normalise_url(endpoint: &str, tls: bool) -> String {
    let endpoint = endpoint.trim();
    if endpoint.contains("://") {
        endpoint.to_string()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

/// A file of PEM certificates, refused now, naming it, if it holds none: rather than as a
/// TLS failure at the handshake.
fn read_certificates(path: &std::path::Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, CliError> {
    crate::tls::read(path, flag)
        .and_then(|pem| crate::tls::certificates(&pem, path, flag))
        .map_err(CliError::failure)
}

fn read_private_key(path: &std::path::Path, flag: &str) -> Result<PrivateKeyDer<'static>, CliError> {
    crate::tls::read(path, flag)
        .and_then(|pem| crate::tls::private_key(&pem, path, flag))
        .map_err(CliError::failure)
}

/// The TLS client of an https endpoint: the node's CA, and the client's certificate if given.
fn tls_config(args: &ConnectionArgs) -> Result<Arc<rustls::ClientConfig>, CliError> {
    let Some(ca) = &args.ca_cert else {
        return Err(CliError::usage(
            "an https endpoint needs the CA that signed the node's certificate: give it with --ca-cert FILE \
             (or SOLO_CA_CERT)",
        ));
    };
    let mut roots = rustls::RootCertStore::empty();
    for certificate in read_certificates(ca, "--ca-cert")? {
        roots
            .add(certificate)
            .map_err(|e| CliError::failure(format!("--ca-cert {}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CliError::failure(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    let mut config = match (&args.client_cert, &args.client_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                read_certificates(cert, "--client-cert")?,
                read_private_key(key, "--client-key")?,
            )
            .map_err(|e| {
                CliError::failure(format!(
                    "--client-cert {} and --client-key {} do not make a usable pair: {}",
                    cert.display(),
                    key.display(),
                    crate::tls::unusable_pair(&e)
                ))
            })?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(CliError::usage("--client-cert and --client-key go together")),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn credentials(args: &ConnectionArgs) -> Result<Credentials, CliError> {
    let present = |value: &Option<String>| {
        value
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let authorization = present(&args.token)
        .map(|token| {
            format!("Bearer {token}").parse().map_err(|_| {
                CliError::usage("the token holds characters that cannot be sent (check --token or SOLO_TOKEN)")
            })
        })
        .transpose()?;
    if args.tenant.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(CliError::usage(
            "the tenant (--tenant or SOLO_TENANT) is empty: name one, or leave both unset to act as \
             the admin",
        ));
    }
    let tenant = present(&args.tenant)
        .map(|tenant| {
            tenant
                .parse()
                .map_err(|_| CliError::usage(format!("'{tenant}' is not a valid tenant name")))
        })
        .transpose()?;
    Ok(Credentials { authorization, tenant })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_read_as_written() {
        assert_eq!(port_text("h:50051"), Some("50051"));
        assert_eq!(port_text("[::1]:7"), Some("7"));
        assert_eq!(port_text("[::1]"), None);
        assert_eq!(port_text("user:pw@h:abc"), Some("abc"));
        assert_eq!(port_text("h"), None);
        assert_eq!(port_text("h:"), Some(""));
    }

    #[test]
    fn an_endpoint_whose_port_is_not_a_port_is_refused() {
        for endpoint in [
            "http://127.0.0.1:abc",
            "http://127.0.0.1:70000",
            "127.0.0.1:0",
            "http://h:",
        ] {
            let args = crate::cli::args::Cli::parse_from_args(["solo", "list", "--endpoint", endpoint])
                .unwrap()
                .connection;
            let Err(error) = Connector::new(&args) else {
                panic!("{endpoint} was taken");
            };
            assert_eq!(error.exit, crate::cli::Exit::Usage, "{endpoint}");
            assert!(
                error.message.contains("is not a number from 1 to 65535"),
                "{endpoint}: {error}"
            );
        }
        let args = crate::cli::args::Cli::parse_from_args(["solo", "list", "--endpoint", "http://h:1"])
            .unwrap()
            .connection;
        assert!(Connector::new(&args).is_ok());
    }

    #[test]
    fn bare_addresses_get_a_scheme() {
        assert_eq!(normalise_url("127.0.0.1:1", false), "http://127.0.0.1:1");
        assert_eq!(normalise_url("node:1", true), "https://node:1");
        assert_eq!(normalise_url("https://node:1", false), "https://node:1");
    }
}
