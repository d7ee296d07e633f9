//! Reaching a node: the endpoint, TLS, the connect timeout, and the credentials every request
//! carries (`authorization: Bearer`, `x-tenant-id`).

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::args::ConnectionArgs;
use super::error::CliError;
use crate::api::TENANT_HEADER;
use crate::proto::solo_kernel_client::SoloKernelClient;

/// A gRPC client of the node, every request carrying the credentials.
pub type Client = SoloKernelClient<InterceptedService<Channel, Credentials>>;

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

/// How to reach the node; connects on demand (again after a drop).
#[derive(Debug, Clone)]
pub struct Connector {
    url: String,
    endpoint: Endpoint,
    credentials: Credentials,
    timeout: Duration,
}

impl Connector {
    /// Checks the flags and reads the certificate files; nothing touches the network yet.
    pub fn new(args: &ConnectionArgs) -> Result<Connector, CliError> {
        let tls_wanted = args.ca_cert.is_some() || args.client_cert.is_some();
        let url = normalise_url(&args.endpoint, tls_wanted);
        let timeout = Duration::from_millis(args.connect_timeout_ms.max(1));
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| CliError::usage(format!("--endpoint '{}' is not a URL: {e}", args.endpoint)))?
            .connect_timeout(timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let https = url.starts_with("https://");
        if https {
            endpoint = endpoint
                .tls_config(tls_config(args, timeout)?)
                .map_err(|e| CliError::usage(format!("TLS for {url}: {}", super::error::causes(&e))))?;
        } else if tls_wanted {
            return Err(CliError::usage(format!(
                "--ca-cert and --client-cert need an https:// endpoint, not {url}"
            )));
        }
        Ok(Connector {
            url,
            endpoint,
            credentials: credentials(args)?,
            timeout,
        })
    }

    /// The endpoint, as errors name it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connects now, so an absent node is reported as such (exit 5) before any request.
    pub async fn connect(&self) -> Result<Client, CliError> {
        let channel =
            match tokio::time::timeout(self.timeout + Duration::from_millis(500), self.endpoint.connect()).await {
                Ok(Ok(channel)) => channel,
                Ok(Err(e)) => return Err(CliError::unreachable(&self.url, &e)),
                Err(_) => {
                    return Err(CliError::new(
                        super::error::Exit::Unavailable,
                        format!(
                            "cannot reach the node at {}: no answer within {} ms",
                            self.url,
                            self.timeout.as_millis()
                        ),
                    )
                    .retryable());
                }
            };
        Ok(SoloKernelClient::with_interceptor(channel, self.credentials.clone())
            .max_decoding_message_size(MAX_DECODING_BYTES))
    }

    /// A failed request as a `CliError` naming this endpoint.
    pub fn error(&self, status: &tonic::Status) -> CliError {
        CliError::from_status(status, &self.url)
    }
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

fn read_file(path: &std::path::Path, flag: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::failure(format!("cannot read {flag} {}: {e}", path.display())))
}

fn tls_config(args: &ConnectionArgs, timeout: Duration) -> Result<ClientTlsConfig, CliError> {
    let Some(ca) = &args.ca_cert else {
        return Err(CliError::usage(
            "an https endpoint needs the CA that signed the node's certificate: give it with --ca-cert FILE \
             (or SOLO_CA_CERT)",
        ));
    };
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read_file(ca, "--ca-cert")?))
        .timeout(timeout);
    match (&args.client_cert, &args.client_key) {
        (Some(cert), Some(key)) => {
            let identity = Identity::from_pem(read_file(cert, "--client-cert")?, read_file(key, "--client-key")?);
            config = config.identity(identity);
        }
        (None, None) => {}
        _ => return Err(CliError::usage("--client-cert and --client-key go together")),
    }
    Ok(config)
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
    fn bare_addresses_get_a_scheme() {
        assert_eq!(normalise_url("127.0.0.1:1", false), "http://127.0.0.1:1");
        assert_eq!(normalise_url("node:1", true), "https://node:1");
        assert_eq!(normalise_url("https://node:1", false), "https://node:1");
    }
}
