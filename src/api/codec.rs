//! How gRPC messages are read off the wire: the codec of the generated server and client
//! (wired in by `build.rs`), and the status of a request that tonic refused to read; and how a
//! status's message is written on it.
//!
//! Both exist to give the client the code the gRPC spec asks for: INVALID_ARGUMENT for bytes
//! that are not the request message, or not framed as one (tonic says INTERNAL, as if the node
//! were at fault), RESOURCE_EXHAUSTED for a message over the limit (tonic says OUT_OF_RANGE),
//! and DEADLINE_EXCEEDED for a request whose `grpc-timeout` passed (tonic says CANCELLED).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::server::NamedService;
use tonic_prost::{ProstCodec, ProstDecoder};

use super::{Error, ErrorKind};

/// [`ProstCodec`], whose decode errors are INVALID_ARGUMENT.
#[derive(Debug, Clone, Default)]
pub struct SoloCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for SoloCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = SoloDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SoloDecoder(self.0.decoder())
    }
}

/// [`ProstDecoder`], whose errors blame the message, not the node.
#[derive(Debug, Clone, Default)]
pub struct SoloDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for SoloDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use prost::bytes::Buf as _;
        // A contiguous buffer, as tonic's always is: a split one goes to prost unchecked.
        if buf.chunk().len() == buf.remaining()
            && let Some(field) = over_repeated(buf.chunk())
        {
            return Err(Error::invalid(format!(
                "the request repeats its field number {field} more than {MAX_REPEATS} times; no \
                 request of this API needs that many"
            ))
            .to_status());
        }
        // The generated client decodes replies with this too, where the words would be wrong;
        // but our own server's replies always decode.
        self.0.decode(buf).map_err(|status| {
            let detail = status.message();
            let detail = detail
                .strip_prefix("failed to decode Protobuf message: ")
                .unwrap_or(detail);
            Error::invalid(format!("the request is not a valid protobuf message: {detail}")).to_status()
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The most entries of one repeated field (or map) at a message's top level that is decoded:
/// more than any request needs (64 labels; a page of 1,000 services in a reply the CLI reads).
/// Protobuf's decoder builds every entry, and a tiny one (a label of two empty strings is 4
/// bytes) takes 35 times its bytes as a map entry: a request of millions, within the size
/// limit, took 0.8 GB and seconds of the API threads before a handler could refuse it.
pub const MAX_REPEATS: usize = 4096;

/// The first field number that `message`'s top level holds more than [`MAX_REPEATS`] times,
/// if any, found by walking its wire format without decoding anything. The walk stops where
/// the bytes are malformed: the decoder, reading in the same order, fails there too (having
/// kept no more than the walk counted), and says what is wrong.
fn over_repeated(message: &[u8]) -> Option<u64> {
    fn varint(bytes: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = bytes.split_first()?;
            *bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }
    fn skip(bytes: &mut &[u8], count: u64) -> Option<()> {
        let count = usize::try_from(count).ok().filter(|&c| c <= bytes.len())?;
        *bytes = &bytes[count..];
        Some(())
    }
    // Field numbers of this API's messages are small; a higher one is unknown, and skipped
    // by the decoder without keeping it.
    let mut counts = [0usize; 64];
    let mut bytes = message;
    // Inside a group (a proto2 relic, which the decoder skips as an unknown field): its
    // fields are not the message's.
    let mut groups = 0u32;
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        match key & 7 {
            0 => {
                varint(&mut bytes)?;
            }
            1 => skip(&mut bytes, 8)?,
            2 => {
                let length = varint(&mut bytes)?;
                skip(&mut bytes, length)?;
            }
            5 => skip(&mut bytes, 4)?,
            3 => {
                groups += 1;
                continue;
            }
            4 => {
                groups = groups.checked_sub(1)?;
                continue;
            }
            _ => return None,
        }
        let field = key >> 3;
        if groups > 0 {
            continue;
        }
        if let Some(count) = counts.get_mut(field as usize) {
            *count += 1;
            if *count > MAX_REPEATS {
                return Some(field);
            }
        }
    }
    None
}

/// Wraps the gRPC service so that tonic's refusals of a request's message are answered as the
/// client's mistakes:
/// - over the size limit: RESOURCE_EXHAUSTED naming the limit. Tonic checks the limit before
///   any codec sees the bytes and answers OUT_OF_RANGE; Solo never answers OUT_OF_RANGE itself
///   (no [`super::ErrorKind`] maps to it), so that code, before any message went out, can only
///   be this refusal. A compressed message over the limit once inflated is tonic's
///   RESOURCE_EXHAUSTED before the handler has it.
/// - a method the service lacks: UNIMPLEMENTED, saying so (tonic says nothing).
/// - compressed in an encoding the node does not take: UNIMPLEMENTED, naming what it takes
///   and, when that is nothing, the setting that decides it (tonic names neither).
/// - badly framed (a compressed flag without compression, a length prefix longer than the
///   body, no message at all): INVALID_ARGUMENT. Tonic answers INTERNAL, which Solo also uses
///   for its own failures; the two are told apart by [`Decoded`], which a handler marks once it
///   has the request.
/// - unfinished when its `grpc-timeout` passes: DEADLINE_EXCEEDED. Tonic's own timer, in a
///   layer outside this one, answers CANCELLED "Timeout expired"; this one's runs out
///   [`DEADLINE_MARGIN`] earlier and that layer polls the request before its timer, so this
///   answer is the one sent. A stream (a Watch, a followed log) that outlives the deadline
///   ends with it too, in its trailers; tonic's timer covers only the answer's headers.
#[derive(Debug, Clone)]
pub struct RequestRefusals<S> {
    inner: S,
    limit: usize,
}

impl<S> RequestRefusals<S> {
    /// `limit` is the `max_decoding_message_size` the inner service was given.
    pub fn new(inner: S, limit: usize) -> RequestRefusals<S> {
        RequestRefusals { inner, limit }
    }
}

impl<S: NamedService> NamedService for RequestRefusals<S> {
    const NAME: &'static str = S::NAME;
}

/// In a request's extensions: marked by the handler that got the decoded request.
#[derive(Debug, Clone, Default)]
pub struct Decoded(Arc<AtomicBool>);

impl Decoded {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_marked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

type Reply = http::Response<tonic::body::Body>;

impl<S, B> tower::Service<http::Request<B>> for RequestRefusals<S>
where
    S: tower::Service<http::Request<B>, Response = Reply, Error = Infallible> + NamedService,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Reply, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let limit = self.limit;
        // Kept for a refusal's message: a clone shares the request's bytes.
        let uri = request.uri().clone();
        let encoding = request.headers().get("grpc-encoding").cloned();
        let decoded = Decoded::default();
        request.extensions_mut().insert(decoded.clone());
        let now = tokio::time::Instant::now();
        let deadline = (request.headers().get("grpc-timeout").and_then(grpc_timeout))
            .map(|timeout| (timeout, now + timeout - DEADLINE_MARGIN.min(timeout / 2)));
        let reply = self.inner.call(request);
        Box::pin(async move {
            let reply = match deadline {
                Some((timeout, deadline)) => match before(deadline, reply).await {
                    // A stream (a Watch) goes on after its headers: it ends at the deadline too.
                    Some(reply) => reply?.map(|body| tonic::body::Body::new(EndsAt::new(body, deadline, timeout))),
                    None => return Ok(past_deadline(timeout).into_http()),
                },
                None => reply.await?,
            };
            let code = reply.headers().get("grpc-status").map(|code| code.as_bytes());
            if code == Some(b"11") || (code == Some(b"8") && !decoded.is_marked() && inflated_too_far(&reply)) {
                let message =
                    format!("the request message is over this node's limit of {limit} bytes (max_request_bytes)");
                return Ok(Error::new(ErrorKind::PayloadTooLarge, message).to_status().into_http());
            }
            // A method the service lacks comes back without a message.
            if code == Some(b"12") && !reply.headers().contains_key("grpc-message") {
                let message = format!(
                    "{} is not a method of {}; list the methods with server reflection",
                    uri.path(),
                    S::NAME
                );
                return Ok(Error::new(ErrorKind::MethodNotAllowed, message).to_status().into_http());
            }
            // Tonic's other UNIMPLEMENTED, an encoding it does not accept, names neither what
            // the node does accept nor the setting that decides it.
            if code == Some(b"12")
                && let Some(encoding) = encoding.as_ref().and_then(|e| e.to_str().ok())
                && encoding != "identity"
                && let taken = encodings_taken(&reply)
                && !taken.contains(&encoding)
            {
                return Ok(encoding_refused(encoding, &taken, &reply));
            }
            if code == Some(b"13") && !decoded.is_marked() {
                let detail =
                    Status::from_header_map(reply.headers()).map_or_else(String::new, |s| s.message().to_string());
                let message = format!("the request is not a well-framed gRPC message: {detail}");
                return Ok(Error::invalid(message).to_status().into_http());
            }
            Ok(reply)
        })
    }
}

