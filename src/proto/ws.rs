//! Just enough of RFC 6455 to relay frames as raw bytes.
//!
//! The relay never re-encodes a frame: backend-to-client frames are unmasked on both hops
//! and client-to-backend frames keep the client's mask (any mask key is valid), so bytes
//! are copied through untouched. [`FrameScanner`] walks a byte stream and tracks frame
//! boundaries, validates what a peer controls (reserved bits, opcodes, masking, control
//! frame rules, UTF-8 of client text, message size) and stops at a Close frame. It never
//! holds a frame: only an undecidable tail (a split header or a small frame that must be
//! seen whole) is handed back to the caller to carry over to the next read.

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes lifeguard sends (RFC 6455 7.4.1 and the IANA registry).
pub mod code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const SERVICE_RESTART: u16 = 1012;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const BAD_GATEWAY: u16 = 1014;
    /// What a session gets when its own backend socket dies. 1014 (bad gateway) would be
    /// the closer fit, but tungstenite (0.28) still classes 1014 as reserved and turns it
    /// into a 1002 protocol error on the client side; 1013 is understood everywhere.
    pub const BACKEND_GONE: u16 = TRY_AGAIN_LATER;
}

/// RFC 6455 5.2: the most significant bit of a 64-bit payload length must be 0.
pub const MAX_FRAME_LEN: u64 = i64::MAX as u64;

/// Close codes a peer may send (RFC 6455 7.4, the IANA registry's assigned codes, and the
/// ranges for libraries and applications). 1004-1006 and 1015 are reserved and must never
/// be sent; 1016-2999 are unassigned; below 1000 and from 5000 up are not codes.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Text frames from the backend up to this size are classified (connect, heartbeat,
/// API reply); larger ones are events or bulk replies and stream through unseen.
pub const CLASSIFY_MAX: usize = 1024;
/// How much of a larger text message is shown to the classifier (its first key).
pub const PEEK: usize = 32;

/// A fresh random `Sec-WebSocket-Key`.
pub use tokio_tungstenite::tungstenite::handshake::client::generate_key as new_key;
/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 4.2.2).
pub use tokio_tungstenite::tungstenite::handshake::derive_accept_key as accept_key;

/// A `Sec-WebSocket-Key` as RFC 6455 4.1 requires: 16 bytes, base64-encoded (24
/// characters, the last two `==`, canonical: the unused bits of the last digit are 0).
pub fn valid_client_key(key: &[u8]) -> bool {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let [body @ .., b'=', b'='] = key else {
        return false;
    };
    body.len() == 22
        && body.iter().all(|c| digit(*c).is_some())
        // 22 digits carry 132 bits; the last 4 are padding.
        && digit(body[21]).is_some_and(|d| d & 0x0F == 0)
}

/// Encode one unfragmented frame. `mask` is required for frames a client sends.
pub fn encode_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mbit | n as u8),
        n if n <= 0xFFFF => {
            out.push(mbit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mbit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// The longest prefix of `reason` that fits a Close frame (a control frame carries at most
/// 125 bytes, two of them the code), cut on a char boundary so that it stays valid UTF-8.
pub fn close_reason(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A Close frame with a code and a reason (see [`close_reason`]).
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let reason = close_reason(reason);
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    encode_frame(OP_CLOSE, &payload, mask)
}

/// A random mask key for frames lifeguard itself sends to the backend.
pub fn random_mask() -> Option<[u8; 4]> {
    Some(fastrand::u32(..).to_ne_bytes())
}

/// Which side of the connection a byte stream comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// A WebSocket client (the bot framework): frames must be masked.
    Client,
    /// A WebSocket server (the backend): frames must not be masked.
    Server,
}

/// Why scanning stopped before the end of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A Close frame occupying `frame` (a byte range of the scanned buffer).
    Close {
        code: Option<u16>,
        reason: String,
        frame: std::ops::Range<usize>,
    },
    /// The peer broke the protocol; close with `code`.
    Violation { code: u16, reason: &'static str },
}

/// What one call of [`FrameScanner::scan`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// `buf[..forward]` may be relayed now.
    pub forward: usize,
    /// `buf[forward..]` must be carried to the front of the next read (when `stop` is None).
    pub carry: bool,
    pub stop: Option<Stop>,
}

