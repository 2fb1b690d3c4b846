//! PostgreSQL wire protocol v3: the few messages the proxy decodes or
//! builds itself. Everything else crosses the proxy as raw framed bytes.
//!
//! Messages the proxy builds (errors, notices, the authentication
//! exchange, ParameterStatus, BackendKeyData, ReadyForQuery, Query) are
//! pgwire's, encoded by its codec. What the proxy reads is decoded here,
//! borrowing from the bytes it has: the startup packet (with Chorus's own
//! forwarded-cancel code, and PostgreSQL's answers to versions it does not
//! speak), error fields, DataRow values. pgwire's decoders are not used
//! on bytes that come from elsewhere: they copy every field into owned
//! strings, and its ErrorResponse decoder reads past the end of a body
//! that lacks its terminator (a panic), where these stop. The hot path
//! only needs [`frame_header`].

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::response::{ErrorResponse, NoticeResponse, ReadyForQuery};
use pgwire::messages::simplequery::Query;
use pgwire::messages::startup::{
    BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};
use pgwire::messages::Message;
use thiserror::Error;

pub use pgwire::messages::response::TransactionStatus;
pub use pgwire::messages::startup::Authentication;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol version 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: u32 = 3 << 16;
/// Request code of an SSLRequest.
pub const SSL_REQUEST_CODE: u32 = 80877103;
/// Request code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: u32 = 80877104;
/// Request code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: u32 = 80877102;
/// Request code of a CancelRequest one Chorus node passes to the others
/// when the key is not one of its own sessions' (a client with several
/// hosts in its connection string may send its cancel to any of them).
/// A node that gets one never passes it on. Chorus's own: 1234.5690, a
/// code PostgreSQL does not use.
pub const FORWARDED_CANCEL_CODE: u32 = (1234 << 16) | 5690;
/// Largest startup packet accepted, as in PostgreSQL (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// A malformed, truncated or oversized message. It reaches the client as a
/// FATAL ErrorResponse with SQLSTATE 08P01 (protocol_violation).
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("invalid length of startup packet: {0}")]
    StartupLength(usize),
    #[error("invalid message length {len} for message type {tag:?}")]
    MessageLength { tag: char, len: usize },
    #[error("message of type {tag:?} is {len} bytes, more than the maximum of {max}")]
    MessageTooLarge { tag: char, len: usize, max: usize },
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    StartupLayout(&'static str),
    #[error("invalid {0} message")]
    Malformed(&'static str),
    #[error("unexpected message type {0:?} during authentication")]
    Unexpected(char),
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl ProtocolError {
    /// Whether the peer just went away (nothing to answer).
    pub fn is_disconnect(&self) -> bool {
        match self {
            ProtocolError::Truncated => true,
            ProtocolError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
        /// Passed on by another Chorus node ([`FORWARDED_CANCEL_CODE`]).
        forwarded: bool,
    },
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
}

impl StartupPacket {
    /// Look up a startup parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            StartupPacket::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Decode the body of a startup packet (everything after its length word).
pub fn decode_startup(body: &[u8]) -> Result<StartupPacket, ProtocolError> {
    if body.len() < 4 {
        return Err(ProtocolError::StartupLength(body.len() + 4));
    }
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST_CODE if rest.is_empty() => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if rest.is_empty() => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE | FORWARDED_CANCEL_CODE => {
            if rest.len() != 8 {
                return Err(ProtocolError::StartupLayout("cancel request length"));
            }
            Ok(StartupPacket::Cancel {
                pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
                secret: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
                forwarded: code == FORWARDED_CANCEL_CODE,
            })
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            Err(ProtocolError::StartupLayout("request with a body"))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            let mut params = Vec::new();
            let mut fields = rest;
            loop {
                let (name, after) = read_cstr(fields)?;
                if name.is_empty() {
                    if !after.is_empty() {
                        return Err(ProtocolError::StartupLayout("data after terminator"));
                    }
                    break;
                }
                let (value, after) = read_cstr(after)?;
                params.push((name.to_owned(), value.to_owned()));
                fields = after;
            }
            Ok(StartupPacket::Startup { minor, params })
        }
    }
}

/// Split a NUL-terminated UTF-8 string off the front of `buf`.
pub fn read_cstr(buf: &[u8]) -> Result<(&str, &[u8]), ProtocolError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(ProtocolError::StartupLayout("missing string terminator"))?;
    let text =
        std::str::from_utf8(&buf[..end]).map_err(|_| ProtocolError::StartupLayout("not UTF-8"))?;
    Ok((text, &buf[end + 1..]))
}

/// Read a NUL-terminated SQL text (a Query's, a Parse's). Clients send it
/// in their `client_encoding`, which need not be UTF-8: a text that is not
/// valid UTF-8 comes back with every non-ASCII byte replaced by `x`, so it
/// keeps its length (byte offsets into it are offsets into the client's
/// bytes) and its ASCII keywords, quotes and punctuation, which is all the
/// statement recognition looks at. The client's own bytes are what gets
/// forwarded.
pub fn read_sql(buf: &[u8]) -> Result<(std::borrow::Cow<'_, str>, &[u8]), ProtocolError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(ProtocolError::StartupLayout("missing string terminator"))?;
    let raw = &buf[..end];
    let text = match std::str::from_utf8(raw) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => std::borrow::Cow::Owned(
            raw.iter()
                .map(|&b| if b.is_ascii() { char::from(b) } else { 'x' })
                .collect(),
        ),
    };
    Ok((text, &buf[end + 1..]))
}

/// The bytes of a NUL-terminated string, as sent.
pub fn cstr_bytes(buf: &[u8]) -> Option<&[u8]> {
    buf.iter().position(|&b| b == 0).map(|end| &buf[..end])
}

/// Read one startup packet. `Ok(None)` when the peer closed before sending
/// anything (a port probe).
pub async fn read_startup<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<StartupPacket>, ProtocolError> {
    let mut len_buf = [0u8; 4];
    match reader.read_exact(&mut len_buf).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(ProtocolError::StartupLength(len));
    }
    let mut body = vec![0u8; len - 4];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|_| ProtocolError::Truncated)?;
    decode_startup(&body).map(Some)
}

