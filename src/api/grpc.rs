//! The gRPC API: `solo.v1.SoloKernel` over tonic. Each method authenticates, takes a shed
//! permit, decodes, calls one operation and encodes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use prost::Message as _;
use tonic::{Request, Response, Status};

use super::auth::Authenticated;
use super::encoded::WatchFrame;
use super::ops::{self, ListFilter, LogStart};
use super::watch::{WatchFilter, WatchItem, watch};
use super::{ApiState, Caller, Error, GaugeGuard, REPLAYED_HEADER};
use crate::proto::{self, deploy_request, solo_kernel_server::SoloKernel};
use crate::shed::{Held, Permit};

/// The descriptor set that reflection serves (written by build.rs).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/solo_descriptor.bin"));

#[derive(Debug, Clone)]
pub struct GrpcApi {
    state: Arc<ApiState>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The methods of `SoloKernel`, as `solo_grpc_requests_total` names them.
const METHODS: [&str; 10] = [
    "Deploy", "Status", "List", "Kill", "Remove", "Call", "Logs", "Watch", "Shutdown", "Backup",
];

impl GrpcApi {
    pub fn new(state: Arc<ApiState>) -> GrpcApi {
        // Each method's count of successes exists from the start, at 0, so a rate or an
        // alert on it has a series before the first request.
        for method in METHODS {
            state
                .metrics
                .grpc_requests
                .with_label_values(&[method, code_name(tonic::Code::Ok)]);
        }
        GrpcApi { state }
    }

    /// Who is calling, from the metadata and the client certificate.
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Error> {
        // The request was decoded: a failure from here on is not tonic's refusal of it.
        if let Some(decoded) = request.extensions().get::<crate::api::codec::Decoded>() {
            decoded.mark();
        }
        // Authenticated already where the body was admitted ([`crate::api::bodies`]).
        if let Some(Authenticated(caller)) = request.extensions().get::<Authenticated>() {
            return caller.clone();
        }
        let certificate_tenant = request.peer_certs().and_then(|certs| {
            certs
                .first()
                .and_then(|cert| crate::tls::certificate_tenant(cert.as_ref()))
        });
        self.state
            .auth
            .authenticate_headers(request.metadata().as_ref(), certificate_tenant.as_deref())
    }

    /// Authenticates and admits a unary request.
    fn admit<T>(&self, request: &Request<T>) -> Result<(Caller, Permit), Error> {
        let caller = self.caller(request)?;
        let permit = self.state.shed.admit(&caller.principal)?;
        Ok((caller, permit))
    }

    /// Counts the request in `solo_grpc_requests_total` and turns errors into statuses.
    fn finish<T>(&self, method: &str, result: Result<T, Error>) -> Result<Response<T>, Status> {
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.kind.grpc_code(),
        };
        self.state
            .metrics
            .grpc_requests
            .with_label_values(&[method, code_name(code)])
            .inc();
        result.map(Response::new).map_err(Status::from)
    }

    /// As [`finish`](Self::finish), for a stream: one that opened is counted as it ends, with
    /// the code it ended with (CANCELLED if its client left first), as grpc-go's interceptors
    /// count, not as OK when it opened.
    fn finish_stream<T: Send + 'static>(
        &self,
        method: &'static str,
        result: Result<BoxStream<T>, Error>,
    ) -> Result<Response<BoxStream<T>>, Status> {
        let stream = match result {
            Ok(stream) => stream,
            Err(e) => return self.finish(method, Err(e)),
        };
        let outcome = StreamOutcome {
            counter: self.state.metrics.grpc_requests.clone(),
            method,
            code: None,
        };
        let counted: BoxStream<T> = Box::pin(async_stream::stream! {
            // Taken whole: naming only its field would capture a copy of the field, and the
            // guard would be dropped, and count, right here.
            let mut outcome = outcome;
            let mut stream = stream;
            while let Some(item) = stream.next().await {
                if let Err(status) = &item {
                    outcome.code = Some(status.code());
                }
                yield item;
            }
            outcome.code.get_or_insert(tonic::Code::Ok);
        });
        Ok(Response::new(counted))
    }

    /// As [`finish`](Self::finish), for a request that may carry an idempotency key: a replayed
    /// answer says so in its metadata, its message being the original one.
    fn finish_keyed<T>(&self, method: &str, result: Result<(T, bool), Error>) -> Result<Response<T>, Status> {
        let replayed = matches!(result, Ok((_, true)));
        let mut response = self.finish(method, result.map(|(answer, _)| answer))?;
        if replayed {
            response
                .metadata_mut()
                .insert(REPLAYED_HEADER, tonic::metadata::MetadataValue::from_static("true"));
        }
        Ok(response)
    }
}

