//! Each event encoded once for all the watchers it goes to, as the Kubernetes API server's
//! watch cache serializes an object once per format: with a thousand watchers following every
//! event, cloning and encoding each event for each of them was a fifth of the node's work.
//!
//! [`EncodedOnce`] keeps the encodings of the newest events ([`Frames`], one for each API):
//! gRPC Watch sends them as [`WatchFrame`]s, `/events` as SSE frames.

use std::sync::{Mutex, PoisonError};

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::proto::{self, Event, watch_response};

/// The most events whose encodings an [`EncodedOnce`] keeps: enough for watchers a few
/// thousand events apart to share them.
const MAX_ENCODED_EVENTS: usize = 4096;

/// Recent events encoded once for every watcher, in the form of each API.
#[derive(Debug)]
pub struct Frames {
    /// As gRPC Watch sends them.
    pub grpc: EncodedOnce<WatchFrame>,
    /// As `/events` sends them.
    pub sse: EncodedOnce<axum::response::sse::Event>,
}

impl Frames {
    /// Memos of a quarter as many events as the log's tail window holds in memory
    /// (`database.tail_window_events`), and at most [`MAX_ENCODED_EVENTS`]: what they keep
    /// stays a fraction of what the window does, which a node short of memory makes smaller.
    pub fn for_tail_window(window_events: usize) -> Frames {
        let events = (window_events / 4).min(MAX_ENCODED_EVENTS);
        Frames {
            grpc: EncodedOnce::new(events),
            sse: EncodedOnce::new(events),
        }
    }
}

/// The encodings of recent events, one slot per seq modulo its size.
///
/// Keyed by seq alone: a seq names one event for the life of a log, and this lives no longer
/// than the node's API, which serves one open log.
#[derive(Debug)]
pub struct EncodedOnce<T> {
    slots: Box<[Mutex<Option<Encoded<T>>>]>,
}

/// An event's seq, and its encoding.
type Encoded<T> = (u64, T);

impl<T: Clone> EncodedOnce<T> {
    fn new(events: usize) -> Self {
        EncodedOnce {
            slots: (0..events.max(1)).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// `event` as `encode` makes it: the encoding an earlier watcher made, or a new one, kept
    /// for the next.
    pub fn get(&self, event: &Event, encode: impl FnOnce(&Event) -> T) -> T {
        let slot = &self.slots[(event.seq % self.slots.len() as u64) as usize];
        let mut kept = slot.lock().unwrap_or_else(PoisonError::into_inner);
        match &*kept {
            Some((seq, encoded)) if *seq == event.seq => return encoded.clone(),
            // A slot keeps the newer event: the watchers at the head share it, while one
            // replaying history would only push it out.
            Some((seq, _)) if *seq > event.seq => {
                drop(kept);
                return encode(event);
            }
            _ => {}
        }
        // Encoded under the lock: a watcher that waits for it wants this very encoding.
        let encoded = encode(event);
        *kept = Some((event.seq, encoded.clone()));
        encoded
    }
}

/// A Watch answer as the server sends it: a `WatchResponse`, encoded. The generated server
/// sends these in place of [`proto::WatchResponse`] (`build.rs`), so that an event's frame is
/// made once and shared; clients decode the usual `WatchResponse`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WatchFrame(Bytes);

/// `WatchResponse.msg`'s field number for an event.
const EVENT_FIELD: u32 = 1;

impl WatchFrame {
    /// The frame of `event`, encoded from a borrow: the event is not copied into a message.
    pub fn event(event: &Event) -> WatchFrame {
        let mut frame = Vec::with_capacity(prost::encoding::message::encoded_len(EVENT_FIELD, event));
        prost::encoding::message::encode(EVENT_FIELD, event, &mut frame);
        WatchFrame(frame.into())
    }

    /// A progress note: every event up to `head_seq` was sent or filtered out.
    pub fn progress(head_seq: u64) -> WatchFrame {
        WatchFrame::from(proto::WatchResponse {
            msg: Some(watch_response::Msg::Progress(proto::Progress { head_seq })),
        })
    }

    /// The message this frame holds.
    fn decoded(&self) -> Result<proto::WatchResponse, DecodeError> {
        proto::WatchResponse::decode(self.0.clone())
    }
}

impl From<proto::WatchResponse> for WatchFrame {
    fn from(message: proto::WatchResponse) -> WatchFrame {
        WatchFrame(message.encode_to_vec().into())
    }
}

impl std::fmt::Debug for WatchFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.decoded() {
            Ok(message) => f.debug_tuple("WatchFrame").field(&message).finish(),
            Err(_) => f.debug_tuple("WatchFrame").field(&self.0).finish(),
        }
    }
}

