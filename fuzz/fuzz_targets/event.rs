//! The protobuf payload of an event, applied to a fresh state and to one holding a service.
//! See `solo::fuzzing::event`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| solo::fuzzing::event(data));