#[tonic::async_trait]
impl SoloKernel for GrpcApi {
    async fn deploy(&self, request: Request<proto::DeployRequest>) -> Result<Response<proto::DeployResponse>, Status> {
        let result = async {
            let (caller, _permit) = self.admit(&request)?;
            let request = request.into_inner();
            let module: Arc<[u8]> = match request.module {
                Some(deploy_request::Module::Wasm(bytes)) => {
                    ops::require_wasm_binary(&bytes, "the `wasm` field", "the `wat` field")?;
                    bytes.into()
                }
                Some(deploy_request::Module::Wat(text)) => text.into_bytes().into(),
                None => return Err(Error::invalid("no module: set `wasm` (binary) or `wat` (text)")),
            };
            let deploy = ops::Deploy {
                service_id: request.service_id,
                module,
                limits: request.limits.unwrap_or_default(),
                labels: request.labels,
                idempotency_key: request.idempotency_key,
                expected_version: request.expected_version,
            };
            let outcome = ops::deploy(&self.state, &caller, deploy).await?;
            let answer = proto::DeployResponse {
                service_id: outcome.service_id,
                version: outcome.version,
                seq: outcome.seq,
                created: outcome.created,
                unchanged: outcome.unchanged,
                module_sha256: outcome.module_sha256,
            };
            Ok((answer, outcome.replayed))
        }
        .await;
        self.finish_keyed("Deploy", result)
    }

    async fn status(&self, request: Request<proto::StatusRequest>) -> Result<Response<proto::ServiceStatus>, Status> {
        let result = (|| {
            let (caller, _permit) = self.admit(&request)?;
            ops::status(&self.state, &caller, &request.get_ref().service_id)
        })();
        self.finish("Status", result)
    }

    async fn list(&self, request: Request<proto::ListRequest>) -> Result<Response<proto::ListResponse>, Status> {
        let result = (|| {
            let (caller, _permit) = self.admit(&request)?;
            let request = request.into_inner();
            let listing = ops::listing_fingerprint(caller.scope(), &request.status, &request.labels);
            let filter = ListFilter::new(&request.status, request.labels)?;
            let page_size = ops::page_size(request.page_size.into())?;
            let after = ops::decode_page_token(&request.page_token, &listing, caller.scope())?;
            let found = ops::list(&self.state, &caller, &filter);
            let unsent = found
                .services
                .iter()
                .filter(|s| after.as_ref().is_none_or(|(t, id)| (&s.tenant, &s.id) > (t, id)));
            let (services, last_sent) = ops::fill_page(unsent, page_size, ops::MAX_PAGE_BYTES, |s| {
                in_list_answer(ops::service_status(&self.state, s))
            });
            let next_page_token = match last_sent {
                Some(last) => ops::encode_page_token(&listing, &last.tenant, &last.id),
                None => String::new(),
            };
            Ok(proto::ListResponse {
                services,
                next_page_token,
                head_seq: found.seq,
            })
        })();
        self.finish("List", result)
    }

    async fn remove(&self, request: Request<proto::RemoveRequest>) -> Result<Response<proto::RemoveResponse>, Status> {
        let result = async {
            let (caller, _permit) = self.admit(&request)?;
            let r = request.into_inner();
            let remove = ops::Remove {
                service_id: r.service_id,
                idempotency_key: r.idempotency_key,
                expected_version: r.expected_version,
            };
            let outcome = ops::remove(&self.state, &caller, remove).await?;
            Ok((proto::RemoveResponse { seq: outcome.seq }, outcome.replayed))
        }
        .await;
        self.finish_keyed("Remove", result)
    }

    async fn kill(&self, request: Request<proto::KillRequest>) -> Result<Response<proto::KillResponse>, Status> {
        let result = async {
            let (caller, _permit) = self.admit(&request)?;
            let r = request.into_inner();
            let kill = ops::Kill {
                service_id: r.service_id,
                force: r.force,
                grace_ms: r.grace_ms,
                idempotency_key: r.idempotency_key,
                expected_version: r.expected_version,
            };
            let outcome = ops::kill(&self.state, &caller, kill).await?;
            let answer = proto::KillResponse {
                seq: outcome.seq,
                already_stopped: outcome.already_stopped,
            };
            Ok((answer, outcome.replayed))
        }
        .await;
        self.finish_keyed("Kill", result)
    }