/// The header of a regular message at the front of `buf`: its type byte and
/// its whole length on the wire (type byte included). `Ok(None)` when fewer
/// than five bytes are buffered.
#[inline]
pub fn frame_header(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(ProtocolError::MessageLength {
            tag: tag as char,
            len,
        });
    }
    if len > max {
        return Err(ProtocolError::MessageTooLarge {
            tag: tag as char,
            len,
            max,
        });
    }
    Ok(Some((tag, len + 1)))
}

/// Read one whole regular message into `buf` (cleared first): used during
/// authentication, where messages are few and small.
pub async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<u8, ProtocolError> {
    buf.clear();
    let mut header = [0u8; 5];
    reader
        .read_exact(&mut header)
        .await
        .map_err(|_| ProtocolError::Truncated)?;
    let (tag, total) = frame_header(&header, max)?.ok_or(ProtocolError::Truncated)?;
    buf.resize(total - 5, 0);
    reader
        .read_exact(&mut buf[..])
        .await
        .map_err(|_| ProtocolError::Truncated)?;
    Ok(tag)
}

/// Severity of an ErrorResponse built by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Append a message encoded by pgwire. Encoding fails only for a message
/// longer than its type allows (30 000 bytes for authentication
/// requests, 1 GB for errors); none the proxy builds comes near. Should
/// one, nothing of it is appended and it is logged.
fn put(out: &mut BytesMut, message: &impl Message) {
    let at = out.len();
    if let Err(e) = message.encode(out) {
        out.truncate(at);
        tracing::error!(error = %e, "a protocol message could not be encoded");
    }
}

/// The fields of an error or notice: severity (localized and not), code,
/// message, and the optional ones.
fn fields(
    severity: &str,
    code: &str,
    message: &str,
    rest: &[(u8, Option<&str>)],
) -> Vec<(u8, String)> {
    let mut fields = vec![
        (b'S', severity.to_owned()),
        (b'V', severity.to_owned()),
        (b'C', code.to_owned()),
        (b'M', message.to_owned()),
    ];
    fields.extend(
        rest.iter()
            .filter_map(|(field, value)| Some((*field, (*value)?.to_owned()))),
    );
    fields
}

/// Append an ErrorResponse.
pub fn error_response(
    out: &mut BytesMut,
    severity: Severity,
    code: &str,
    message: &str,
    detail: Option<&str>,
) {
    let fields = fields(severity.as_str(), code, message, &[(b'D', detail)]);
    put(out, &ErrorResponse::new(fields));
}

