use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::answers::{
    capture_trigger_line, describes_plan, lease_question, notification_for_client,
};
use super::client::ends_transaction;
use super::pump::{pump, Flow, PumpError, PumpSide};
use super::state::RelayState;

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

#[tokio::test]
async fn forwards_split_and_large_messages_unchanged() {
    // A big pass-through message split across reads, then an inspected one.
    let mut input = message(b'd', &vec![7u8; 100_000]);
    input.extend(message(b'Q', b"SELECT 1\0"));
    input.extend(message(b'X', b""));
    let (mut client, proxy_side) = tokio::io::duplex(1024);
    let writer_task = tokio::spawn({
        let input = input.clone();
        async move {
            client.write_all(&input).await.unwrap();
            client
        }
    });
    let mut reader = proxy_side;
    let mut out = Vec::new();
    let mut seen = Vec::new();
    pump(
        &mut reader,
        &mut out,
        &mut PumpSide::default(),
        1 << 20,
        None,
        |t| t == b'Q' || t == b'X',
        |tag, body, _| {
            seen.push((tag, body.to_vec()));
            Ok(if tag == b'X' {
                Flow::Stop
            } else {
                Flow::Continue
            })
        },
    )
    .await
    .unwrap();
    let _client = writer_task.await.unwrap();
    assert_eq!(out, input);
    assert_eq!(seen[0], (b'Q', b"SELECT 1\0".to_vec()));
    assert_eq!(seen[1].0, b'X');
}

/// Pump `input` to the end, inspecting every message; what came out.
async fn pump_all(input: &[u8]) -> (Result<Option<BytesMut>, PumpError>, Vec<u8>) {
    let mut reader = input;
    let mut out = Vec::new();
    let result = pump(
        &mut reader,
        &mut out,
        &mut PumpSide::default(),
        1 << 20,
        None,
        |_| true,
        |_, _, _| Ok(Flow::Continue),
    )
    .await;
    (result, out)
}

#[test]
fn notifications_of_the_sessions_own_backend_carry_the_clients_pid() {
    let state = RelayState::new(None, "postgres", false);
    state.client_pid.store(77, Ordering::Relaxed);
    state.backend_pid.store(4242, Ordering::Relaxed);
    let body = |pid: i32| {
        let mut b = pid.to_be_bytes().to_vec();
        b.extend_from_slice(b"chan\0payload\0");
        b
    };
    let rewritten = notification_for_client(&state, &body(4242)).unwrap();
    assert_eq!(&rewritten[..], &message(b'A', &body(77))[..]);
    // Another session's notification keeps its sender's pid; so does
    // one where the client already knows the backend's pid.
    assert!(notification_for_client(&state, &body(999)).is_none());
    state.client_pid.store(4242, Ordering::Relaxed);
    assert!(notification_for_client(&state, &body(4242)).is_none());
}

/// A peer that is gone: every write fails.
struct Gone;

