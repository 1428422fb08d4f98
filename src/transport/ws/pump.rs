//! The raw-frame pump: one direction of a relayed WebSocket connection.
//!
//! Reads go into a per-thread 64 KiB buffer and are written straight out with
//! `try_write`; only what the destination cannot take yet is copied into the direction
//! (`pending`), and reading that direction pauses until it is gone. An idle connection
//! therefore holds no buffer at all. A [`FrameScanner`] walks every byte on the way, so
//! frame boundaries are always known (to inject a frame between two, to stop at a Close).

use std::cell::RefCell;
use std::io;

use tokio::net::TcpStream;
use tokio::time::sleep_until;

use crate::proto::ws::{self, FrameScanner, Stop};

pub const READ_BUF: usize = 64 * 1024;
/// Reads per wake-up before yielding to other sessions.
const BATCHES_PER_WAKE: usize = 16;

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF].into_boxed_slice());
}

/// Read what `src` has. A short read means the socket is drained (as tokio's own
/// `poll_read` assumes with epoll): readiness is cleared then, so the caller waits for the
/// next edge instead of issuing a read that can only fail with EAGAIN.
fn read_drained(src: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    use std::io::Read;
    let mut short = 0;
    let r = src.try_io(tokio::io::Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(src)).read(buf)?;
        if n > 0 && n < buf.len() {
            short = n;
            // Reported as WouldBlock only to clear tokio's readiness flag.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok((short, true)),
        r => r.map(|n| (n, false)),
    }
}

/// One direction of a session: what it has seen and what it still owes the destination.
pub struct Direction {
    pub scanner: FrameScanner,
    /// Scanned bytes the destination has not taken yet.
    pending: Vec<u8>,
    pending_off: usize,
    /// Unscanned tail of the last read (a split header or small frame).
    pub carry: Vec<u8>,
    /// Counts writes that took some of `pending`: a destination that is behind but still
    /// taking data is slow, not stalled.
    pub progress: u64,
}

/// Outcome of pumping one direction.
pub enum Step {
    /// Nothing more to read now.
    Idle,
    /// The destination is full; wait until it is writable.
    Blocked,
    /// Read budget used up; more may be waiting.
    Yield,
    /// The source sent a Close frame (raw bytes kept to forward as a reply if needed).
    Close(Option<u16>, Vec<u8>),
    Violation(u16, &'static str),
    /// The source ended (EOF) or failed.
    SrcGone(String),
    /// The destination failed.
    DstGone(String),
}

impl Direction {
    pub fn new(scanner: FrameScanner) -> Self {
        Direction {
            scanner,
            pending: Vec::new(),
            pending_off: 0,
            carry: Vec::new(),
            progress: 0,
        }
    }

    pub fn has_pending(&self) -> bool {
        self.pending_off < self.pending.len()
    }

    /// Write what is pending; Ok(true) when all of it went out.
    pub fn flush_pending(&mut self, dst: &TcpStream) -> io::Result<bool> {
        while self.has_pending() {
            match dst.try_write(&self.pending[self.pending_off..]) {
                Ok(n) => {
                    self.pending_off += n;
                    self.progress += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        // Give the memory back: idle sessions hold no buffers.
        self.pending = Vec::new();
        self.pending_off = 0;
        Ok(true)
    }

    /// Wait (until `deadline`) for `dst` to take everything pending. True when it did.
    pub async fn finish_pending(
        &mut self,
        dst: &TcpStream,
        deadline: tokio::time::Instant,
    ) -> bool {
        loop {
            match self.flush_pending(dst) {
                Ok(true) => return true,
                Ok(false) => {}
                Err(_) => return false,
            }
            tokio::select! {
                _ = sleep_until(deadline) => return false,
                _ = dst.writable() => {}
            }
        }
    }

    /// Write `data` now as far as the socket takes it; keep the rest.
    pub fn send(&mut self, dst: &TcpStream, data: &[u8]) -> io::Result<()> {
        if self.has_pending() {
            self.pending.extend_from_slice(data);
            return Ok(());
        }
        let mut off = 0;
        while off < data.len() {
            match dst.try_write(&data[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.pending = data[off..].to_vec();
                    self.pending_off = 0;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Scan `bytes` (a read, with any carry in front), send what may go now and keep the
    /// undecided tail. Some(step) when the stream stops here or `dst` failed.
    pub fn relay(
        &mut self,
        dst: &TcpStream,
        bytes: &[u8],
        on_text: &mut dyn FnMut(&[u8], bool),
    ) -> Option<Step> {
        let scan = self.scanner.scan(bytes, on_text);
        if let Err(e) = self.send(dst, &bytes[..scan.forward]) {
            return Some(Step::DstGone(e.to_string()));
        }
        if scan.carry {
            if bytes.len() - scan.forward > READ_BUF / 2 {
                // Cannot happen with CLASSIFY_MAX-sized carries; never loop on it.
                return Some(Step::Violation(
                    ws::code::PROTOCOL_ERROR,
                    "frame header too large",
                ));
            }
            self.carry = bytes[scan.forward..].to_vec();
        }
        match scan.stop {
            Some(Stop::Close { code, frame, .. }) => Some(Step::Close(code, bytes[frame].to_vec())),
            Some(Stop::Violation { code, reason }) => Some(Step::Violation(code, reason)),
            None => None,
        }
    }

    /// Relay what `src` has to `dst`, scanning frames on the way.
    pub fn pump(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        on_text: &mut dyn FnMut(&[u8], bool),
    ) -> Step {
        match self.flush_pending(dst) {
            Ok(true) => {}
            Ok(false) => return Step::Blocked,
            Err(e) => return Step::DstGone(e.to_string()),
        }
        for _ in 0..BATCHES_PER_WAKE {
            let step = BUF.with(|cell| {
                let mut buf = cell.borrow_mut();
                let k = self.carry.len();
                buf[..k].copy_from_slice(&self.carry);
                let (n, drained) = match read_drained(src, &mut buf[k..]) {
                    Ok((0, _)) => {
                        return Some(Step::SrcGone(
                            "connection closed without a Close frame".into(),
                        ))
                    }
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(Step::Idle),
                    Err(e) => return Some(Step::SrcGone(e.to_string())),
                };
                self.carry = Vec::new();
                if let Some(step) = self.relay(dst, &buf[..k + n], on_text) {
                    return Some(step);
                }
                if self.has_pending() {
                    return Some(Step::Blocked);
                }
                // A short read emptied the socket: no second read just to see EAGAIN.
                drained.then_some(Step::Idle)
            });
            if let Some(step) = step {
                return step;
            }
        }
        Step::Yield
    }
}