    async fn call(&self, request: Request<proto::CallRequest>) -> Result<Response<proto::CallResponse>, Status> {
        let result = async {
            let (caller, _permit) = self.admit(&request)?;
            let r = request.into_inner();
            let payload = ops::call(&self.state, &caller, &r.service_id, r.payload, r.timeout_ms).await?;
            Ok(proto::CallResponse { payload })
        }
        .await;
        self.finish("Call", result)
    }

    type LogsStream = BoxStream<proto::LogLine>;

    async fn logs(&self, request: Request<proto::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let result = async {
            let caller = self.caller(&request)?;
            let r = request.into_inner();
            // A follower is a stream and counts as a watcher; a one-off read is a request.
            let permit = if r.follow {
                Held::Watcher(self.state.shed.admit_watcher(&caller.principal)?)
            } else {
                Held::Request(self.state.shed.admit(&caller.principal)?)
            };
            let start = match r.log_id {
                0 => LogStart::Line(r.from_seq),
                log => LogStart::After {
                    log,
                    line: r.from_seq.saturating_sub(1),
                },
            };
            let (log_id, lines) = ops::logs(&self.state, &caller, &r.service_id, start, r.follow).await?;
            let gauge = r
                .follow
                .then(|| GaugeGuard::new(self.state.metrics.watchers.with_label_values(&["grpc"])));
            let stream: Self::LogsStream = Box::pin(lines.map(move |line| {
                let _held = (&permit, &gauge);
                line.map(|l| super::convert::log_line(&l, log_id)).map_err(Status::from)
            }));
            Ok(stream)
        }
        .await;
        self.finish_stream("Logs", result)
    }

    type BackupStream = BoxStream<proto::BackupPiece>;

    async fn backup(&self, request: Request<proto::BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        let result = async {
            let caller = self.caller(&request)?;
            let pieces = ops::backup(&self.state, &caller).await?;
            let stream: Self::BackupStream = Box::pin(pieces.map(|piece| {
                Ok(match piece.map_err(Status::from)? {
                    ops::BackupPiece::Bytes(data) => proto::BackupPiece {
                        data,
                        sha256: String::new(),
                    },
                    ops::BackupPiece::End { sha256 } => proto::BackupPiece {
                        data: Vec::new(),
                        sha256,
                    },
                })
            }));
            Ok(stream)
        }
        .await;
        self.finish_stream("Backup", result)
    }

    type WatchStream = BoxStream<WatchFrame>;

    async fn watch(&self, request: Request<proto::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let result = (|| {
            let caller = self.caller(&request)?;
            self.state.check_open()?;
            let r = request.into_inner();
            let permit = self.state.shed.admit_watcher(&caller.principal)?;
            let filter = WatchFilter::new(Some(r.service_id), r.kinds.iter().map(String::as_str))?;
            let progress = match r.progress_interval_ms {
                0 => self.state.options.default_progress_interval,
                ms => Duration::from_millis(ms.into()),
            };
            let events = watch(&self.state, caller, filter, r.from_seq, progress)?;
            let gauge = GaugeGuard::new(self.state.metrics.watchers.with_label_values(&["grpc"]));
            let state = Arc::clone(&self.state);
            let stream: Self::WatchStream = Box::pin(events.map(move |item| {
                let _held = (&permit, &gauge);
                Ok(match item.map_err(Status::from)? {
                    WatchItem::Event(event) => state.frames.grpc.get(&event, WatchFrame::event),
                    WatchItem::Progress(head_seq) => WatchFrame::progress(head_seq),
                })
            }));
            Ok(stream)
        })();
        self.finish_stream("Watch", result)
    }

    async fn shutdown(
        &self,
        request: Request<proto::ShutdownRequest>,
    ) -> Result<Response<proto::ShutdownResponse>, Status> {
        let result = async {
            let caller = self.caller(&request)?;
            let seq = ops::shutdown(&self.state, &caller, request.get_ref().grace_ms).await?;
            Ok(proto::ShutdownResponse { seq })
        }
        .await;
        self.finish("Shutdown", result)
    }
}

