//! Fuzz the decoders that see untrusted client bytes: the startup packet,
//! message framing, and the messages the relay inspects.
#![no_main]

use chorus_proxy::wire::frontend::{is_inspected, FrontendState};
use chorus_proxy::wire::protocol::{decode_startup, frame_header, parse_error_fields};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_startup(data);
    let _ = parse_error_fields(data);
    // Treat the input as a stream of regular messages, as the relay does.
    let mut state = FrontendState::default();
    let mut rest = data;
    while let Ok(Some((tag, total))) = frame_header(rest, 1 << 20) {
        if rest.len() < total {
            break;
        }
        if is_inspected(tag) {
            let _ = state.on_message(tag, &rest[5..total]);
        }
        rest = &rest[total..];
    }
});
