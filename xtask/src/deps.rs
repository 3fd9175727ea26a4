//! The crate dependency rule, checked on `cargo metadata`.
//!
//! - `eventbus-core` depends on no workspace crate;
//! - `eventbus-pool` only on `eventbus-core`;
//! - the backends (`eventbus-memory`, `eventbus-nats`, `eventbus-kafka`) only on `eventbus-core`
//!   and `eventbus-pool`;
//! - the facade `eventbus` on the core, the pool and the backends;
//! - nothing depends on `eventbus-cli`, `xtask` or `integration-tests`, in any dependency kind;
//! - every workspace crate has a rule here, so a new crate must be placed in the layering.
//!
//! The layering is checked on normal and build dependencies (what a user of the crate gets);
//! dev-dependencies only have to respect the last-but-one rule.

use serde_json::Value;

/// A workspace member, as the matrix needs it.
pub(crate) struct Member {
    pub(crate) name: String,
    pub(crate) features: Vec<String>,
    /// `cargo test` flags selecting its targets except benchmarks (`--lib`, `--bins`, ...).
    pub(crate) test_targets: Vec<&'static str>,
}

const CORE: &str = "eventbus-core";
const POOL: &str = "eventbus-pool";
const BACKENDS: [&str; 3] = ["eventbus-memory", "eventbus-nats", "eventbus-kafka"];
const FACADE: &str = "eventbus";
const LEAVES: [&str; 3] = ["eventbus-cli", "xtask", "integration-tests"];

/// The workspace crates `crate_name` may depend on; `None` if the crate has no rule.
fn allowed(crate_name: &str) -> Option<Vec<&'static str>> {
    let mut layer = vec![CORE, POOL];
    match crate_name {
        CORE | "test-brokers" => Some(vec![]),
        "xtask" => Some(vec!["test-brokers"]),
        POOL => Some(vec![CORE]),
        name if BACKENDS.contains(&name) => Some(layer),
        FACADE => {
            layer.extend(BACKENDS);
            Some(layer)
        }
        "eventbus-cli" | "integration-tests" => {
            layer.extend(BACKENDS);
            layer.push(FACADE);
            Some(layer)
        }
        _ => None,
    }
}

/// The workspace members, in metadata order.
pub(crate) fn members(metadata: &Value) -> Vec<Member> {
    packages(metadata)
        .map(|package| Member {
            name: text(package, "name").to_owned(),
            features: package["features"]
                .as_object()
                .map(|features| features.keys().cloned().collect())
                .unwrap_or_default(),
            test_targets: test_targets(package),
        })
        .collect()
}

/// The flags that select every target of `package` but its benchmarks, which `cargo test` would
/// otherwise run (criterion runs each benchmark once in test mode).
fn test_targets(package: &Value) -> Vec<&'static str> {
    let kinds: Vec<&str> = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|target| target["kind"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    [
        ("lib", "--lib"),
        ("bin", "--bins"),
        ("test", "--tests"),
        ("example", "--examples"),
    ]
    .into_iter()
    .filter(|(kind, _)| kinds.contains(kind))
    .map(|(_, flag)| flag)
    .collect()
}

fn packages(metadata: &Value) -> impl Iterator<Item = &Value> {
    metadata["packages"].as_array().into_iter().flatten()
}

fn text<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field].as_str().unwrap_or_default()
}