/// Append a NoticeResponse (severity WARNING).
pub fn warning_notice(out: &mut BytesMut, code: &str, message: &str) {
    put(
        out,
        &NoticeResponse::new(fields("WARNING", code, message, &[])),
    );
}

/// Append a NoticeResponse (severity NOTICE, SQLSTATE 00000).
pub fn notice(out: &mut BytesMut, message: &str) {
    put(
        out,
        &NoticeResponse::new(fields("NOTICE", "00000", message, &[])),
    );
}

/// Append a NoticeResponse relaying a notice (NOTICE, WARNING, …) a
/// backend sent on a connection of the proxy's own.
pub fn relay_notice(out: &mut BytesMut, notice: &tokio_postgres::error::DbError) {
    let fields = fields(
        notice.severity(),
        notice.code().code(),
        notice.message(),
        &[(b'D', notice.detail()), (b'H', notice.hint())],
    );
    put(out, &NoticeResponse::new(fields));
}

/// Append an authentication request ('R').
pub fn authentication(out: &mut BytesMut, request: &Authentication) {
    put(out, request);
}

/// Append AuthenticationSASL offering SCRAM-SHA-256.
pub fn authentication_sasl(out: &mut BytesMut) {
    authentication(out, &Authentication::SASL(vec!["SCRAM-SHA-256".to_owned()]));
}

/// Append an AuthenticationSASLContinue or AuthenticationSASLFinal.
pub fn authentication_sasl_data(out: &mut BytesMut, data: &str, last: bool) {
    let data = Bytes::copy_from_slice(data.as_bytes());
    authentication(
        out,
        &if last {
            Authentication::SASLFinal(data)
        } else {
            Authentication::SASLContinue(data)
        },
    );
}

/// Append BackendKeyData (protocol 3.0: a 4-byte secret).
pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    put(out, &BackendKeyData::new(pid, SecretKey::I32(secret)));
}

/// Append ParameterStatus.
pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    put(
        out,
        &ParameterStatus::new(name.to_owned(), value.to_owned()),
    );
}

/// Append ReadyForQuery.
pub fn ready_for_query(out: &mut BytesMut, status: TransactionStatus) {
    put(out, &ReadyForQuery::new(status));
}

/// The transaction status a ReadyForQuery's byte says ('I', 'T' or 'E';
/// anything else is read as idle).
pub fn transaction_status(byte: u8) -> TransactionStatus {
    TransactionStatus::try_from(byte).unwrap_or(TransactionStatus::Idle)
}

/// Append NegotiateProtocolVersion: the newest minor version supported (0)
/// and the protocol options (`_pq_.*`) that were not recognized.
pub fn negotiate_protocol_version(out: &mut BytesMut, unrecognized: &[&str]) {
    let options = unrecognized.iter().map(|o| (*o).to_owned()).collect();
    put(out, &NegotiateProtocolVersion::new(0, options));
}

/// Append a CancelRequest packet for a backend key.
pub fn cancel_request(out: &mut BytesMut, pid: i32, secret: i32) {
    cancel_packet(out, CANCEL_REQUEST_CODE, pid, secret);
}

/// Append a CancelRequest passed on to another Chorus node.
pub fn forwarded_cancel(out: &mut BytesMut, pid: i32, secret: i32) {
    cancel_packet(out, FORWARDED_CANCEL_CODE, pid, secret);
}

fn cancel_packet(out: &mut BytesMut, code: u32, pid: i32, secret: i32) {
    out.put_i32(16);
    out.put_u32(code);
    out.put_i32(pid);
    out.put_i32(secret);
}

pub fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// Append a simple-protocol Query message.
pub fn query(out: &mut BytesMut, sql: &str) {
    put(out, &Query::new(sql.to_owned()));
}

/// Append a message with a type byte, computing its length.
pub fn write_message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let len_at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - len_at) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

/// The fields of an ErrorResponse or NoticeResponse body that the proxy
/// looks at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    pub severity: &'a str,
    pub code: &'a str,
    pub message: &'a str,
}

/// Parse an ErrorResponse/NoticeResponse body (after the header).
pub fn parse_error_fields(body: &[u8]) -> ErrorFields<'_> {
    let mut fields = ErrorFields::default();
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let Ok((value, after)) = read_cstr(after) else {
            break;
        };
        match field {
            b'V' => fields.severity = value,
            b'S' if fields.severity.is_empty() => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
        rest = after;
    }
    fields
}

