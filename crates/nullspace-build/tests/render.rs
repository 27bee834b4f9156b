//! Snapshot tests: each declarative action (as the SDK sends it, parsed by
//! the model) and its rendered Dockerfile. Step rules are the model's: a
//! step that breaks one never reaches the renderer.

use std::collections::BTreeMap;

use nullspace_build::render::{RenderError, RenderInput, Rendered, render, render_plan};
use nullspace_model::build::plan::{PlanContext, plan};
use nullspace_model::build::request::BuildRequest;
use nullspace_model::build::step::{Step, StepError, parse_all};
use serde_json::{Value, json};

#[derive(Debug)]
#[allow(dead_code)] // read through Debug in failure messages
enum E {
    Step(Vec<StepError>),
    Render(RenderError),
}

fn r(steps: Value) -> Result<Rendered, E> {
    let steps = parse_all(steps.as_array().unwrap()).map_err(E::Step)?;
    render(&RenderInput {
        base_image: "ubuntu:22.04",
        steps: &steps,
        build_envs: &BTreeMap::new(),
        runtime_envs: &BTreeMap::new(),
    })
    .map_err(E::Render)
}

fn step_error(steps: Value) -> String {
    match r(steps) {
        Err(E::Step(e)) => e[0].to_string(),
        other => panic!("not a step error: {other:?}"),
    }
}

/// The body after the FROM line.
fn body(steps: Value) -> String {
    let out = r(steps).unwrap().dockerfile;
    out.strip_prefix("FROM ubuntu:22.04\n").unwrap().to_string()
}

#[test]
fn apt_pip_npm_bun() {
    assert_eq!(
        body(json!([{"action":"apt_install","packages":["curl","git"]}])),
        "RUN apt-get update && apt-get install -y curl git && rm -rf /var/lib/apt/lists/*\n"
    );
    assert_eq!(
        body(json!([
            {"action":"pip_install","packages":["requests"]},
            {"action":"pip_install","packages":["black"],"g":false},
            {"action":"pip_install","packages":["numpy>=1.26"],"g":true},
        ])),
        "RUN pip install --no-cache-dir requests\n\
         RUN pip install --user --no-cache-dir black\n\
         RUN pip install --no-cache-dir 'numpy>=1.26'\n"
    );
    assert_eq!(
        body(json!([
            {"action":"npm_install","packages":["typescript"]},
            {"action":"npm_install","packages":["pnpm"],"g":true},
            {"action":"bun_install","packages":["zod"]},
            {"action":"bun_install","packages":["tsx","@scope/pkg@1.2"],"g":true},
        ])),
        "RUN npm install typescript\n\
         RUN npm install -g pnpm\n\
         RUN bun add zod\n\
         RUN bun add --global tsx @scope/pkg@1.2\n"
    );
    assert_eq!(
        step_error(json!([{"action":"apt_install","packages":["--allow-unauthenticated"]}])),
        "steps[0] (apt_install): package \"--allow-unauthenticated\" looks like an option"
    );
    assert!(r(json!([{"action":"npm_install","packages":[]}])).is_err());
}

#[test]
fn run_with_and_without_user() {
    assert_eq!(
        body(json!([
            {"action":"run","command":"echo one"},
            {"action":"run","command":"echo \"two\" 'it''s' $HOME","user":"app"},
            {"action":"run","command":"printf 'a\\nb' > /x\necho multi"},
        ])),
        "RUN echo one\n\
         RUN su -s /bin/sh -c 'echo \"two\" '\\''it'\\'''\\''s'\\'' $HOME' app\n\
         RUN [\"/bin/sh\",\"-c\",\"printf 'a\\\\nb' > /x\\necho multi\"]\n"
    );
    assert!(r(json!([{"action":"run","command":"x","user":"app; rm -rf /"}])).is_err());
    assert!(r(json!([{"action":"run"}])).is_err());
}

