//! Inputs the fuzz targets (fuzz/) found, kept as regression tests.

use nullspace_model::terminal::PtyRequest;

/// ws_frames: a frame id too large for u64 is a float; without exact float
/// parsing it printed back (echoed to the client) one unit off in the last
/// digit, and a second round trip changed it again.
#[test]
fn float_id_echoes_as_sent() {
    let frame = include_bytes!("fixtures/fuzz/ws_frames-float-id.json");
    let req: PtyRequest = serde_json::from_slice(frame).unwrap();
    let printed = serde_json::to_string(&req).unwrap();
    let again: PtyRequest = serde_json::from_str(&printed).unwrap();
    assert_eq!(serde_json::to_string(&again).unwrap(), printed);
    let id = |r: &PtyRequest| match r {
        PtyRequest::PtyResize { id, .. } => id.as_f64().unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(id(&req), 184460000001310968064.0);
    assert_eq!(id(&again), id(&req));
}