/// A frame whose payload continues past the scanned buffer.
#[derive(Debug, Clone, Copy)]
struct Partial {
    opcode: u8,
    fin: bool,
    remaining: u64,
    mask: [u8; 4],
    /// Offset into the payload, for the mask key rotation.
    offset: u64,
}

/// Tracks frame boundaries of one direction of one session. Small and allocation-free.
#[derive(Debug)]
pub struct FrameScanner {
    from: From,
    /// Payload of a frame that started in an earlier buffer.
    partial: Option<Partial>,
    /// Opcode of an unfinished fragmented message (text or binary).
    open_message: Option<u8>,
    /// Bytes so far of the current data message (for the size limit).
    message_len: u64,
    max_message: u64,
    /// An incomplete UTF-8 sequence at the end of client text so far.
    utf8_tail: [u8; 3],
    utf8_tail_len: u8,
    /// Data frames and messages seen, for the termination log.
    pub frames: u64,
    pub bytes: u64,
    pub messages: u64,
}

impl FrameScanner {
    pub fn new(from: From, max_message: usize) -> Self {
        FrameScanner {
            from,
            partial: None,
            open_message: None,
            message_len: 0,
            max_message: max_message as u64,
            utf8_tail: [0; 3],
            utf8_tail_len: 0,
            frames: 0,
            bytes: 0,
            messages: 0,
        }
    }

    /// True between messages: a frame injected now cannot split anything.
    pub fn at_boundary(&self) -> bool {
        self.partial.is_none() && self.open_message.is_none()
    }