impl Message for WatchFrame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    /// Only for completeness (the server never reads a frame): merges into the decoded message
    /// and encodes it again.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut message = self.decoded()?;
        message.merge_field(tag, wire_type, buf, ctx)?;
        *self = WatchFrame::from(message);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn deployed(seq: u64) -> Event {
        Event {
            seq,
            tenant: "acme".into(),
            service_id: "svc".into(),
            kind: Some(proto::event::Kind::ServiceDeployed(proto::ServiceDeployed {
                version: 2,
                module_sha256: "ab".repeat(32),
                labels: [("team".to_string(), "core".to_string())].into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn a_frame_is_the_watch_response_it_stands_for() {
        let event = deployed(7);
        let message = proto::WatchResponse {
            msg: Some(watch_response::Msg::Event(event.clone())),
        };
        let frame = WatchFrame::event(&event);
        assert_eq!(frame.encode_to_vec(), message.encode_to_vec());
        assert_eq!(frame.encoded_len(), message.encoded_len());
        assert_eq!(frame.decoded().unwrap(), message);

        let progress = proto::WatchResponse {
            msg: Some(watch_response::Msg::Progress(proto::Progress { head_seq: 41 })),
        };
        assert_eq!(WatchFrame::progress(41).encode_to_vec(), progress.encode_to_vec());
    }

    #[test]
    fn a_frame_decodes_and_merges_as_its_message_does() {
        let frame = WatchFrame::event(&deployed(3));
        assert_eq!(WatchFrame::decode(frame.encode_to_vec().as_slice()).unwrap(), frame);
        // Merging a progress note replaces the oneof, as for the message itself.
        let mut merged = frame.clone();
        merged
            .merge(WatchFrame::progress(9).encode_to_vec().as_slice())
            .unwrap();
        assert_eq!(merged, WatchFrame::progress(9));
        assert!(
            WatchFrame::decode(&b"\x0a\x05ab"[..]).is_err(),
            "a truncated event is refused"
        );
        merged.clear();
        assert_eq!(merged.encoded_len(), 0);
    }

    #[test]
    fn the_memos_are_a_quarter_of_the_tail_window_and_at_most_4096_events() {
        let slots = |window: usize| {
            let frames = Frames::for_tail_window(window);
            assert_eq!(frames.grpc.slots.len(), frames.sse.slots.len());
            frames.grpc.slots.len()
        };
        assert_eq!(slots(16_384), 4096);
        assert_eq!(slots(1 << 20), 4096);
        assert_eq!(slots(1000), 250);
        // Without a window, one slot: still correct, seldom shared.
        assert_eq!(slots(0), 1);
    }

    #[test]
    fn each_event_is_encoded_once_while_its_slot_holds_it() {
        let encoded = EncodedOnce::new(4);
        let encodes = Cell::new(0);
        let encode = |event: &Event| {
            encodes.set(encodes.get() + 1);
            WatchFrame::event(event)
        };
        let first = encoded.get(&deployed(5), encode);
        for _ in 0..10 {
            assert_eq!(encoded.get(&deployed(5), encode), first);
        }
        assert_eq!(encodes.get(), 1, "ten watchers share one encoding");

        // Seq 9 takes seq 5's slot; seq 5, older, is then encoded each time without taking it
        // back.
        assert_eq!(encoded.get(&deployed(9), encode), WatchFrame::event(&deployed(9)));
        assert_eq!(encoded.get(&deployed(5), encode), first);
        assert_eq!(encoded.get(&deployed(5), encode), first);
        assert_eq!(encodes.get(), 4);
        encoded.get(&deployed(9), encode);
        assert_eq!(encodes.get(), 4, "seq 9 kept its slot");
        // Other seqs have slots of their own.
        encoded.get(&deployed(6), encode);
        encoded.get(&deployed(6), encode);
        assert_eq!(encodes.get(), 5);
    }
}
