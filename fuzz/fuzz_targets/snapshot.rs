//! The protobuf payload of a state snapshot. See `solo::fuzzing::snapshot`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| solo::fuzzing::snapshot(data));