    /// Walk `buf` (which starts at a frame boundary or inside the payload that
    /// [`FrameScanner`] was left in). `on_text(payload, true)` sees every complete, unfragmented text
    /// frame of at most [`CLASSIFY_MAX`] bytes; such a frame is carried rather than split.
    /// frame of at most [`CLASSIFY_MAX`] bytes (such a frame is carried rather than split);
    /// `on_text(prefix, false)` sees the first [`PEEK`] bytes of every larger text message.
    pub fn scan(&mut self, buf: &[u8], on_text: &mut dyn FnMut(&[u8], bool)) -> Scan {
        let mut pos = 0usize;
        if let Some(mut p) = self.partial.take() {
            let take = (p.remaining.min((buf.len()) as u64)) as usize;
            if let Err(v) = self.check_payload(p.opcode, &buf[..take], p.mask, p.offset) {
                return self.violation(0, v);
            }
            p.remaining -= take as u64;
            p.offset += take as u64;
            pos = take;
            if p.remaining > 0 {
                self.partial = Some(p);
                self.bytes += take as u64;
                return Scan {
                    forward: buf.len(),
                    carry: false,
                    stop: None,
                };
            }
            if let Err(v) = self.end_frame(p.opcode, p.fin) {
                return self.violation(pos, v);
            }
        }
        loop {
            let rest = &buf[pos..];
            if rest.is_empty() {
                self.bytes += pos as u64;
                return Scan {
                    forward: pos,
                    carry: false,
                    stop: None,
                };
            }
            let h = match parse_header(rest) {
                Some(h) => h,
                None => return self.carry(pos),
            };
            if let Err(v) = self.check_header(&h) {
                return self.violation(pos, v);
            }
            let start = pos + h.header_len;
            let avail = (rest.len() - h.header_len) as u64;
            let control = h.opcode >= 0x8;
            if control {
                // <= 125 bytes by check_header: always seen whole.
                if avail < h.len {
                    return self.carry(pos);
                }
                let end = start + h.len as usize;
                if h.opcode == OP_CLOSE {
                    let mut payload = buf[start..end].to_vec();
                    unmask(&mut payload, h.mask, 0);
                    self.bytes += pos as u64;
                    return match parse_close(&payload) {
                        Ok((code, reason)) => Scan {
                            forward: pos,
                            carry: false,
                            stop: Some(Stop::Close {
                                code,
                                reason,
                                frame: pos..end,
                            }),
                        },
                        Err(v) => self.violation(pos, v),
                    };
                }
                self.frames += 1;
                pos = end;
                continue;
            }
            // Data frame. The peer chose `h.len`: a sum that does not fit is too big too.
            // Counted once the frame is taken, not when it is carried to the next read.
            let message_len = match self.message_len.checked_add(h.len) {
                Some(total) if total <= self.max_message => total,
                _ => return self.violation(pos, (code::TOO_BIG, "message too big")),
            };
            let whole_text = h.opcode == OP_TEXT && h.fin && (h.len as usize) <= CLASSIFY_MAX;
            let server_text = h.opcode == OP_TEXT && self.from == From::Server;
            let peek = if whole_text {
                h.len
            } else {
                h.len.min(PEEK as u64)
            };
            if server_text && avail < peek {
                return self.carry(pos);
            }
            if server_text && !whole_text {
                on_text(&buf[start..start + peek as usize], false);
            }
            self.message_len = message_len;
            self.frames += 1;
            let take = avail.min(h.len) as usize;
            let opcode = if h.opcode == OP_CONT {
                self.open_message.unwrap_or(OP_CONT)
            } else {
                h.opcode
            };
            if let Err(v) = self.check_payload(opcode, &buf[start..start + take], h.mask, 0) {
                return self.violation(pos, v);
            }
            if (take as u64) < h.len {
                self.partial = Some(Partial {
                    opcode,
                    fin: h.fin,
                    remaining: h.len - take as u64,
                    mask: h.mask,
                    offset: take as u64,
                });
                // Inside a frame nothing may be injected; the message closes when it ends.
                self.open_message = Some(opcode);
                self.bytes += buf.len() as u64;
                return Scan {
                    forward: buf.len(),
                    carry: false,
                    stop: None,
                };
            }
            if whole_text && self.from == From::Server {
                on_text(&buf[start..start + take], true);
            }
            if let Err(v) = self.end_frame(opcode, h.fin) {
                return self.violation(pos, v);
            }
            pos = start + take;
        }
    }

    fn carry(&mut self, pos: usize) -> Scan {
        self.bytes += pos as u64;
        Scan {
            forward: pos,
            carry: true,
            stop: None,
        }
    }