/// An ErrorResponse or NoticeResponse body with its position field (`P`,
/// 1-based characters into the query) moved `by` characters back: for a
/// query that was sent inside a longer one. A position that falls outside
/// the first `length` characters is dropped.
pub fn shift_error_position(body: &[u8], by: usize, length: usize) -> BytesMut {
    let mut out = BytesMut::with_capacity(body.len());
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            break;
        }
        // (Bytes, not text: messages are in the client's encoding.)
        let Some(end) = after.iter().position(|&b| b == 0) else {
            break;
        };
        let value = &after[..end];
        rest = &after[end + 1..];
        if field == b'P' {
            let position = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<usize>().ok());
            match position.and_then(|p| p.checked_sub(by)) {
                Some(p) if (1..=length).contains(&p) => {
                    out.put_u8(b'P');
                    out.extend_from_slice(p.to_string().as_bytes());
                    out.put_u8(0);
                }
                _ => {}
            }
            continue;
        }
        out.put_u8(field);
        out.extend_from_slice(value);
        out.put_u8(0);
    }
    out.put_u8(0);
    out
}

/// The text values of a DataRow.
pub fn data_row_texts(body: &[u8]) -> Vec<Option<String>> {
    let mut values = Vec::new();
    let Some(count) = body.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return values;
    };
    let mut at = 2;
    for _ in 0..count {
        let Some(len) = body
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            break;
        };
        at += 4;
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = len as usize;
        let Some(value) = body.get(at..at + len) else {
            break;
        };
        values.push(Some(String::from_utf8_lossy(value).into_owned()));
        at += len;
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_position_moves_back_by_a_prefix_or_goes() {
        let body = b"SERROR\0C42601\0Msyntax error \xe9\0P57\0\0";
        let moved = shift_error_position(body, 50, 10);
        assert_eq!(&moved[..], b"SERROR\0C42601\0Msyntax error \xe9\0P7\0\0");
        // Before the prefix's end, or past the statement: no position.
        for (by, length) in [(57, 10), (60, 10), (40, 10)] {
            let moved = shift_error_position(body, by, length);
            assert_eq!(&moved[..], b"SERROR\0C42601\0Msyntax error \xe9\0\0");
        }
    }

    #[test]
    fn sql_in_another_encoding_keeps_its_length_and_keywords() {
        // 'é' in LATIN1 is one byte, 0xE9.
        let body = b"INSERT INTO t VALUES ('caf\xe9')\0rest";
        let (sql, rest) = read_sql(body).unwrap();
        assert_eq!(sql, "INSERT INTO t VALUES ('cafx')");
        assert_eq!(sql.len(), body.len() - 5);
        assert_eq!(rest, b"rest");
        assert_eq!(cstr_bytes(body).unwrap().len(), sql.len());
        let (utf8, _) = read_sql("SELECT 'é'\0".as_bytes()).unwrap();
        assert_eq!(utf8, "SELECT 'é'");
    }

    fn startup_bytes(params: &[(&str, &str)], version: u32) -> Vec<u8> {
        let mut body = version.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    #[test]
    fn decodes_a_startup_message() {
        let body = startup_bytes(&[("user", "app"), ("database", "db")], PROTOCOL_3_0);
        let packet = decode_startup(&body).unwrap();
        assert_eq!(packet.param("user"), Some("app"));
        assert_eq!(packet.param("database"), Some("db"));
        assert!(matches!(packet, StartupPacket::Startup { minor: 0, .. }));
    }

    #[test]
    fn decodes_requests() {
        assert_eq!(
            decode_startup(&SSL_REQUEST_CODE.to_be_bytes()).unwrap(),
            StartupPacket::SslRequest
        );
        assert_eq!(
            decode_startup(&GSSENC_REQUEST_CODE.to_be_bytes()).unwrap(),
            StartupPacket::GssEncRequest
        );
        let mut cancel = BytesMut::new();
        cancel_request(&mut cancel, 42, -7);
        assert_eq!(
            decode_startup(&cancel[4..]).unwrap(),
            StartupPacket::Cancel {
                pid: 42,
                secret: -7,
                forwarded: false
            }
        );
        let mut passed_on = BytesMut::new();
        forwarded_cancel(&mut passed_on, 42, -7);
        assert_eq!(
            decode_startup(&passed_on[4..]).unwrap(),
            StartupPacket::Cancel {
                pid: 42,
                secret: -7,
                forwarded: true
            }
        );
    }

    #[test]
    fn rejects_bad_startup_packets() {
        assert!(matches!(
            decode_startup(&startup_bytes(&[], 2 << 16)),
            Err(ProtocolError::UnsupportedVersion { major: 2, .. })
        ));
        let mut unterminated = PROTOCOL_3_0.to_be_bytes().to_vec();
        unterminated.extend_from_slice(b"user\0app");
        assert!(decode_startup(&unterminated).is_err());
        assert!(decode_startup(&[1, 2]).is_err());
        let mut trailing = startup_bytes(&[("user", "a")], PROTOCOL_3_0);
        trailing.push(b'x');
        assert!(decode_startup(&trailing).is_err());
    }

    #[test]
    fn frame_header_limits() {
        assert_eq!(frame_header(b"Q\0\0", 100).unwrap(), None);
        assert_eq!(
            frame_header(b"Q\0\0\0\x05\0", 100).unwrap(),
            Some((b'Q', 6))
        );
        assert!(frame_header(b"Q\0\0\0\x03", 100).is_err());
        assert!(matches!(
            frame_header(b"Q\x7f\0\0\0", 100),
            Err(ProtocolError::MessageTooLarge { .. })
        ));
    }

    #[test]
    fn error_response_round_trips() {
        let mut out = BytesMut::new();
        error_response(&mut out, Severity::Fatal, "08P01", "bad message", Some("x"));
        let (tag, total) = frame_header(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(tag, b'E');
        assert_eq!(total, out.len());
        let fields = parse_error_fields(&out[5..]);
        assert_eq!(fields.severity, "FATAL");
        assert_eq!(fields.code, "08P01");
        assert_eq!(fields.message, "bad message");
    }

    /// The messages built through pgwire are byte for byte what the
    /// protocol documentation lays out (and what PostgreSQL sends).
    #[test]
    fn built_messages_have_the_protocols_layout() {
        let built = |f: &dyn Fn(&mut BytesMut)| {
            let mut out = BytesMut::new();
            f(&mut out);
            out.to_vec()
        };
        assert_eq!(
            built(&|o| ready_for_query(o, TransactionStatus::Transaction)),
            b"Z\0\0\0\x05T"
        );
        assert_eq!(
            built(&|o| authentication(o, &Authentication::Ok)),
            b"R\0\0\0\x08\0\0\0\0"
        );
        assert_eq!(
            built(&|o| authentication(o, &Authentication::MD5Password(vec![1, 2, 3, 4]))),
            b"R\0\0\0\x0c\0\0\0\x05\x01\x02\x03\x04"
        );
        assert_eq!(
            built(&|o| authentication_sasl(o)),
            b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"
        );
        assert_eq!(
            built(&|o| authentication_sasl_data(o, "r=abc", false)),
            b"R\0\0\0\x0d\0\0\0\x0br=abc"
        );
        assert_eq!(
            built(&|o| authentication_sasl_data(o, "v=xyz", true)),
            b"R\0\0\0\x0d\0\0\0\x0cv=xyz"
        );
        assert_eq!(
            built(&|o| backend_key_data(o, 7, -2)),
            b"K\0\0\0\x0c\0\0\0\x07\xff\xff\xff\xfe"
        );
        assert_eq!(
            built(&|o| parameter_status(o, "a", "b")),
            b"S\0\0\0\x08a\0b\0"
        );
        assert_eq!(
            built(&|o| negotiate_protocol_version(o, &["_pq_.x"])),
            b"v\0\0\0\x13\0\0\0\0\0\0\0\x01_pq_.x\0"
        );
        assert_eq!(built(&|o| query(o, "SELECT 1")), b"Q\0\0\0\x0dSELECT 1\0");
        assert_eq!(
            built(&|o| error_response(o, Severity::Error, "42P01", "m", None)),
            b"E\0\0\0\x1dSERROR\0VERROR\0C42P01\0Mm\0\0"
        );
        assert_eq!(
            built(&|o| warning_notice(o, "01000", "w")),
            b"N\0\0\0\x21SWARNING\0VWARNING\0C01000\0Mw\0\0"
        );
        assert_eq!(transaction_status(b'E'), TransactionStatus::Error);
    }

    #[test]
    fn random_bytes_never_panic_the_decoders() {
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..5000 {
            let mut bytes = Vec::new();
            for _ in 0..(state % 40) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            let _ = decode_startup(&bytes);
            let _ = frame_header(&bytes, 1 << 20);
            let _ = parse_error_fields(&bytes);
        }
    }
}
