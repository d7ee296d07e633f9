//! The record frame: `[format version: u8][CRC-32 of the payload: u32 BE][payload]`.
//!
//! Every event and every snapshot is stored inside one frame, so a torn or flipped byte is
//! caught before the payload is decoded. The layout is normative: see `log-format.md`.

/// The only frame version this build writes and reads.
pub const FRAME_VERSION: u8 = 1;

/// Bytes before the payload: the version byte and the checksum.
pub const HEADER_LEN: usize = 5;

/// Why a stored frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("record is {len} bytes, shorter than the {HEADER_LEN}-byte frame header")]
    Truncated { len: usize },
    #[error("record has frame version {found}; this build reads version {FRAME_VERSION}")]
    UnknownVersion { found: u8 },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
}

/// Frames `payload`, appending the frame to `out` (so one buffer can be reused).
pub fn encode_into(payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + payload.len());
    out.push(FRAME_VERSION);
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Frames `payload` into a new buffer.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(payload, &mut out);
    out
}

/// Builds a frame whose payload `write` appends in place, sparing a copy of the payload.
pub fn encode_with(write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    append_with(&mut out, write);
    out
}

/// As [`encode_with`], but appends the frame to `out`, so many frames can share one buffer.
pub fn append_with(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    write(out);
    let crc = crc32fast::hash(&out[start + HEADER_LEN..]);
    out[start] = FRAME_VERSION;
    out[start + 1..start + HEADER_LEN].copy_from_slice(&crc.to_be_bytes());
}

/// Checks a frame and returns its payload.
pub fn decode(frame: &[u8]) -> Result<&[u8], FrameError> {
    let Some((header, payload)) = frame.split_first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::Truncated { len: frame.len() });
    };
    let [version, crc @ ..] = *header;
    if version != FRAME_VERSION {
        return Err(FrameError::UnknownVersion { found: version });
    }
    let stored = u32::from_be_bytes(crc);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(FrameError::Checksum { stored, computed });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let frame = encode(b"hello");
        assert_eq!(frame.len(), HEADER_LEN + 5);
        assert_eq!(decode(&frame), Ok(&b"hello"[..]));

        for i in 0..frame.len() {
            let mut damaged = frame.clone();
            damaged[i] ^= 0x01;
            assert!(decode(&damaged).is_err(), "flipped bit in byte {i} went unnoticed");
        }
        assert_eq!(decode(&frame[..3]), Err(FrameError::Truncated { len: 3 }));
        assert_eq!(decode(&encode(b"")), Ok(&b""[..]));
        assert_eq!(encode_with(|out| out.extend_from_slice(b"hello")), frame);
        let mut two = encode(b"x");
        append_with(&mut two, |out| out.extend_from_slice(b"hello"));
        assert_eq!(two[two.len() - frame.len()..], frame[..]);
    }

    #[test]
    fn crc_is_the_common_crc32() {
        // CRC-32/ISO-HDLC ("123456789") = 0xCBF43926, as log-format.md states.
        let frame = encode(b"123456789");
        assert_eq!(&frame[1..5], &0xCBF4_3926_u32.to_be_bytes());
    }
}
