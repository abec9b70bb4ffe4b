//! Which context attributes the loaded policies can read, so a request's Cedar context holds only those
//! and the decision cache's key only what can change a decision.
//!
//! Building the context is a fixed cost of every decision (Cedar evaluates each attribute into a value),
//! and an attribute no policy names cannot change a decision, so it is left out. The analysis is
//! conservative: it walks each policy's JSON form and records the path of every chain of attribute
//! accesses on `context`: `context.a` and `context["a"]` read `a`, `context.a.b` and `context.a has b`
//! read `a.b` (and nothing else of `a`), `context has a` reads `a`. Any other use of `context`
//! (compared, put in a set or record, an annotation it cannot read, a template) means everything is read.

use std::collections::BTreeSet;

use cedar_policy::PolicySet;
use serde_json::Value;

/// The context attributes a policy set can observe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ContextReads {
    /// Only these paths (`["end_user", "verified"]`), each with everything under it.
    Paths(PathTree),
    /// The context as a whole: every attribute.
    All,
}

/// Read paths as a tree of attribute names, so a lookup walks the path once instead of comparing it with
/// every read path (a dozen lookups a decision: that scan was half of the production policy's decision
/// key).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct PathTree {
    /// A read path ends here: everything under this node is read.
    whole: bool,
    /// The attributes read under this node, in name order.
    children: Vec<(String, PathTree)>,
}

impl PathTree {
    fn of(paths: &BTreeSet<Vec<String>>) -> Self {
        let mut root = PathTree::default();
        for path in paths {
            let mut node = &mut root;
            for name in path {
                let at = match node.children.iter().position(|(child, _)| child == name) {
                    Some(at) => at,
                    None => {
                        node.children.push((name.clone(), PathTree::default()));
                        node.children.len() - 1
                    }
                };
                node = &mut node.children[at].1;
            }
            node.whole = true;
        }
        root
    }
}

/// How much of the value at a path the policies can observe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Read {
    /// Nothing.
    Nothing,
    /// Some of the record's attributes: ask again for each.
    Part,
    /// All of it.
    Whole,
}

impl ContextReads {
    pub(super) fn of(policies: &PolicySet) -> Self {
        if policies.templates().next().is_some() {
            return ContextReads::All;
        }
        let mut paths = BTreeSet::new();
        for policy in policies.policies() {
            match policy.to_json() {
                Ok(json) if walk(&json, &mut paths) => {}
                _ => return ContextReads::All,
            }
        }
        ContextReads::paths(&paths)
    }

    /// Reads of exactly `paths`.
    pub(super) fn paths(paths: &BTreeSet<Vec<String>>) -> Self {
        ContextReads::Paths(PathTree::of(paths))
    }

    /// Whether the context must hold the top-level `attribute`.
    pub(super) fn wants(&self, attribute: &str) -> bool {
        self.read(&[attribute]) != Read::Nothing
    }

    /// How much of the value at `path` (from the context's top) the policies can observe.
    pub(super) fn read(&self, path: &[&str]) -> Read {
        let ContextReads::Paths(root) = self else {
            return Read::Whole;
        };
        let mut node = root;
        for name in path {
            if node.whole {
                return Read::Whole;
            }
            match node.children.iter().find(|(child, _)| child == name) {
                Some((_, child)) => node = child,
                None => return Read::Nothing,
            }
        }
        if node.whole {
            Read::Whole
        } else if node.children.is_empty() {
            Read::Nothing
        } else {
            Read::Part
        }
    }
}

/// Adds to `paths` the context paths `json` (a policy in Cedar's JSON format, or part of one) reads;
/// false when it uses `context` in any other way.
fn walk(json: &Value, paths: &mut BTreeSet<Vec<String>>) -> bool {
    match json {
        Value::Object(map) => {
            if is_context(json) {
                return false;
            }
            for (key, inner) in map {
                // `context.a` and `context["a"]` are {".": {"left": {"Var": "context"}, "attr": "a"}};
                // `context has a` is the same under "has", and `context has a.b` has "attr": ["a", "b"].
                if (key == "." || key == "has")
                    && let Some(mut path) = inner.get("left").and_then(context_path)
                {
                    match inner.get("attr") {
                        Some(Value::String(attr)) => path.push(attr.clone()),
                        Some(Value::Array(attrs)) if !attrs.is_empty() => {
                            for attr in attrs {
                                let Some(attr) = attr.as_str() else {
                                    return false;
                                };
                                path.push(attr.to_owned());
                            }
                        }
                        _ => return false,
                    }
                    paths.insert(path);
                    continue;
                }
                if !walk(inner, paths) {
                    return false;
                }
            }
            true
        }
        Value::Array(items) => items.iter().all(|item| walk(item, paths)),
        _ => true,
    }
}