/// A request compressed in an encoding the node does not take, told what it takes (`taken`,
/// from tonic's answer). The answer keeps tonic's `grpc-accept-encoding`, as the gRPC spec asks.
fn encoding_refused(encoding: &str, taken: &[&str], tonics: &Reply) -> Reply {
    let message = match taken {
        [] => format!(
            "the request is compressed with `{encoding}`, and this node takes requests uncompressed only: send it \
             uncompressed, or have the node's operator set [solo] grpc_accept_compressed = true (gzip and deflate)"
        ),
        taken => format!(
            "the request is compressed with `{encoding}`, which this node does not take: send it uncompressed or \
             compressed with {}",
            taken.join(" or ")
        ),
    };
    let mut answer = Error::new(ErrorKind::NotImplemented, message).to_status().into_http();
    if let Some(accepted) = tonics.headers().get("grpc-accept-encoding") {
        answer.headers_mut().insert("grpc-accept-encoding", accepted.clone());
    }
    answer
}

/// The compressions named in an answer's `grpc-accept-encoding`.
fn encodings_taken(reply: &Reply) -> Vec<&str> {
    let list = reply
        .headers()
        .get("grpc-accept-encoding")
        .and_then(|list| list.to_str().ok());
    list.into_iter()
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty() && *e != "identity")
        .collect()
}