#[test]
fn copy_and_copy_items() {
    assert_eq!(
        body(json!([
            {"action":"copy","sources":["builder-context/step-11/src-0/app"],"dst":"/opt/app","user":"app","mode":"0755"},
            {"action":"copy","sources":["config.toml"],"dst":"/etc/app/","force_upload":true},
            {"action":"copy","src":"legacy.txt","dst":"/legacy"},
            {"action":"copy","sources":["a b.txt"],"dst":"/opt/my dir/$HOME"},
            {"action":"copy_items","items":[
                {"sources":["config.toml"],"dst":"/etc/x.toml"},
                {"sources":["app/sub"],"dst":"/opt/sub","mode":"644"},
            ]},
        ])),
        "COPY --chown=app --chmod=0755 builder-context/step-11/src-0/app /opt/app\n\
         COPY config.toml /etc/app/\n\
         COPY legacy.txt /legacy\n\
         COPY [\"a b.txt\",\"/opt/my dir/\\\\$HOME\"]\n\
         COPY config.toml /etc/x.toml\n\
         COPY --chmod=0644 app/sub /opt/sub\n"
    );
    let out = r(json!([
        {"action":"copy","sources":["a","b"],"dst":"/d/"},
        {"action":"copy_items","items":[{"sources":["c"],"dst":"/e"}]},
    ]))
    .unwrap();
    assert_eq!(out.context_refs, ["a", "b", "c"]);
    for bad in [
        json!({"action":"copy","sources":["../etc/passwd"],"dst":"/x"}),
        json!({"action":"copy","sources":["/etc/passwd"],"dst":"/x"}),
        json!({"action":"copy","sources":["a"],"dst":"/x","mode":"abc"}),
        json!({"action":"copy","sources":[],"dst":"/x"}),
        json!({"action":"copy","sources":["a"]}),
        json!({"action":"copy_items","items":[]}),
    ] {
        assert!(r(json!([bad])).is_err(), "{bad}");
    }
}

#[test]
fn file_operations() {
    assert_eq!(
        body(json!([
            {"action":"remove","path":"/tmp/junk","recursive":true,"force":true},
            {"action":"remove","path":"/tmp/one","recursive":false,"force":false},
            {"action":"remove","path":"/tmp/d","recursive":true,"force":false},
            {"action":"remove","path":"/tmp/it's here","recursive":false,"force":true},
            {"action":"rename","src":"/tmp/a","dst":"/tmp/b","force":true},
            {"action":"rename","src":"/tmp/$x","dst":"/tmp/b c","force":false},
            {"action":"make_dir","path":"/data","mode":"0700"},
            {"action":"make_dir","path":"/data2"},
            {"action":"make_symlink","target":"/data","path":"/d"},
        ])),
        "RUN rm -rf /tmp/junk\n\
         RUN rm /tmp/one\n\
         RUN rm -r /tmp/d\n\
         RUN rm -f '/tmp/it'\\''s here'\n\
         RUN mv -f /tmp/a /tmp/b\n\
         RUN mv '/tmp/$x' '/tmp/b c'\n\
         RUN mkdir -p /data && chmod 0700 /data\n\
         RUN mkdir -p /data2\n\
         RUN ln -s /data /d\n"
    );
    assert!(r(json!([{"action":"remove","path":"-rf /"}])).is_err());
}