/// Every violation of the rule, or `Ok` when there is none.
pub(crate) fn check(metadata: &Value) -> Result<(), Vec<String>> {
    let names: Vec<&str> = packages(metadata).map(|p| text(p, "name")).collect();
    let mut violations = Vec::new();
    for package in packages(metadata) {
        let name = text(package, "name");
        let Some(allowed) = allowed(name) else {
            violations.push(format!(
                "{name}: no layering rule; add it to xtask/src/deps.rs"
            ));
            continue;
        };
        for dependency in package["dependencies"].as_array().into_iter().flatten() {
            let target = text(dependency, "name");
            if !names.contains(&target) {
                continue;
            }
            let kind = dependency["kind"].as_str().unwrap_or("normal");
            if LEAVES.contains(&target) {
                violations.push(format!(
                    "{name} depends on {target} ({kind}): nothing may depend on {target}"
                ));
            } else if kind != "dev" && !allowed.contains(&target) {
                violations.push(format!(
                    "{name} depends on {target} ({kind}): {name} may only depend on [{}]",
                    allowed.join(", ")
                ));
            }
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn package(name: &str, deps: &[(&str, Option<&str>)]) -> Value {
        json!({
            "name": name,
            "features": {},
            "dependencies": deps.iter().map(|(dep, kind)| json!({"name": dep, "kind": kind})).collect::<Vec<_>>(),
        })
    }

    fn workspace(packages: Vec<Value>) -> Value {
        json!({ "packages": packages })
    }

    #[test]
    fn the_intended_layering_passes() {
        let metadata = workspace(vec![
            package(CORE, &[("serde", None)]),
            package(POOL, &[(CORE, None), ("tokio", None)]),
            package("eventbus-nats", &[(CORE, None), (POOL, None)]),
            package(
                FACADE,
                &[
                    (CORE, None),
                    ("eventbus-nats", None),
                    ("eventbus-memory", None),
                ],
            ),
            package("eventbus-memory", &[(CORE, None), (POOL, None)]),
            package("eventbus-cli", &[(FACADE, None)]),
            package("integration-tests", &[(FACADE, Some("dev"))]),
            package("xtask", &[("serde_json", None)]),
        ]);
        assert_eq!(check(&metadata), Ok(()));
    }

    #[test]
    fn core_depending_on_a_workspace_crate_is_a_violation() {
        let metadata = workspace(vec![
            package(CORE, &[(POOL, None)]),
            package(POOL, &[(CORE, None)]),
        ]);
        let violations = check(&metadata).unwrap_err();
        assert_eq!(violations.len(), 1);
        assert!(violations[0].starts_with("eventbus-core depends on eventbus-pool"));
    }

    #[test]
    fn a_backend_depending_on_another_backend_or_the_facade_is_a_violation() {
        let metadata = workspace(vec![
            package(CORE, &[]),
            package(
                "eventbus-kafka",
                &[(CORE, None), ("eventbus-memory", Some("build"))],
            ),
            package("eventbus-memory", &[(CORE, None), (FACADE, None)]),
            package(FACADE, &[(CORE, None)]),
        ]);
        assert_eq!(check(&metadata).unwrap_err().len(), 2);
    }

    #[test]
    fn nothing_may_depend_on_the_cli_xtask_or_integration_tests_even_for_tests() {
        let metadata = workspace(vec![
            package(CORE, &[("xtask", Some("dev"))]),
            package(FACADE, &[("eventbus-cli", Some("dev"))]),
            package("eventbus-cli", &[]),
            package("xtask", &[]),
        ]);
        assert_eq!(check(&metadata).unwrap_err().len(), 2);
    }

    #[test]
    fn a_crate_without_a_rule_is_a_violation() {
        let metadata = workspace(vec![package("eventbus-redis", &[])]);
        assert!(check(&metadata).unwrap_err()[0].contains("no layering rule"));
    }

    #[test]
    fn members_list_their_features_and_test_targets_without_benches() {
        let mut facade = package(FACADE, &[]);
        facade["features"] = json!({"default": ["memory"], "memory": [], "nats": []});
        facade["targets"] = json!([
            {"kind": ["lib"]}, {"kind": ["bench"]}, {"kind": ["test"]}, {"kind": ["example"]}
        ]);
        let mut tool = package("xtask", &[]);
        tool["targets"] = json!([{"kind": ["bin"]}]);
        let members = members(&workspace(vec![facade, tool]));
        assert_eq!(members[0].name, FACADE);
        assert_eq!(members[0].features, ["default", "memory", "nats"]);
        assert_eq!(members[0].test_targets, ["--lib", "--tests", "--examples"]);
        assert_eq!(members[1].test_targets, ["--bins"]);
    }
}
