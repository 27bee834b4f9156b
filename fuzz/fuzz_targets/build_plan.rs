//! A build request (as `POST /v1/templates/builds` reads it) → its typed
//! plan: never a panic; a plan serialises (the `/plan` answer), and
//! planning is a function of the request (the same request, the same plan).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nullspace_model::build::plan::{PlanContext, PlanResponse, ValidateResult, plan};
use nullspace_model::build::request::BuildRequest;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<BuildRequest>(data) else {
        return;
    };
    let _ = req.redacted();
    for ctx in [
        PlanContext::default(),
        PlanContext {
            namespace: Some("team"),
            engines: None,
        },
    ] {
        let first = plan(&req, &ctx);
        let second = plan(&req, &ctx);
        assert_eq!(first, second);
        let _ = serde_json::to_vec(&ValidateResult::of(&first)).unwrap();
        if let Ok(p) = first {
            let _ = p.total_steps();
            let _ = serde_json::to_vec(&PlanResponse::new(p)).unwrap();
        }
    }
});