#[test]
fn git_workdir_user_skip_cache() {
    let out = r(json!([
        {"action":"git_clone","url":"https://github.com/octocat/Hello-World.git","path":"/src/hello","branch":"master","depth":1},
        {"action":"git_clone","url":"https://github.com/octocat/Spoon-Knife.git","path":"/workspace"},
        {"action":"skip_cache"},
        {"action":"workdir","path":"/workspace"},
        {"action":"user","user":"app"},
        {"action":"skip_cache"},
        {"action":"workdir","path":"/srv/$app dir"},
    ]))
    .unwrap();
    assert_eq!(
        out.dockerfile,
        "FROM ubuntu:22.04\n\
         RUN git clone --branch master --depth 1 -- https://github.com/octocat/Hello-World.git /src/hello\n\
         RUN git clone -- https://github.com/octocat/Spoon-Knife.git /workspace\n\
         ARG NULLSPACE_SKIP_CACHE\n\
         WORKDIR /workspace\n\
         USER app\n\
         WORKDIR /srv/\\$app dir\n"
    );
    assert_eq!(out.runtime.workdir.as_deref(), Some("/srv/$app dir"));
    assert_eq!(out.runtime.user.as_deref(), Some("app"));
    assert_eq!(out.cache_bust_arg.as_deref(), Some("NULLSPACE_SKIP_CACHE"));
    assert!(r(json!([{"action":"workdir","path":"relative"}])).is_err());
    assert!(r(json!([{"action":"git_clone","url":"--upload-pack=x"}])).is_err());
    assert!(r(json!([{"action":"git_clone","url":"u","depth":0}])).is_err());
}

#[test]
fn envs_and_errors() {
    let build = BTreeMap::from([
        ("TOKENISH".to_string(), "a \"b\" $c \\d".to_string()),
        ("PLAIN".to_string(), "1".to_string()),
    ]);
    let runtime = BTreeMap::from([("MODE".to_string(), "prod $X".to_string())]);
    let steps = vec![Step::Run {
        command: "echo $PLAIN".into(),
        user: None,
    }];
    let out = render(&RenderInput {
        base_image: "127.0.0.1:5000/base:1",
        steps: &steps,
        build_envs: &build,
        runtime_envs: &runtime,
    })
    .unwrap();
    assert_eq!(
        out.dockerfile,
        "FROM 127.0.0.1:5000/base:1\n\
         ARG PLAIN=\"1\"\n\
         ARG TOKENISH=\"a \\\"b\\\" \\$c \\\\d\"\n\
         RUN echo $PLAIN\n\
         ENV MODE=\"prod \\$X\"\n"
    );
    assert_eq!(
        out.runtime.envs.get("MODE").map(String::as_str),
        Some("prod $X")
    );

    let bad_env = BTreeMap::from([("1X".to_string(), "v".to_string())]);
    let e = render(&RenderInput {
        base_image: "a",
        steps: &[],
        build_envs: &bad_env,
        runtime_envs: &BTreeMap::new(),
    })
    .unwrap_err();
    assert!(e.to_string().contains("build env \"1X\""), "{e}");
    assert!(
        step_error(json!([{"action":"frobnicate"}]))
            .starts_with("steps[0] (frobnicate): unknown action \"frobnicate\" (known: ")
    );
    assert_eq!(
        step_error(json!([{"packages":["x"]}])),
        "steps[0] (?): \"action\" is required"
    );
    let e = render(&RenderInput {
        base_image: "$BASE",
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e, RenderError::Base(_)));
}

/// A declarative plan renders from the plan itself: its base, build envs,
/// steps and runtime envs.
#[test]
fn render_from_the_plan() {
    let req: BuildRequest = serde_json::from_value(json!({
        "base_image": "127.0.0.1:5000/base:1",
        "steps": [{"action": "make_dir", "path": "/data"}],
        "build_envs": {"B": "1"},
        "runtime_config": {"default_envs": {"R": "2"}},
        "build_backend": "buildah"
    }))
    .unwrap();
    let p = plan(&req, &PlanContext::default()).unwrap();
    assert_eq!(
        render_plan(&p).unwrap().dockerfile,
        "FROM 127.0.0.1:5000/base:1\nARG B=\"1\"\nRUN mkdir -p /data\nENV R=\"2\"\n"
    );
    let df: BuildRequest = serde_json::from_value(json!({"dockerfile": "FROM x\n"})).unwrap();
    let p = plan(&df, &PlanContext::default()).unwrap();
    assert_eq!(render_plan(&p), Err(RenderError::NotDeclarative));
}
