//! `nullspace template plan --view …`: the server's views of one plan
//! (`POST /v1/templates/plan?view=…`), printed readably or as JSON.

use anyhow::Result;
use clap::ValueEnum;
use nullspace_model::build::views::{Action, DepsView, DryRunView, Known, OutputsView, PlanView};
use serde_json::Value;

use super::{Api, print_json};
use nullspace_model::build::request::BuildRequest;

/// `--view`: the names are the API's.
#[derive(Clone, Copy, ValueEnum)]
pub enum ViewArg {
    Plan,
    Deps,
    DryRun,
    Steps,
    Outputs,
}

impl ViewArg {
    fn model(self) -> PlanView {
        match self {
            ViewArg::Plan => PlanView::Plan,
            ViewArg::Deps => PlanView::Deps,
            ViewArg::DryRun => PlanView::DryRun,
            ViewArg::Steps => PlanView::Steps,
            ViewArg::Outputs => PlanView::Outputs,
        }
    }
}

pub fn show(body: &BuildRequest, view: Option<ViewArg>, json: bool) -> Result<()> {
    let view = view.map_or(PlanView::Plan, ViewArg::model);
    let path = match view {
        PlanView::Plan => "/v1/templates/plan".to_string(),
        v => format!("/v1/templates/plan?view={v}"),
    };
    let api = Api::from_env()?;
    match view {
        // The plan is shown as the server wrote it: the CLI reads none of
        // its fields.
        PlanView::Plan => print_json(&api.post::<_, Value>(&path, body)?),
        _ if json => print_json(&api.post::<_, Value>(&path, body)?),
        PlanView::Deps => {
            print!("{}", deps_text(&api.post(&path, body)?));
            Ok(())
        }
        PlanView::DryRun => {
            print!("{}", dry_run_text(&api.post(&path, body)?));
            Ok(())
        }
        PlanView::Outputs => {
            print!("{}", outputs_text(&api.post(&path, body)?));
            Ok(())
        }
        // Steps carry the SDK's step objects, printed by their fields.
        PlanView::Steps => {
            print!("{}", steps_text(&api.post(&path, body)?));
            Ok(())
        }
    }
}

fn short(d: &str) -> &str {
    // `sha256:` and 12 hex digits: enough to tell digests apart on screen.
    d.get(..19).unwrap_or(d)
}

fn deps_text(d: &DepsView) -> String {
    let mut out = format!("route {}\n", serde_name(&d.route));
    for n in &d.nodes {
        let digest = n.digest.as_deref().map(short).unwrap_or_default();
        out += &format!(
            "  {:<10} {:<14} {}  {digest}\n",
            n.id,
            serde_name(&n.kind),
            n.label
        );
    }
    out += "edges\n";
    for e in &d.edges {
        out += &format!("  {} -> {}\n", e.from, e.to);
    }
    out
}

fn dry_run_text(d: &DryRunView) -> String {
    let mut out = format!(
        "would build: {} ({} stage(s) cached, {} to run)\n",
        if d.would_build { "yes" } else { "no, cached" },
        d.cached_stages,
        d.run_stages
    );
    for s in &d.stages {
        let action = match s.action {
            Action::Run => "run",
            Action::Cached => "cached",
            Action::Bypass => "bypass",
            Action::Skip => "skip",
            Action::Unknown => "unknown",
        };
        let subject = s.subject.as_deref().map(short).unwrap_or_default();
        out += &format!("  {action:<8} {:<15} {subject:<20} {}\n", s.stage, s.detail);
    }
    out
}

fn outputs_text(o: &OutputsView) -> String {
    let mut out = String::new();
    for x in &o.outputs {
        let when = match x.known {
            Known::BeforeBuild => "now",
            Known::AtBuildStart => "at build start",
            Known::AfterBuild => "after the build",
        };
        out += &format!(
            "  {:<22} {:<16} {}\n      {}\n",
            x.name,
            when,
            x.digest.as_deref().unwrap_or("-"),
            x.description
        );
    }
    out
}

fn steps_text(v: &Value) -> String {
    let mut out = String::new();
    for s in v["steps"].as_array().into_iter().flatten() {
        let what = s["shell"]
            .as_str()
            .or(s["command"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| s.to_string());
        out += &format!(
            "  {:>3}. [{}] {:<12} {what}\n",
            s["index"],
            s["runs_in"].as_str().unwrap_or("?"),
            s["action"].as_str().unwrap_or("?"),
        );
    }
    if let Some(c) = v["start_cmd"].as_str() {
        out += &format!("  then start: {c}\n");
    }
    if out.is_empty() {
        out = "  no declarative steps\n".into();
    }
    out
}

/// A unit enum's wire name (`snake_case`), for the readable forms.
fn serde_name(v: &impl serde::Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nullspace_model::build::plan::{PlanContext, plan};
    use nullspace_model::build::views;

    #[test]
    fn readable_forms_name_every_stage() {
        let req: BuildRequest = serde_json::from_value(serde_json::json!({
            "base_image": "r/x:1", "steps": [{"action":"run","command":"make"}], "start_cmd": "./serve"}))
        .unwrap();
        let p = plan(&req, &PlanContext::default()).unwrap();
        let d = deps_text(&views::deps(&p));
        assert!(
            d.contains("base -> layers") && d.contains("start -> snapshot"),
            "{d}"
        );
        let s = steps_text(&serde_json::to_value(views::steps(&p)).unwrap());
        assert!(s.contains("1. [build_vm] run") && s.contains("make"), "{s}");
        let o = outputs_text(&views::outputs(&p));
        assert!(o.contains(&p.digests.source_digest), "{o}");
        let r = dry_run_text(&views::dry_run(&p, &views::CacheFacts::default()));
        assert!(r.starts_with("would build: yes"), "{r}");
    }
}