/// Counts a stream in `solo_grpc_requests_total` when dropped, with the code it ended with.
struct StreamOutcome {
    counter: prometheus::IntCounterVec,
    method: &'static str,
    /// `None` until the stream ends: dropped before, its client cancelled it.
    code: Option<tonic::Code>,
}

impl Drop for StreamOutcome {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        self.counter.with_label_values(&[self.method, code_name(code)]).inc();
    }
}

/// A status, and the bytes it takes in a List answer: as a repeated field, a tag byte, the
/// length, the message.
fn in_list_answer(status: proto::ServiceStatus) -> (proto::ServiceStatus, usize) {
    let size = 1 + prost::length_delimiter_len(status.encoded_len()) + status.encoded_len();
    (status, size)
}

/// Counts in `solo_grpc_requests_total` a request of `service` refused before its method read it
/// (its credentials failed), if `path` names one of the methods: the label set stays fixed.
pub(super) fn count_refused_unread(state: &ApiState, service: &str, path: &str, code: tonic::Code) {
    let method = path
        .strip_prefix('/')
        .and_then(|path| path.strip_prefix(service))
        .and_then(|path| path.strip_prefix('/'))
        .and_then(|name| METHODS.iter().find(|method| **method == name));
    if let Some(method) = method {
        state
            .metrics
            .grpc_requests
            .with_label_values(&[method, code_name(code)])
            .inc();
    }
}

/// The canonical upper-case name of a gRPC code, as metrics label it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::in_list_answer;
    use crate::api::ops;
    use crate::proto::ServiceStatus;

    fn fill_page<'a>(
        unsent: impl Iterator<Item = &'a ServiceStatus>,
        page_size: usize,
        max_bytes: usize,
    ) -> (Vec<ServiceStatus>, Option<&'a ServiceStatus>) {
        ops::fill_page(unsent, page_size, max_bytes, |s| in_list_answer(s.clone()))
    }

    fn status(id: &str, last_error: usize) -> ServiceStatus {
        ServiceStatus {
            service_id: id.into(),
            last_error: "e".repeat(last_error),
            ..Default::default()
        }
    }

    /// Sizes as the answer encodes them, each service a repeated field.
    fn encoded(page: &[ServiceStatus]) -> usize {
        crate::proto::ListResponse {
            services: page.to_vec(),
            ..Default::default()
        }
        .encoded_len()
    }

    #[test]
    fn a_page_ends_at_its_size_or_its_bytes_whichever_comes_first() {
        let services: Vec<ServiceStatus> = (0..10).map(|i| status(&format!("s{i}"), 1000)).collect();
        let one = encoded(&services[..1]);
        let ids = |page: &[ServiceStatus]| page.iter().map(|s| s.service_id.clone()).collect::<Vec<_>>();

        let (page, last) = fill_page(services.iter(), 4, usize::MAX);
        assert_eq!(ids(&page), ["s0", "s1", "s2", "s3"]);
        assert_eq!(last.map(|s| s.service_id.as_str()), Some("s3"));

        // Three fit in the bytes, exactly; the page's token resumes after the third.
        let (page, last) = fill_page(services.iter(), 100, 3 * one);
        assert_eq!(ids(&page), ["s0", "s1", "s2"]);
        assert_eq!(encoded(&page), 3 * one);
        assert_eq!(last.map(|s| s.service_id.as_str()), Some("s2"));

        // One service over the bytes on its own is still sent, alone.
        let (page, _) = fill_page(services.iter(), 100, one / 2);
        assert_eq!(ids(&page), ["s0"]);

        // The last page says nothing is left, whichever bound it met.
        let (page, last) = fill_page(services[8..].iter(), 2, 2 * one);
        assert_eq!((page.len(), last), (2, None));
        let (page, last) = fill_page(std::iter::empty(), 2, one);
        assert_eq!((page.len(), last), (0, None));
    }

    /// The metric's initial series cover every RPC the proto declares, added ones too.
    #[test]
    fn the_metric_names_every_method_of_the_service() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let service = set
            .file
            .iter()
            .flat_map(|file| &file.service)
            .find(|service| service.name() == "SoloKernel")
            .expect("the descriptor holds SoloKernel");
        let mut declared: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
        let mut counted = super::METHODS.to_vec();
        declared.sort_unstable();
        counted.sort_unstable();
        assert_eq!(counted, declared);
    }
}
