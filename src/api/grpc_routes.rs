//! Which gRPC service a request on the gRPC port goes to, and what every answer there shares.
//!
//! A request goes by the first segment of its path (`/solo.v1.SoloKernel/Deploy`) to Solo's
//! service, the health service or one of the two reflection services; only gRPC is taken
//! (another content type is `415 Unsupported Media Type`, as the gRPC spec asks of servers,
//! rather than have its body read as gRPC frames and refused for their framing); a service the
//! node does not serve is named in its refusal; and a status in an answer's headers has its
//! message encoded as the gRPC spec does.
//!
//! It stands in for tonic's `Routes`, which is an axum router: four fixed names need no path
//! router, and that router's layers cost every call more than a Status's own handler does.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Map};
use http::{Request, Response, StatusCode};
use tonic::body::Body;
use tonic::server::NamedService;

use super::codec::spec_encoded_grpc_message;
use super::{Error, ErrorKind};

type Answer = Result<Response<Body>, Infallible>;

/// A gRPC service as tonic generates them (and as Solo's layers keep them): always ready, its
/// answers boxed.
pub trait GrpcService:
    tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = BoxFuture<'static, Answer>>
    + NamedService
    + Clone
    + Send
    + 'static
{
}

impl<S> GrpcService for S where
    S: tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future = BoxFuture<'static, Answer>,
        > + NamedService
        + Clone
        + Send
        + 'static
{
}

/// The node's gRPC services: Solo's own, health, and reflection in both versions.
#[derive(Clone)]
pub struct GrpcRoutes<K, H, V1, V1a> {
    pub kernel: K,
    pub health: H,
    pub reflection_v1: V1,
    pub reflection_v1alpha: V1a,
}

impl<K, H, V1, V1a> std::fmt::Debug for GrpcRoutes<K, H, V1, V1a> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcRoutes").finish_non_exhaustive()
    }
}

impl<K, H, V1, V1a> tower::Service<Request<Body>> for GrpcRoutes<K, H, V1, V1a>
where
    K: GrpcService,
    H: GrpcService,
    V1: GrpcService,
    V1a: GrpcService,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Map<BoxFuture<'static, Answer>, fn(Answer) -> Answer>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        let ready = [
            self.kernel.poll_ready(cx),
            self.health.poll_ready(cx),
            self.reflection_v1.poll_ready(cx),
            self.reflection_v1alpha.poll_ready(cx),
        ];
        match ready.iter().all(Poll::is_ready) {
            true => Poll::Ready(Ok(())),
            false => Poll::Pending,
        }
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let answer = if !is_grpc(&request) {
            refused(not_grpc())
        } else {
            // Generic names cannot be patterns.
            let service = service_named_in(request.uri().path());
            if service == K::NAME {
                self.kernel.call(request)
            } else if service == H::NAME {
                self.health.call(request)
            } else if service == V1::NAME {
                self.reflection_v1.call(request)
            } else if service == V1a::NAME {
                self.reflection_v1alpha.call(request)
            } else {
                refused(unknown_service::<K>(request.uri().path()))
            }
        };
        answer.map(spec_encoded_status)
    }
}

/// `foo.Bar` of `/foo.Bar/Baz`.
fn service_named_in(path: &str) -> &str {
    let path = path.strip_prefix('/').unwrap_or(path);
    path.split_once('/').map_or(path, |(service, _)| service)
}

/// `application/grpc`, `application/grpc+proto` and the like; case-insensitive.
fn is_grpc<B>(request: &Request<B>) -> bool {
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    content_type
        .get(..16)
        .is_some_and(|head| head.eq_ignore_ascii_case(b"application/grpc"))
        && matches!(content_type.get(16), None | Some(b'+' | b';'))
}

fn refused(answer: Response<Body>) -> BoxFuture<'static, Answer> {
    Box::pin(std::future::ready(Ok(answer)))
}

fn not_grpc() -> Response<Body> {
    let message = "this is the node's gRPC port: send gRPC (content-type application/grpc); the REST API is \
                   on the HTTP port";
    let mut answer = Response::new(Body::new(message.to_string()));
    *answer.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    answer.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    answer
}

/// A call to a service this node does not serve: tonic's own answer carries no message.
fn unknown_service<K: NamedService>(path: &str) -> Response<Body> {
    let served = format!("it serves {}, grpc.health.v1.Health and server reflection", K::NAME);
    let message = match service_named_in(path) {
        "" => format!("the path '{path}' names no gRPC service (a call's path is /package.Service/Method): {served}"),
        service => format!("this node serves no gRPC service '{service}': {served}"),
    };
    Error::new(ErrorKind::MethodNotAllowed, message).to_status().into_http()
}

/// An answer whose status is in its headers (an error before any message) has its message
/// encoded as the gRPC spec does (see [`spec_encoded_grpc_message`]). A stream's status comes in
/// its trailers and keeps tonic's encoding.
fn spec_encoded_status(answer: Answer) -> Answer {
    let Ok(mut response) = answer;
    let headers = response.headers_mut();
    if let Some(encoded) = headers.get("grpc-message").and_then(spec_encoded_grpc_message) {
        headers.insert("grpc-message", encoded);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_goes_by_the_first_segment_of_its_path() {
        assert_eq!(service_named_in("/solo.v1.SoloKernel/Deploy"), "solo.v1.SoloKernel");
        assert_eq!(service_named_in("/solo.v1.SoloKernel"), "solo.v1.SoloKernel");
        assert_eq!(service_named_in("/"), "");
        assert_eq!(service_named_in("/a/b/c"), "a");
    }

    #[test]
    fn only_grpc_content_types_are_grpc() {
        let with = |content_type: Option<&str>| {
            let mut request = Request::new(());
            if let Some(value) = content_type {
                request
                    .headers_mut()
                    .insert(http::header::CONTENT_TYPE, value.parse().unwrap());
            }
            is_grpc(&request)
        };
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC",
            "application/grpc;q=1",
        ] {
            assert!(with(Some(grpc)), "{grpc}");
        }
        for other in [
            "application/grpc-web",
            "application/grpcx",
            "application/json",
            "text/plain",
        ] {
            assert!(!with(Some(other)), "{other}");
        }
        assert!(!with(None));
    }
}
