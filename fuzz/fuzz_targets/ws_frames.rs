//! WebSocket frames: the terminal and watch requests a client sends read
//! back equal after printing; an exec frame is read as the exec channel
//! reads it; guest output becomes text frames that, however the bytes are
//! chunked, join to the lossy UTF-8 of the whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nullspace_model::machine::ExecBody;
use nullspace_model::terminal::{FileWatchRequest, PtyRequest};
use nullspace_model::utf8::Utf8Carry;

fuzz_target!(|data: &[u8]| {
    if let Some((&sel, bytes)) = data.split_first() {
        let step = 1 + (sel as usize % 7);
        let mut c = Utf8Carry::default();
        let mut text = String::new();
        for chunk in bytes.chunks(step) {
            text.push_str(&c.push(chunk));
        }
        text.push_str(&c.finish());
        assert_eq!(text, String::from_utf8_lossy(bytes), "chunks of {step}");
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(req) = serde_json::from_str::<PtyRequest>(s) {
        let printed = serde_json::to_string(&req).unwrap();
        let again: PtyRequest = serde_json::from_str(&printed).expect("a printed frame parses");
        assert_eq!(serde_json::to_string(&again).unwrap(), printed);
    }
    if let Ok(req) = serde_json::from_str::<FileWatchRequest>(s) {
        let printed = serde_json::to_string(&req).unwrap();
        let again: FileWatchRequest =
            serde_json::from_str(&printed).expect("a printed frame parses");
        assert_eq!(serde_json::to_string(&again).unwrap(), printed);
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(s)
        && v.get("type").and_then(|t| t.as_str()) == Some("exec_start")
    {
        let _ = serde_json::from_value::<ExecBody>(v);
    }
});
