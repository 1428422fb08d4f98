//! The frame scanner on any byte stream, from either side, read whole and in pieces.
//!
//! Input: byte 0 picks the side (bit 0: client) and the size limit (bit 1: none), byte 1
//! the read size; the rest is the stream. Checked: nothing panics; what is forwarded never
//! holds a data message over the limit, a length with the top bit set or a close code
//! nobody may send (an independent walk of the forwarded bytes); the carried tail stays
//! small; reading in pieces forwards the same bytes and stops the same way as reading
//! the stream whole (when the stream breaks no rule: a violation inside a payload may be
//! seen after part of that payload streamed on).
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeguard::proto::ws::{self, FrameScanner, From, Stop, CLASSIFY_MAX};

struct Run {
    forwarded: Vec<u8>,
    texts: Vec<Vec<u8>>,
    stop: Option<Stop>,
}

fn relay(from: From, max: usize, stream: &[u8], step: usize) -> Run {
    let mut s = FrameScanner::new(from, max);
    let mut run = Run {
        forwarded: Vec::new(),
        texts: Vec::new(),
        stop: None,
    };
    let mut carry: Vec<u8> = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let n = step.min(stream.len() - pos);
        let mut buf = std::mem::take(&mut carry);
        buf.extend_from_slice(&stream[pos..pos + n]);
        pos += n;
        let r = s.scan(&buf, &mut |t, whole| {
            if whole {
                run.texts.push(t.to_vec())
            }
        });
        assert!(r.forward <= buf.len());
        run.forwarded.extend_from_slice(&buf[..r.forward]);
        if r.stop.is_some() {
            run.stop = r.stop;
            return run;
        }
        if r.carry {
            carry = buf[r.forward..].to_vec();
            // A header (at most 14 bytes) and a small text frame: never a whole read.
            assert!(carry.len() <= CLASSIFY_MAX + 14, "carry {}", carry.len());
        } else {
            assert_eq!(r.forward, buf.len());
        }
    }
    run
}

/// Walk forwarded bytes as frames, independently of the scanner.
fn check_forwarded(bytes: &[u8], max: u64) {
    let mut i = 0usize;
    let mut message: u64 = 0;
    while i + 2 <= bytes.len() {
        let (b0, b1) = (bytes[i], bytes[i + 1]);
        let opcode = b0 & 0x0F;
        let (len, mut hl) = match b1 & 0x7F {
            126 if i + 4 <= bytes.len() => {
                (u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as u64, 4)
            }
            127 if i + 10 <= bytes.len() => (
                u64::from_be_bytes(bytes[i + 2..i + 10].try_into().unwrap()),
                10,
            ),
            126 | 127 => return,
            l => (l as u64, 2),
        };
        assert!(
            len >> 63 == 0,
            "a length with the top bit set was forwarded"
        );
        if b1 & 0x80 != 0 {
            hl += 4;
        }
        if opcode < 0x8 {
            message = message
                .checked_add(len)
                .expect("forwarded message lengths wrapped");
            assert!(message <= max, "a message over the limit was forwarded");
            if b0 & 0x80 != 0 {
                message = 0;
            }
        } else if opcode == 0x8 {
            panic!("a Close frame was forwarded by the scanner");
        }
        let Some(next) = (i as u64).checked_add(hl as u64 + len) else {
            return;
        };
        if next > bytes.len() as u64 {
            return;
        }
        i = next as usize;
    }
}

fn close_of(stop: &Option<Stop>) -> Option<(Option<u16>, String)> {
    match stop {
        Some(Stop::Close { code, reason, .. }) => Some((*code, reason.clone())),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let from = if data[0] & 1 == 0 {
        From::Server
    } else {
        From::Client
    };
    let max = if data[0] & 2 == 0 {
        1 << 16
    } else {
        usize::MAX
    };
    let step = data[1] as usize % 97 + 1;
    let stream = &data[2..];
    let whole = relay(from, max, stream, usize::MAX);
    let pieces = relay(from, max, stream, step);
    check_forwarded(&whole.forwarded, max as u64);
    check_forwarded(&pieces.forwarded, max as u64);
    if let Some(Stop::Close { code: Some(c), .. }) = &whole.stop {
        assert!(ws::close_code_allowed(*c));
    }
    match (&whole.stop, &pieces.stop) {
        (Some(Stop::Violation { code: a, .. }), Some(Stop::Violation { code: b, .. })) => {
            assert_eq!(
                a,
                b,
                "the same rule broken, whatever the reads: {:?} ({}) vs {:?} ({})",
                whole.stop,
                whole.forwarded.len(),
                pieces.stop,
                pieces.forwarded.len()
            )
        }
        (Some(Stop::Violation { .. }), other) | (other, Some(Stop::Violation { .. })) => {
            // Only a check on a payload (UTF-8) can fire in one reading and not yet in the
            // other (the stream ended first); headers are always seen whole.
            assert!(other.is_none(), "{:?} vs {:?}", whole.stop, pieces.stop);
        }
        _ => {
            assert_eq!(whole.forwarded, pieces.forwarded);
            // The Close's byte range is relative to the read it was found in.
            assert_eq!(close_of(&whole.stop), close_of(&pieces.stop));
            if from == From::Server {
                assert_eq!(whole.texts, pieces.texts);
            }
        }
    }
});