impl AsyncWrite for Gone {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_failed_write_leaves_the_direction_at_a_message_boundary() {
    // Whole inspected messages, then the start of another: the whole
    // ones count as sent, the partial one waits for the next backend.
    let mut input = message(b'B', b"bind");
    input.extend(message(b'S', b""));
    let partial = message(b'Q', b"SELECT 1\0");
    input.extend(&partial[..7]);
    let mut side = PumpSide::default();
    let mut seen = Vec::new();
    let result = pump(
        &mut &input[..],
        &mut Gone,
        &mut side,
        1 << 20,
        None,
        |_| true,
        |tag, _, _| {
            seen.push(tag);
            Ok(Flow::Continue)
        },
    )
    .await;
    assert!(matches!(result, Err(PumpError::WriteFailed)), "{result:?}");
    assert_eq!(seen, [b'B', b'S']);
    assert!(side.clean());
    assert_eq!(&side.buf[..], &partial[..7]);
    // A pass-through message cut by the failure: not clean.
    let mut side = PumpSide::default();
    let big = message(b'd', &[7u8; 100]);
    let result = pump(
        &mut &big[..50],
        &mut Gone,
        &mut side,
        1 << 20,
        None,
        |_| false,
        |_, _, _| Ok(Flow::Continue),
    )
    .await;
    assert!(matches!(result, Err(PumpError::WriteFailed)), "{result:?}");
    assert!(!side.clean());
}

#[tokio::test]
async fn oversized_and_short_lengths_are_protocol_errors() {
    for bad in [vec![b'Q', 0x7f, 0, 0, 0], vec![b'Q', 0, 0, 0, 2]] {
        let (result, out) = pump_all(&bad).await;
        assert!(matches!(result, Err(PumpError::Protocol(_))), "{result:?}");
        assert!(out.is_empty());
    }
}

#[test]
fn statements_that_would_commit_are_recognized() {
    for sql in [
        "COMMIT",
        "commit;",
        "  End  ",
        "COMMIT AND CHAIN",
        "end transaction",
        "PREPARE TRANSACTION 'x'",
    ] {
        assert!(ends_transaction(sql), "{sql}");
    }
    for sql in [
        "ROLLBACK",
        "ABORT",
        "SELECT 1",
        "PREPARE p AS SELECT 1",
        "committee",
        "",
    ] {
        assert!(!ends_transaction(sql), "{sql}");
    }
}

#[tokio::test]
async fn truncated_stream_ends_without_forwarding_the_partial_message() {
    let mut input = message(b'Q', b"SELECT 1\0");
    input.extend_from_slice(&message(b'Q', b"SELECT 2\0")[..6]);
    let (result, out) = pump_all(&input).await;
    assert!(matches!(result, Err(PumpError::Eof)));
    assert_eq!(out, message(b'Q', b"SELECT 1\0"));
}

fn data_row(values: &[&[u8]]) -> Vec<u8> {
    let mut body = (values.len() as i16).to_be_bytes().to_vec();
    for v in values {
        body.extend_from_slice(&(v.len() as i32).to_be_bytes());
        body.extend_from_slice(v);
    }
    body
}

#[test]
fn only_the_capture_triggers_plan_line_is_recognised() {
    let mut plan = 1i16.to_be_bytes().to_vec();
    plan.extend_from_slice(b"QUERY PLAN\0");
    plan.extend_from_slice(&[0; 18]);
    assert!(describes_plan(&plan));
    let mut other = 1i16.to_be_bytes().to_vec();
    other.extend_from_slice(b"QUERY\0");
    other.extend_from_slice(&[0; 18]);
    assert!(!describes_plan(&other));
    assert!(!describes_plan(&2i16.to_be_bytes()));

    assert!(capture_trigger_line(&data_row(&[
        b"Trigger chorus_capture: calls=3"
    ])));
    assert!(capture_trigger_line(&data_row(&[
        b"Trigger chorus_capture on part_a: time=0.1 calls=1"
    ])));
    assert!(capture_trigger_line(&data_row(&[
        b"Trigger chorus_capture_inserts: time=0.2 calls=1"
    ])));
    assert!(capture_trigger_line(&data_row(&[
        b"Trigger chorus_capture_updates on t: calls=1"
    ])));
    assert!(!capture_trigger_line(&data_row(&[
        b"Trigger chorus_captured: calls=3"
    ])));
    assert!(!capture_trigger_line(&data_row(&[
        b"Trigger chorus_capture_insertsx: calls=1"
    ])));
    assert!(!capture_trigger_line(&data_row(&[
        b"Trigger audit: calls=3"
    ])));
    assert!(!capture_trigger_line(&data_row(&[b"  ->  Seq Scan on t"])));
    assert!(!capture_trigger_line(&data_row(&[
        b"Trigger chorus_capture: calls=3",
        b"x"
    ])));
    assert!(!capture_trigger_line(&[0, 1]));
}

fn notice(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [(b'S', "NOTICE"), (b'C', code), (b'M', message)] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    body
}

#[test]
fn a_backend_sessions_question_for_the_lease_is_told_from_other_notices() {
    assert_eq!(
        lease_question(&notice("00000", "chorus:lease 42")),
        Some(42)
    );
    assert_eq!(lease_question(&notice("00000", "chorus:lease 0")), None);
    assert_eq!(
        lease_question(&notice("00000", "chorus:lease 2147483648")),
        None
    );
    assert_eq!(lease_question(&notice("00000", "chorus:lease x")), None);
    assert_eq!(lease_question(&notice("01000", "chorus:lease 42")), None);
    assert_eq!(lease_question(&notice("00000", "relation exists")), None);
}