    fn violation(&mut self, pos: usize, (code, reason): (u16, &'static str)) -> Scan {
        self.bytes += pos as u64;
        Scan {
            forward: pos,
            carry: false,
            stop: Some(Stop::Violation { code, reason }),
        }
    }

    fn check_header(&self, h: &Header) -> Result<(), (u16, &'static str)> {
        if h.len > MAX_FRAME_LEN {
            return Err((
                code::PROTOCOL_ERROR,
                "frame length has its most significant bit set",
            ));
        }
        if h.rsv != 0 {
            return Err((
                code::PROTOCOL_ERROR,
                "reserved bits set (no extension was negotiated)",
            ));
        }
        match (self.from, h.masked) {
            (From::Client, false) => return Err((code::PROTOCOL_ERROR, "client frame not masked")),
            (From::Server, true) => return Err((code::PROTOCOL_ERROR, "server frame masked")),
            _ => {}
        }
        match h.opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !h.fin || h.len > 125 {
                    return Err((
                        code::PROTOCOL_ERROR,
                        "fragmented or oversized control frame",
                    ));
                }
            }
            OP_TEXT | OP_BINARY => {
                if self.open_message.is_some() {
                    return Err((code::PROTOCOL_ERROR, "new message inside a fragmented one"));
                }
            }
            OP_CONT => {
                if self.open_message.is_none() {
                    return Err((code::PROTOCOL_ERROR, "continuation frame without a message"));
                }
            }
            _ => return Err((code::PROTOCOL_ERROR, "unknown opcode")),
        }
        Ok(())
    }

    /// Client text must be valid UTF-8 (checked incrementally, across fragments).
    #[inline]
    fn check_payload(
        &mut self,
        opcode: u8,
        chunk: &[u8],
        mask: [u8; 4],
        offset: u64,
    ) -> Result<(), (u16, &'static str)> {
        if self.from != From::Client || opcode != OP_TEXT || chunk.is_empty() {
            return Ok(());
        }
        self.check_utf8(chunk, mask, offset)
    }

    fn check_utf8(
        &mut self,
        chunk: &[u8],
        mask: [u8; 4],
        offset: u64,
    ) -> Result<(), (u16, &'static str)> {
        // Most client text (OneBot API calls) is ASCII JSON: checked in place, 8 bytes at
        // a time, with no copy.
        if self.utf8_tail_len == 0 && masked_ascii(chunk, mask, offset) {
            return Ok(());
        }
        // Small on purpose: this runs per frame, and a stack array is zeroed each time.
        let mut scratch = [0u8; 256];
        let mut done = 0usize;
        while done < chunk.len() {
            let tail = self.utf8_tail_len as usize;
            scratch[..tail].copy_from_slice(&self.utf8_tail[..tail]);
            let n = (chunk.len() - done).min(scratch.len() - tail);
            scratch[tail..tail + n].copy_from_slice(&chunk[done..done + n]);
            unmask(&mut scratch[tail..tail + n], mask, offset + done as u64);
            let data = &scratch[..tail + n];
            match std::str::from_utf8(data) {
                Ok(_) => self.utf8_tail_len = 0,
                Err(e) if e.error_len().is_none() && data.len() - e.valid_up_to() <= 3 => {
                    let rest = &data[e.valid_up_to()..];
                    self.utf8_tail[..rest.len()].copy_from_slice(rest);
                    self.utf8_tail_len = rest.len() as u8;
                }
                Err(_) => return Err((code::INVALID_PAYLOAD, "invalid UTF-8 in a text message")),
            }
            done += n;
        }
        Ok(())
    }

    /// A data frame ended: close the message when it was the final fragment.
    fn end_frame(&mut self, opcode: u8, fin: bool) -> Result<(), (u16, &'static str)> {
        if !fin {
            self.open_message = Some(opcode);
            return Ok(());
        }
        self.open_message = None;
        self.message_len = 0;
        self.messages += 1;
        if self.utf8_tail_len != 0 {
            self.utf8_tail_len = 0;
            return Err((
                code::INVALID_PAYLOAD,
                "text message ends inside a UTF-8 sequence",
            ));
        }
        Ok(())
    }
}

/// Whether `chunk`, unmasked with `mask` from payload position `offset`, is all ASCII.
/// A byte is ASCII when its top bit is clear after unmasking, i.e. when its top bit equals
/// the mask byte's.
fn masked_ascii(chunk: &[u8], mask: [u8; 4], offset: u64) -> bool {
    let r = (offset & 3) as usize;
    let m = [
        mask[r],
        mask[(r + 1) & 3],
        mask[(r + 2) & 3],
        mask[(r + 3) & 3],
    ];
    let m8 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut words = chunk.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        if (w ^ m8) & 0x8080_8080_8080_8080 != 0 {
            return false;
        }
    }
    // Whole words keep the mask's phase: the rest starts at mask position 0 again.
    words
        .remainder()
        .iter()
        .enumerate()
        .all(|(i, b)| (b ^ m[i & 3]) & 0x80 == 0)
}

#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    mask: [u8; 4],
    len: u64,
    header_len: usize,
}

fn parse_header(b: &[u8]) -> Option<Header> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let (len, mut n) = match b[1] & 0x7F {
        126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as u64, 4),
        127 => {
            let raw: [u8; 8] = b.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(raw), 10)
        }
        l => (l as u64, 2),
    };
    let mut mask = [0u8; 4];
    if masked {
        mask.copy_from_slice(b.get(n..n + 4)?);
        n += 4;
    }
    Some(Header {
        fin: b[0] & 0x80 != 0,
        rsv: (b[0] >> 4) & 0x7,
        opcode: b[0] & 0x0F,
        masked,
        mask,
        len,
        header_len: n,
    })
}

