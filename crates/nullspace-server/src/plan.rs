//! `POST /v1/templates/plan`: the build plan serialised
//! ([`nullspace_model::build::plan::PlanResponse`]), with what only the
//! server can add: the Dockerfile an engine would run for declarative
//! steps, and a Dockerfile's stages and ignored instructions. The digests
//! are the plan's, the same a build of this request records. Secret values
//! never appear (only ids and auth kinds).

use nullspace_model::build::plan::{
    BuildPlan, IgnoredInstruction, PlanResponse, PlanStage, Route, Source,
};

pub fn response(plan: BuildPlan) -> PlanResponse {
    let rendered = match (&plan.route, &plan.source) {
        (Route::Engine, Source::Image { .. } | Source::Template { .. }) => {
            nullspace_build::render::render_plan(&plan).ok()
        }
        _ => None,
    };
    let analysis = match &plan.source {
        Source::Dockerfile {
            text, build_args, ..
        } => Some(nullspace_build::dockerfile::analyze(text, build_args)),
        _ => None,
    };
    let mut r = PlanResponse::new(plan);
    let d = &mut r.build_plan;
    if let Some(rd) = rendered {
        d.dockerfile = Some(rd.dockerfile);
    }
    match analysis {
        Some(Ok(a)) => {
            d.stages = a
                .stages
                .iter()
                .map(|st| PlanStage {
                    index: st.index,
                    name: st.name.clone(),
                    line: st.line,
                    from: st.from.clone(),
                    resolved: st.resolved.clone(),
                })
                .collect();
            d.ignored_instructions = a.warnings.iter().map(|w| w.instruction.clone()).collect();
            d.ignored_instruction_warnings = a
                .warnings
                .iter()
                .map(|w| IgnoredInstruction {
                    instruction: w.instruction.clone(),
                    line: w.line,
                    message: w.message.clone(),
                })
                .collect();
        }
        Some(Err(e)) => r.warnings.push(format!("dockerfile: {e}")),
        None => {}
    }
    r
}
