//! Moving framed protocol messages from one socket to another, looking
//! only at those a direction asks to see.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::protocol;
use crate::wire::protocol::ProtocolError;

/// Bytes read from a socket at a time.
pub(super) const READ_CHUNK: usize = 16 * 1024;

/// Whether a pump goes on after a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    /// Forward what has been framed so far, then stop.
    Stop,
    /// Forward these bytes (whole messages) instead of the message.
    Replace(BytesMut),
    /// (From `on_message`) forward what came before this message and hold
    /// the message: `forward` returns it as [`Flow::Held`].
    Await,
    /// (From `forward`) the held message; the rest stays buffered.
    Held(BytesMut),
}

#[derive(Debug)]
pub(super) enum PumpError {
    Eof,
    /// Writing failed. From `forward`, every message `on_message` saw (but
    /// one it held) is then consumed from the buffer: they count as sent
    /// to a failed peer.
    WriteFailed,
    Protocol(ProtocolError),
}

/// Tracks message boundaries in a byte stream without buffering messages
/// that nobody inspects.
#[derive(Default)]
pub(super) struct Framer {
    /// Bytes of the current pass-through message not yet seen.
    pub(super) passthrough: usize,
}

/// Read more bytes into `buf`; `Err(Eof)` at end of stream.
pub(super) async fn read_more<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<(), PumpError> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    match reader.read_buf(buf).await {
        Ok(0) => Err(PumpError::Eof),
        Ok(_) => Ok(()),
        Err(e) => Err(PumpError::Protocol(ProtocolError::Io(e))),
    }
}

/// Frame what is buffered, let `on_message` see the inspected messages,
/// write every complete byte to `writer`, and keep the partial rest.
pub(super) async fn forward<W, I, M>(
    framer: &mut Framer,
    buf: &mut BytesMut,
    writer: &mut W,
    max: usize,
    inspect: &I,
    on_message: &mut M,
) -> Result<Flow, PumpError>
where
    W: AsyncWrite + Unpin,
    I: Fn(u8) -> bool,
    M: FnMut(u8, &[u8], &[u8]) -> Result<Flow, ProtocolError>,
{
    let mut pos = 0;
    // Start of the bytes not yet written (after a replaced message).
    let mut start = 0;
    let mut flow = Flow::Continue;
    while pos < buf.len() {
        if framer.passthrough > 0 {
            let n = framer.passthrough.min(buf.len() - pos);
            framer.passthrough -= n;
            pos += n;
            continue;
        }
        let Some((tag, total)) =
            protocol::frame_header(&buf[pos..], max).map_err(PumpError::Protocol)?
        else {
            break;
        };
        if inspect(tag) {
            if buf.len() - pos < total {
                // Make room for the whole message before the next read.
                buf.reserve(total - (buf.len() - pos));
                break;
            }
            flow = on_message(tag, &buf[pos + 5..pos + total], &buf[pos + total..])
                .map_err(PumpError::Protocol)?;
            if let Flow::Replace(replacement) = &flow {
                // Rare (a refused statement): write what came before, then
                // the replacement, and skip the original.
                let written = async {
                    writer.write_all(&buf[start..pos]).await?;
                    writer.write_all(replacement).await
                }
                .await;
                if written.is_err() {
                    buf.advance(pos + total);
                    return Err(PumpError::WriteFailed);
                }
                start = pos + total;
                flow = Flow::Continue;
            }
            if flow == Flow::Await {
                let held = BytesMut::from(&buf[pos..pos + total]);
                if writer.write_all(&buf[start..pos]).await.is_err() {
                    // The held message stays, to be looked at again.
                    buf.advance(pos);
                    return Err(PumpError::WriteFailed);
                }
                buf.advance(pos + total);
                return Ok(Flow::Held(held));
            }
            pos += total;
            if flow == Flow::Stop {
                break;
            }
        } else {
            framer.passthrough = total;
        }
    }
    if pos > start && writer.write_all(&buf[start..pos]).await.is_err() {
        buf.advance(pos);
        return Err(PumpError::WriteFailed);
    }
    if pos > 0 {
        buf.advance(pos);
    }
    Ok(flow)
}

/// One direction's framing state, kept across backend connections: what is
/// buffered, and whether the direction stopped at a message boundary.
#[derive(Default)]
pub(super) struct PumpSide {
    pub(super) buf: BytesMut,
    pub(super) framer: Framer,
    /// Set while framed bytes are being forwarded: a direction dropped
    /// then may have written part of a message.
    pub(super) busy: bool,
    /// Look at what is buffered before reading more (a held message was
    /// put back).
    pub(super) rescan: bool,
}

impl PumpSide {
    /// Whether nothing is half-forwarded: the peer on the other side has
    /// received whole messages only.
    pub(super) fn clean(&self) -> bool {
        !self.busy && self.framer.passthrough == 0
    }
}

/// Read from `reader`, forward to `writer`, until EOF, an error, or
/// `on_message` says stop (`None`) or holds a message (`Some`: the caller
/// puts it back in `side.buf` and sets `side.rescan` to go on). `reading`
/// is set while the pump waits for bytes with none buffered (nothing
/// half-done: the pump may be dropped then).
pub(super) async fn pump<R, W, I, M>(
    reader: &mut R,
    writer: &mut W,
    side: &mut PumpSide,
    max: usize,
    reading: Option<&AtomicBool>,
    inspect: I,
    mut on_message: M,
) -> Result<Option<BytesMut>, PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    I: Fn(u8) -> bool,
    M: FnMut(u8, &[u8], &[u8]) -> Result<Flow, ProtocolError>,
{
    loop {
        if std::mem::take(&mut side.rescan) {
            // (Not reading: the flag may still say so from a pump dropped
            // while it waited for bytes, at a pooled session's release,
            // and the release point would take this message's wait for
            // the end of the transaction.)
            if let Some(reading) = reading {
                reading.store(false, Ordering::SeqCst);
            }
        } else {
            match reading {
                Some(reading) => {
                    reading.store(side.buf.is_empty(), Ordering::SeqCst);
                    let read = read_more(reader, &mut side.buf).await;
                    reading.store(false, Ordering::SeqCst);
                    read?;
                }
                None => read_more(reader, &mut side.buf).await?,
            }
        }
        side.busy = true;
        let flow = match forward(
            &mut side.framer,
            &mut side.buf,
            writer,
            max,
            &inspect,
            &mut on_message,
        )
        .await
        {
            Ok(flow) => flow,
            // The direction stopped at a message boundary, unless a
            // pass-through message is cut (`clean` sees that); what is
            // still buffered goes to the next backend, if there is one.
            Err(PumpError::WriteFailed) => {
                side.busy = false;
                side.rescan = true;
                return Err(PumpError::WriteFailed);
            }
            Err(e) => return Err(e),
        };
        side.busy = false;
        match flow {
            Flow::Stop => return Ok(None),
            Flow::Held(message) => return Ok(Some(message)),
            _ => {}
        }
    }
}