/// The path of `json` when it is `context` or a chain of attribute accesses on it.
fn context_path(json: &Value) -> Option<Vec<String>> {
    if is_context(json) {
        return Some(Vec::new());
    }
    let access = json.get(".")?;
    let mut path = context_path(access.get("left")?)?;
    path.push(access.get("attr")?.as_str()?.to_owned());
    Some(path)
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

    fn only(paths: &[&str]) -> ContextReads {
        ContextReads::paths(&set(paths))
    }

    fn set(paths: &[&str]) -> BTreeSet<Vec<String>> {
        paths
            .iter()
            .map(|path| path.split('.').map(str::to_owned).collect())
            .collect()
    }

    /// What a read is by its definition: `Whole` when a read path is a prefix of `path` (or `path`
    /// itself), `Part` when `path` is a proper prefix of one, else `Nothing`, comparing with every path.
    fn read_by_scan(paths: &BTreeSet<Vec<String>>, path: &[&str]) -> Read {
        let mut part = false;
        for read in paths {
            let common = read.iter().zip(path).take_while(|(a, b)| a == b).count();
            if common == read.len() && common <= path.len() {
                return Read::Whole;
            }
            if common == path.len() {
                part = true;
            }
        }
        if part { Read::Part } else { Read::Nothing }
    }

    /// The tree answers as the definition does, for every path of up to three names from a small
    /// vocabulary, over read sets with nested, overlapping and prefix paths, the empty set included.
    #[test]
    fn the_tree_reads_as_the_definition_does() {
        let names = ["a", "b", "c", "ab"];
        let mut all_paths: Vec<Vec<&str>> = vec![vec![]];
        for length in 1..=3 {
            let mut longer = Vec::new();
            for path in all_paths.iter().filter(|p| p.len() == length - 1) {
                for name in names {
                    let mut next = path.clone();
                    next.push(name);
                    longer.push(next);
                }
            }
            all_paths.extend(longer);
        }
        for reads in [
            &[][..],
            &["a"],
            &["a.b"],
            &["a", "a.b"],
            &["a.b", "a.c.a", "b", "ab.c"],
            &["c.c.c", "c.a"],
        ] {
            let paths = set(reads);
            let tree = ContextReads::paths(&paths);
            for path in &all_paths {
                assert_eq!(
                    tree.read(path),
                    read_by_scan(&paths, path),
                    "{reads:?} {path:?}"
                );
            }
        }
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
                "end_user.claims.groups",
                "end_user.verified",
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
            only(&["a", "b", "c", "d.e", "f.g"])
        );
    }

    #[test]
    fn nested_reads_are_told_apart_from_the_whole_record() {
        let reads = reads(
            r#"permit (principal, action, resource) when { context.u.verified };
               forbid (principal, action, resource) when { context.u.claims has groups };
               forbid (principal, action, resource) when { context.w == 1 };"#,
        );
        assert_eq!(reads, only(&["u.verified", "u.claims.groups", "w"]));
        assert_eq!(reads.read(&["u"]), Read::Part);
        assert_eq!(reads.read(&["u", "verified"]), Read::Whole);
        assert_eq!(reads.read(&["u", "subject"]), Read::Nothing);
        assert_eq!(reads.read(&["u", "claims"]), Read::Part);
        assert_eq!(reads.read(&["u", "claims", "groups"]), Read::Whole);
        assert_eq!(reads.read(&["u", "claims", "roles"]), Read::Nothing);
        assert_eq!(reads.read(&["w"]), Read::Whole);
        assert_eq!(reads.read(&["w", "x"]), Read::Whole);
        assert_eq!(ContextReads::All.read(&["u", "subject"]), Read::Whole);
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