/// Whether `reply` is tonic's refusal of a compressed message that inflated past the limit: a
/// RESOURCE_EXHAUSTED before the handler had the request, as the request body's own refusals
/// (a budget of bodies in flight) are too, told apart by tonic's words.
fn inflated_too_far(reply: &Reply) -> bool {
    Status::from_header_map(reply.headers()).is_some_and(|s| s.message().starts_with("Error decompressing: size limit"))
}

fn past_deadline(timeout: std::time::Duration) -> Status {
    // A deadline under a millisecond is not "0 ms".
    let deadline = match timeout.as_millis() {
        0 => format!("0.{:03} ms", timeout.as_micros()),
        ms => format!("{ms} ms"),
    };
    let message = format!("the request did not finish within its deadline of {deadline} (the client's grpc-timeout)");
    Error::new(ErrorKind::DeadlineExceeded, message).to_status()
}

/// An answer's body that ends with DEADLINE_EXCEEDED once `deadline` passes, as a server is
/// to end a call whose deadline passed, its answer a stream or not.
struct EndsAt<B> {
    body: B,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    timeout: std::time::Duration,
    ended: bool,
}

impl<B> EndsAt<B> {
    fn new(body: B, deadline: tokio::time::Instant, timeout: std::time::Duration) -> EndsAt<B> {
        EndsAt {
            body,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            timeout,
            ended: false,
        }
    }
}

impl<B> http_body::Body for EndsAt<B>
where
    B: http_body::Body<Data = axum::body::Bytes, Error = Status> + Unpin,
{
    type Data = axum::body::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<axum::body::Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        // The deadline first: a stream that always has more would otherwise never end.
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.ended = true;
            let mut trailers = http::HeaderMap::new();
            return match past_deadline(self.timeout).add_header(&mut trailers) {
                Ok(()) => Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers)))),
                Err(status) => Poll::Ready(Some(Err(status))),
            };
        }
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }
}

/// How much sooner than tonic's timer a request's deadline is kept (at most half the
/// timeout): more than a tick of tokio's millisecond timer wheel, and than a busy thread's
/// pause between tonic arming its timer and this layer arming its own.
const DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(5);

