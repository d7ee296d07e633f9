//! A stored event record: frame, then protobuf `Event`. See `solo::fuzzing::record`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| solo::fuzzing::record(data));