fn unmask(data: &mut [u8], mask: [u8; 4], offset: u64) {
    if mask == [0; 4] {
        return;
    }
    let o = (offset & 3) as usize;
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(i + o) & 3];
    }
}

fn parse_close(payload: &[u8]) -> Result<(Option<u16>, String), (u16, &'static str)> {
    match payload.len() {
        0 => Ok((None, String::new())),
        1 => Err((code::PROTOCOL_ERROR, "one-byte close payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err((code::PROTOCOL_ERROR, "close code not allowed on the wire"));
            }
            let reason = std::str::from_utf8(&payload[2..])
                .map_err(|_| (code::INVALID_PAYLOAD, "close reason is not UTF-8"))?;
            Ok((Some(code), reason.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(s: &mut FrameScanner, buf: &[u8]) -> (Scan, Vec<Vec<u8>>) {
        let mut texts = Vec::new();
        let r = s.scan(buf, &mut |t, whole| {
            if whole {
                texts.push(t.to_vec())
            }
        });
        (r, texts)
    }

    #[test]
    fn server_frames_pass_whole_and_small_text_is_seen() {
        let mut buf = encode_frame(OP_TEXT, b"{\"a\":1}", None);
        buf.extend(encode_frame(OP_PING, b"p", None));
        buf.extend(encode_frame(OP_BINARY, &[0u8; 300], None));
        let mut s = FrameScanner::new(From::Server, 1 << 20);
        let (r, texts) = scan_all(&mut s, &buf);
        assert_eq!(
            r,
            Scan {
                forward: buf.len(),
                carry: false,
                stop: None
            }
        );
        assert_eq!(texts, vec![b"{\"a\":1}".to_vec()]);
        assert_eq!(s.frames, 3);
        assert!(s.at_boundary());
    }

    #[test]
    fn split_small_text_is_carried_large_payload_streams() {
        let small = encode_frame(OP_TEXT, b"hello world", None);
        let mut s = FrameScanner::new(From::Server, 1 << 20);
        let (r, texts) = scan_all(&mut s, &small[..5]);
        assert_eq!((r.forward, r.carry), (0, true));
        assert!(texts.is_empty());
        let (r, texts) = scan_all(&mut s, &small);
        assert_eq!(r.forward, small.len());
        assert_eq!(texts.len(), 1);

        let big = encode_frame(OP_TEXT, &vec![b'x'; 5000], None);
        let (r, _) = scan_all(&mut s, &big[..100]);
        assert_eq!((r.forward, r.carry), (100, false));
        assert!(!s.at_boundary());
        let (r, _) = scan_all(&mut s, &big[100..]);
        assert_eq!(r.forward, big.len() - 100);
        assert!(s.at_boundary());
    }

    #[test]
    fn large_text_messages_show_their_first_bytes() {
        let mut payload = br#"{"status":"ok","retcode":0,"data":["#.to_vec();
        payload.resize(5000, b' ');
        let frame = encode_frame(OP_TEXT, &payload, None);
        let mut s = FrameScanner::new(From::Server, 1 << 20);
        let mut seen = Vec::new();
        // The header and 10 bytes are not enough to classify: carried.
        let r = s.scan(&frame[..14], &mut |p, whole| seen.push((p.to_vec(), whole)));
        assert_eq!((r.forward, r.carry), (0, true));
        let r = s.scan(&frame[..100], &mut |p, whole| {
            seen.push((p.to_vec(), whole))
        });
        assert_eq!((r.forward, r.carry), (100, false));
        assert_eq!(seen, vec![(payload[..PEEK].to_vec(), false)]);
        assert!(crate::proto::onebot::is_reply(&seen[0].0));
    }

    #[test]
    fn split_header_is_carried() {
        let big = encode_frame(OP_BINARY, &vec![1u8; 70000], None);
        let mut s = FrameScanner::new(From::Server, 1 << 20);
        let (r, _) = scan_all(&mut s, &big[..3]);
        assert_eq!((r.forward, r.carry), (0, true));
        let (r, _) = scan_all(&mut s, &big);
        assert_eq!(r.forward, big.len());
        assert!(s.at_boundary());
    }

    #[test]
    fn close_stops_after_what_came_before() {
        let mut buf = encode_frame(OP_TEXT, b"{}", None);
        let at = buf.len();
        buf.extend(close_frame(1001, "bye", None));
        let mut s = FrameScanner::new(From::Server, 1 << 20);
        let (r, _) = scan_all(&mut s, &buf);
        assert_eq!(r.forward, at);
        assert_eq!(
            r.stop,
            Some(Stop::Close {
                code: Some(1001),
                reason: "bye".into(),
                frame: at..buf.len()
            })
        );
        let empty = encode_frame(OP_CLOSE, b"", None);
        let (r, _) = scan_all(&mut FrameScanner::new(From::Server, 1 << 20), &empty);
        assert!(matches!(r.stop, Some(Stop::Close { code: None, .. })));
    }

    #[test]
    fn client_rules() {
        let mut s = FrameScanner::new(From::Client, 1 << 20);
        let (r, _) = scan_all(&mut s, &encode_frame(OP_TEXT, b"x", None));
        assert!(matches!(r.stop, Some(Stop::Violation { code: 1002, .. })));

        let mut s = FrameScanner::new(From::Client, 1 << 20);
        let bad = encode_frame(OP_TEXT, &[0x66, 0xFF, 0x66], Some([1, 2, 3, 4]));
        let (r, _) = scan_all(&mut s, &bad);
        assert!(matches!(r.stop, Some(Stop::Violation { code: 1007, .. })));

        // Valid multi-byte text split across reads and frames.
        let text = "晴，25°C".as_bytes();
        let mut f1 = encode_frame(OP_TEXT, &text[..4], Some([9, 8, 7, 6]));
        f1[0] &= 0x7F; // not final
        let f2 = encode_frame(OP_CONT, &text[4..], Some([5, 4, 3, 2]));
        let mut s = FrameScanner::new(From::Client, 1 << 20);
        let (r, _) = scan_all(&mut s, &f1[..f1.len() - 1]);
        assert_eq!(r.stop, None);
        let (r, _) = scan_all(&mut s, &f1[f1.len() - 1..]);
        assert_eq!(r.stop, None);
        assert!(!s.at_boundary());
        let (r, _) = scan_all(&mut s, &f2);
        assert_eq!(r.stop, None);
        assert!(s.at_boundary());
        assert_eq!(s.messages, 1);

        let mut s = FrameScanner::new(From::Client, 2048);
        let (r, _) = scan_all(
            &mut s,
            &encode_frame(OP_BINARY, &[0; 4096], Some([1, 1, 1, 1])),
        );
        assert!(matches!(r.stop, Some(Stop::Violation { code: 1009, .. })));
    }

    /// A frame header claiming `len` bytes (64-bit form), masked, with no payload.
    fn header_claiming(opcode_byte: u8, len: u64) -> Vec<u8> {
        let mut h = vec![opcode_byte, 0x80 | 127];
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    #[test]
    fn a_length_that_wraps_the_message_total_never_gets_through() {
        // One byte of an unfinished message, then a continuation claiming 2^64-1 bytes:
        // the running total used to wrap to 0 and let everything after it through.
        let mut first = encode_frame(OP_TEXT, b"x", Some([9, 9, 9, 9]));
        first[0] &= 0x7F;
        for (len, want) in [(u64::MAX, 1002), (1 << 63, 1002), (MAX_FRAME_LEN, 1009)] {
            let mut buf = first.clone();
            let at = buf.len();
            buf.extend(header_claiming(OP_CONT, len));
            buf.extend(encode_frame(OP_TEXT, b"smuggled", Some([1, 1, 1, 1])));
            let mut s = FrameScanner::new(From::Client, 64 << 20);
            let (r, _) = scan_all(&mut s, &buf);
            assert_eq!(r.forward, at, "len {len:#x}: nothing past the bad header");
            assert!(
                matches!(r.stop, Some(Stop::Violation { code, .. }) if code == want),
                "len {len:#x}: {:?}",
                r.stop
            );
        }
        // From the backend too (no size limit there, but no wrap either).
        let mut s = FrameScanner::new(From::Server, usize::MAX);
        let mut buf = encode_frame(OP_BINARY, b"x", None);
        buf[0] &= 0x7F;
        let mut h = vec![OP_CONT, 127];
        h.extend_from_slice(&u64::MAX.to_be_bytes());
        buf.extend(h);
        let (r, _) = scan_all(&mut s, &buf);
        assert!(matches!(r.stop, Some(Stop::Violation { code: 1002, .. })));
    }

    #[test]
    fn a_frame_carried_across_reads_counts_once_towards_the_message_size() {
        // Found by fuzzing: a small backend text frame split across many reads was added to
        // the running message size at every attempt, until a limit it is far below fired.
        let frame = encode_frame(OP_TEXT, &[b'x'; 900], None);
        let mut s = FrameScanner::new(From::Server, 2048);
        let mut carry = Vec::new();
        for chunk in frame.chunks(8) {
            let mut buf = std::mem::take(&mut carry);
            buf.extend_from_slice(chunk);
            let (r, _) = scan_all(&mut s, &buf);
            assert_eq!(r.stop, None);
            if r.carry {
                carry = buf[r.forward..].to_vec();
            }
        }
        assert!(carry.is_empty() && s.at_boundary());
        assert_eq!(s.messages, 1);
    }

    #[test]
    fn close_codes_a_peer_must_not_send_are_protocol_errors() {
        for bad in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535,
        ] {
            let mut s = FrameScanner::new(From::Client, 1 << 20);
            let (r, _) = scan_all(&mut s, &close_frame(bad, "x", Some([3, 1, 4, 1])));
            assert!(
                matches!(r.stop, Some(Stop::Violation { code: 1002, .. })),
                "{bad}: {:?}",
                r.stop
            );
        }
        for good in [
            1000u16, 1001, 1002, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999,
        ] {
            let mut s = FrameScanner::new(From::Server, 1 << 20);
            let (r, _) = scan_all(&mut s, &close_frame(good, "ok", None));
            assert!(
                matches!(r.stop, Some(Stop::Close { code: Some(c), .. }) if c == good),
                "{good}: {:?}",
                r.stop
            );
        }
    }

    /// Feed `stream` to a scanner in reads of random sizes, carrying what it hands back the
    /// way the relay does. Returns (forwarded bytes, whole texts seen, final scan's stop).
    fn relay_in_pieces(
        from: From,
        stream: &[u8],
        rng: &mut fastrand::Rng,
    ) -> (Vec<u8>, Vec<Vec<u8>>, Option<Stop>) {
        let mut s = FrameScanner::new(from, 1 << 20);
        let (mut out, mut texts, mut carry) = (Vec::new(), Vec::new(), Vec::new());
        let mut pos = 0;
        while pos < stream.len() {
            let n = rng.usize(1..=700).min(stream.len() - pos);
            let mut buf = std::mem::take(&mut carry);
            buf.extend_from_slice(&stream[pos..pos + n]);
            pos += n;
            let r = s.scan(&buf, &mut |t, whole| {
                if whole {
                    texts.push(t.to_vec())
                }
            });
            out.extend_from_slice(&buf[..r.forward]);
            if r.stop.is_some() {
                return (out, texts, r.stop);
            }
            if r.carry {
                carry = buf[r.forward..].to_vec();
            }
        }
        assert!(
            carry.is_empty(),
            "nothing left over at the end of whole frames"
        );
        assert!(s.at_boundary());
        (out, texts, None)
    }

    #[test]
    fn any_split_of_a_frame_stream_relays_the_same_bytes() {
        let mut rng = fastrand::Rng::with_seed(0x11fe_9a2d);
        for round in 0..300 {
            let from = if round % 2 == 0 {
                From::Server
            } else {
                From::Client
            };
            let mask = || (from == From::Client).then(|| fastrand::u32(..).to_ne_bytes());
            let mut stream = Vec::new();
            let mut texts = Vec::new();
            for _ in 0..rng.usize(1..30) {
                match rng.u8(0..5) {
                    0 | 1 => {
                        let len = rng.usize(0..2000);
                        let t: String = (0..len)
                            .map(|_| rng.choice(['a', '{', '"', '晴', '°']).unwrap())
                            .collect();
                        if t.len() <= CLASSIFY_MAX {
                            texts.push(t.as_bytes().to_vec());
                        }
                        stream.extend(encode_frame(OP_TEXT, t.as_bytes(), mask()));
                    }
                    2 => {
                        let len = rng.usize(0..70_000);
                        stream.extend(encode_frame(OP_BINARY, &vec![7u8; len], mask()));
                    }
                    3 => stream.extend(encode_frame(OP_PING, b"ping", mask())),
                    _ => {
                        // A fragmented text message: start, continuation, final.
                        let mut a = encode_frame(OP_TEXT, "晴天".as_bytes(), mask());
                        a[0] &= 0x7F;
                        let mut b = encode_frame(OP_CONT, b", 25", mask());
                        b[0] &= 0x7F;
                        stream.extend(a);
                        stream.extend(b);
                        stream.extend(encode_frame(OP_CONT, "°C".as_bytes(), mask()));
                    }
                }
            }
            let whole = stream.len();
            stream.extend(close_frame(1000, "bye", mask()));
            let (out, seen, stop) = relay_in_pieces(from, &stream, &mut rng);
            assert_eq!(out.len(), whole, "round {round}: forwarded up to the Close");
            assert_eq!(out, stream[..whole]);
            assert!(
                matches!(
                    stop,
                    Some(Stop::Close {
                        code: Some(1000),
                        ..
                    })
                ),
                "round {round}: {stop:?}"
            );
            if from == From::Server {
                assert_eq!(seen, texts, "round {round}");
            }
        }
    }

    #[test]
    fn masked_ascii_matches_an_unmasked_check_at_every_phase() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let len = rng.usize(0..40);
            let mut plain: Vec<u8> = (0..len).map(|_| rng.u8(0..128)).collect();
            if rng.bool() && len > 0 {
                let at = rng.usize(0..len);
                plain[at] |= 0x80;
            }
            let mask = rng.u32(..).to_ne_bytes();
            let offset = rng.u64(0..8);
            let mut masked = plain.clone();
            unmask(&mut masked, mask, offset); // masking is the same XOR
            assert_eq!(
                masked_ascii(&masked, mask, offset),
                plain.is_ascii(),
                "{plain:?} mask {mask:?} offset {offset}"
            );
        }
    }

    #[test]
    fn close_frame_reason_is_cut_on_a_char_boundary() {
        let f = close_frame(1012, &"停".repeat(100), None);
        assert!(f.len() <= 2 + 125);
        let (code, reason) = parse_close(&f[2..]).unwrap();
        assert_eq!(code, Some(1012));
        assert!(reason.len() <= 123);
    }

    #[test]
    fn client_keys_are_16_bytes_of_base64() {
        assert!(valid_client_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        for _ in 0..100 {
            assert!(valid_client_key(new_key().as_bytes()));
        }
        for bad in [
            &b""[..],
            b"dGhlIHNhbXBsZSBub25jZQ=",
            b"dGhlIHNhbXBsZSBub25jZR==",
            b"dGhlIHNhbXBsZSBub25j*Q==",
            b"dGhlIHNhbXBsZSBub25jZQ==x",
            b"dGhlIHNhbXBsZSBub25jZQ==\x00",
            b"xxxxxxxxxxxxxxxxxxxxxxxx",
            b"dGhlIHNhbXBsZSBub25jZSE=",
        ] {
            assert!(!valid_client_key(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