/// `reply`, or `None` once `deadline` has passed. The clock is read at every poll, not only
/// when this timer fires: tonic polls the answer as its own timer fires, and by then this
/// deadline has passed even if its timer entry is due on a later tick.
async fn before<F: std::future::Future>(deadline: tokio::time::Instant, reply: F) -> Option<F::Output> {
    let mut reply = std::pin::pin!(reply);
    let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(reply) = reply.as_mut().poll(cx) {
            return Poll::Ready(Some(reply));
        }
        if tokio::time::Instant::now() >= deadline || timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// A `grpc-timeout` header's value: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
/// One that is malformed is ignored, as tonic ignores it.
fn grpc_timeout(value: &http::HeaderValue) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = value.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Percent-encodes a `grpc-message` as the gRPC spec does, escaping only `%` and the bytes
/// outside printable ASCII. Tonic also escapes spaces, `#`, `?`, quotes, `<>`, `{}` and the
/// backquote: valid, but grpc-js decodes with `decodeURI`, which leaves `%23` and `%3F` as they
/// are, so its users read "restore%3F". `None` if the value is already as the spec writes it.
pub fn spec_encoded_grpc_message(value: &http::HeaderValue) -> Option<http::HeaderValue> {
    let raw = value.as_bytes();
    let decoded: Vec<u8> = percent_encoding::percent_decode(raw).collect();
    let mut encoded = String::with_capacity(decoded.len());
    for byte in decoded {
        match byte {
            b' '..=b'~' if byte != b'%' => encoded.push(char::from(byte)),
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    (encoded.as_bytes() != raw)
        .then(|| http::HeaderValue::from_str(&encoded).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prost::Message as _;

    use super::{MAX_REPEATS, grpc_timeout, over_repeated, spec_encoded_grpc_message};
    use crate::proto;

    fn deploy_with_labels(count: usize) -> Vec<u8> {
        proto::DeployRequest {
            service_id: "svc".into(),
            labels: (0..count).map(|i| (format!("k{i}"), String::new())).collect(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn a_message_is_refused_once_one_field_repeats_past_the_limit() {
        assert_eq!(over_repeated(&deploy_with_labels(MAX_REPEATS)), None);
        // labels is DeployRequest's field 5.
        assert_eq!(over_repeated(&deploy_with_labels(MAX_REPEATS + 1)), Some(5));
        // A group before them (which the decoder skips) hides nothing.
        let mut grouped = vec![(9 << 3) | 3, (1 << 3), 1, (9 << 3) | 4];
        grouped.extend(deploy_with_labels(MAX_REPEATS + 1));
        assert_eq!(over_repeated(&grouped), Some(5));
        // Fields inside a group are the group's, however many.
        let mut inside = vec![(9 << 3) | 3];
        inside.extend(deploy_with_labels(MAX_REPEATS + 1));
        inside.push((9 << 3) | 4);
        assert_eq!(over_repeated(&inside), None);
        // Malformed bytes are the decoder's to name.
        assert_eq!(over_repeated(&[0x0a, 0x7f]), None);
        // A large bytes field is one entry, however large.
        let module = proto::DeployRequest {
            module: Some(proto::deploy_request::Module::Wasm(vec![0; 1 << 20])),
            ..Default::default()
        };
        assert_eq!(over_repeated(&module.encode_to_vec()), None);
    }

    #[test]
    fn grpc_messages_are_encoded_as_the_spec_encodes_them() {
        let status = tonic::Status::not_found("is it #1? 100% \"sure\" {é}\n");
        let (parts, ()) = status.into_http::<()>().into_parts();
        let tonics = &parts.headers["grpc-message"];
        let spec = spec_encoded_grpc_message(tonics).expect("tonic escapes more than the spec");
        assert_eq!(spec, "is it #1? 100%25 \"sure\" {%C3%A9}%0A");
        // Decoded, both are the message.
        let decoded = |v: &http::HeaderValue| {
            String::from_utf8(percent_encoding::percent_decode(v.as_bytes()).collect()).unwrap()
        };
        assert_eq!(decoded(&spec), decoded(tonics));
        assert_eq!(spec_encoded_grpc_message(&spec), None);
    }

    #[test]
    fn grpc_timeouts_are_read_as_the_spec_writes_them() {
        let read = |value: &str| grpc_timeout(&http::HeaderValue::from_str(value).unwrap());
        assert_eq!(read("300m"), Some(Duration::from_millis(300)));
        assert_eq!(read("2S"), Some(Duration::from_secs(2)));
        assert_eq!(read("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(read("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "300", "123456789m", "3x", "-1m", "1.5S"] {
            assert_eq!(read(bad), None, "{bad}");
        }
    }
}
