//! Which context attributes the loaded policies can read, so a request's Cedar context holds only those.
//!
//! Building the context is a fixed cost of every decision (Cedar evaluates each attribute into a value),
//! and an attribute no policy names cannot change a decision, so it is left out. The analysis is
//! conservative: it walks each policy's JSON form, records `a` for every `context.a`, `context["a"]` and
//! `context has a`, and any other use of `context` (compared, put in a set or record, an annotation it
//! cannot read, a template) means every attribute is built.

use std::collections::BTreeSet;

use cedar_policy::PolicySet;
use serde_json::Value;

/// The context attributes a policy set can observe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ContextReads {
    /// Only these, by name.
    Attributes(BTreeSet<String>),
    /// The context as a whole: every attribute.
    All,
}

impl ContextReads {
    pub(super) fn of(policies: &PolicySet) -> Self {
        if policies.templates().next().is_some() {
            return ContextReads::All;
        }
        let mut names = BTreeSet::new();
        for policy in policies.policies() {
            match policy.to_json() {
                Ok(json) if attributes(&json, &mut names) => {}
                _ => return ContextReads::All,
            }
        }
        ContextReads::Attributes(names)
    }

    /// Whether the context must hold `attribute`.
    pub(super) fn wants(&self, attribute: &str) -> bool {
        match self {
            ContextReads::Attributes(names) => names.contains(attribute),
            ContextReads::All => true,
        }
    }
}

/// Adds to `names` the attributes `json` (a policy in Cedar's JSON format, or part of one) reads from
/// `context`; false when it uses `context` in any other way.
fn attributes(json: &Value, names: &mut BTreeSet<String>) -> bool {
    match json {
        Value::Object(map) => {
            if is_context(json) {
                return false;
            }
            for (key, inner) in map {
                // `context.a` and `context["a"]` are {".": {"left": {"Var": "context"}, "attr": "a"}};
                // `context has a` is the same under "has", and `context has a.b` has "attr": ["a", "b"].
                if (key == "." || key == "has") && inner.get("left").is_some_and(is_context) {
                    let attr = match inner.get("attr") {
                        Some(Value::Array(path)) => path.first(),
                        attr => attr,
                    };
                    match attr.and_then(Value::as_str) {
                        Some(attr) => {
                            names.insert(attr.to_owned());
                            continue;
                        }
                        None => return false,
                    }
                }
                if !attributes(inner, names) {
                    return false;
                }
            }
            true
        }
        Value::Array(items) => items.iter().all(|item| attributes(item, names)),
        _ => true,
    }
}

/// `{"Var": "context"}`, or anything else that names the variable.
fn is_context(json: &Value) -> bool {
    json.get("Var").and_then(Value::as_str) == Some("context")
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn reads(text: &str) -> ContextReads {
        ContextReads::of(&PolicySet::from_str(text).unwrap())
    }

    fn only(names: &[&str]) -> ContextReads {
        ContextReads::Attributes(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn the_development_policy_reads_nothing() {
        assert_eq!(reads(super::super::DEVELOPMENT_POLICY), only(&[]));
    }

    #[test]
    fn the_production_policy_reads_what_it_names() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/policy/production.cedar"
        ))
        .unwrap();
        assert_eq!(
            reads(&text),
            only(&[
                "attributeKeys",
                "capabilities",
                "eventName",
                "reasonLength",
                "sessionDurationInMinutes"
            ])
        );
    }

    #[test]
    fn every_way_of_naming_an_attribute_counts() {
        assert_eq!(
            reads(
                r#"permit (principal, action, resource) when { context.a > 1 };
                   forbid (principal, action, resource) when { context["b"] == "x" };
                   forbid (principal, action, resource) unless { context has c };
                   permit (principal, action, resource) when { context has d.e };
                   permit (principal, action, resource) when { context.f.g == 1 };"#
            ),
            only(&["a", "b", "c", "d", "f"])
        );
    }

    #[test]
    fn any_other_use_of_the_context_reads_all_of_it() {
        for text in [
            r#"permit (principal, action, resource) when { context == {"a": 1} };"#,
            r#"permit (principal, action, resource) when { [context].contains({"a": 1}) };"#,
            r#"permit (principal, action, resource) when { {"c": context}.c has a };"#,
            r#"permit (principal, action, resource) when { (if true then context else {"a": 1}) has a };"#,
            r#"permit (principal, action, resource) when { context.a == 1 };
               forbid (principal, action, resource) when { context != {} };"#,
            r#"permit (principal == ?principal, action, resource) when { context.a == 1 };"#,
        ] {
            assert_eq!(reads(text), ContextReads::All, "{text}");
        }
    }

    #[test]
    fn strings_and_annotations_that_say_context_are_not_the_context() {
        assert_eq!(
            reads(
                r#"@context("context")
                   permit (principal, action, resource) when { context.a == "context" };"#
            ),
            only(&["a"])
        );
    }

    #[test]
    fn wants() {
        assert!(only(&["a"]).wants("a"));
        assert!(!only(&["a"]).wants("b"));
        assert!(ContextReads::All.wants("b"));
    }
}
