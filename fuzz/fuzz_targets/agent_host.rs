//! The host reading the guest agent: bounded line reads over any chunking
//! (no line over the limit, nothing lost or invented), and reply decoding;
//! a reply the host reads can be written and read back as the same event.
#![no_main]

use std::io::{BufReader, Cursor};

use libfuzzer_sys::fuzz_target;
use nullspace_model::agent::{Reply, to_line};
use nullspace_vm::agent::{Decoded, LineRead, decode_reply, leading_id, read_line_bounded};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    // Small buffers and limits so lines cross fills and overrun the limit.
    let cap = 1 + (sel & 0x3f) as usize;
    let max = 16 + (sel as usize >> 6) * 512;
    let mut r = BufReader::with_capacity(cap, Cursor::new(stream));
    let mut line = Vec::new();
    let mut seen = Vec::new();
    loop {
        match read_line_bounded(&mut r, &mut line, max).unwrap() {
            LineRead::Line => {
                assert!(line.len() < max, "line of {} with limit {max}", line.len());
                assert!(!line.contains(&b'\n'));
                seen.extend_from_slice(&line);
                seen.push(b'\n');
                check_reply(&line);
            }
            LineRead::TooLong => {
                // The whole rest holds a line of at least `max` bytes.
                let rest = &stream[seen.len()..];
                let end = rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |i| i + 1);
                assert!(end > max, "refused a line of {end} bytes with limit {max}");
                return;
            }
            LineRead::Eof => {
                // Everything read was whole lines; a tail without newline is dropped.
                assert!(stream.starts_with(&seen));
                assert!(!stream[seen.len()..].contains(&b'\n'));
                return;
            }
        }
    }
});

fn check_reply(line: &[u8]) {
    if let Some(id) = leading_id(line) {
        assert!(
            line.starts_with(format!("{{\"id\":{id}").as_bytes()) || line.starts_with(b"{\"id\":0")
        );
    }
    match decode_reply(line) {
        Decoded::Reply(reply) => {
            let written = to_line(&reply);
            match decode_reply(&written[..written.len() - 1]) {
                Decoded::Reply(Reply { id, event }) => {
                    assert_eq!(id, reply.id);
                    assert_eq!(
                        std::mem::discriminant(&event),
                        std::mem::discriminant(&reply.event)
                    );
                    assert_eq!(event.is_final(), reply.event.is_final());
                    assert_eq!(event.stream_bytes(), reply.event.stream_bytes());
                }
                other => panic!("a written reply reads back as {other:?}"),
            }
        }
        Decoded::Unreadable { .. } | Decoded::Garbage => {}
    }
}
