//! The guest's init reading the host: the stream is cut into lines the
//! same way however it arrives in chunks, never holding a line at the
//! limit, and each request line parses, or is answerable with an error,
//! or is silently not ours. A request the host writes reads back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nullspace_model::agent::lines::LineSplitter;
use nullspace_model::agent::{MAX_LINE, parse_request, to_line};

fn split(chunks: &mut dyn Iterator<Item = &[u8]>) -> (Vec<Vec<u8>>, usize) {
    let mut s = LineSplitter::new();
    let mut out = Vec::new();
    for c in chunks {
        s.push(c, &mut |l| out.push(l.to_vec()));
        assert!(s.buffered() < MAX_LINE);
    }
    (out, s.buffered())
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let whole = split(&mut std::iter::once(stream));
    let step = 1 + sel as usize;
    let chunked = split(&mut stream.chunks(step));
    assert_eq!(whole, chunked, "chunks of {step}");
    for line in &whole.0 {
        assert!(!line.contains(&b'\n') && line.len() < MAX_LINE);
        match parse_request(line) {
            Ok(req) => {
                let written = to_line(&req);
                let again = parse_request(&written).expect("a written request parses");
                assert_eq!(to_line(&again), written);
            }
            Err(e) => {
                if let Some(reply) = e.reply() {
                    assert_eq!(Some(reply.id), e.id());
                    assert!(reply.event.is_final());
                }
            }
        }
    }
});
