//! Kubernetes service links: the variables the kubelet injects into every pod for every Service of its
//! namespace (unless the pod sets `enableServiceLinks: false`). A Service named `cts` or `cts-…` gives the
//! pod `CTS_SERVICE_HOST`, `CTS_REDIS_PORT_6379_TCP_ADDR` and the like, which would read as settings this
//! service does not have, and stop it. They are recognised by name and value, left out of the
//! configuration, and named in a warning at start-up ([`service_link_variables`]).
//!
//! The shapes, from the kubelet's `pkg/kubelet/envvars` (`FromServices`, `makeLinkVariables`), for a
//! Service whose name upper-cased with `-` as `_` is `NAME`, with cluster IP `IP`:
//!
//! | variable | value |
//! |---|---|
//! | `NAME_SERVICE_HOST` | `IP` |
//! | `NAME_SERVICE_PORT`, `NAME_SERVICE_PORT_PORTNAME` | a port number |
//! | `NAME_PORT`, `NAME_PORT_N_PROTO` | `proto://IP:N` (`[IP]` for IPv6) |
//! | `NAME_PORT_N_PROTO_PROTO` | `tcp`, `udp` or `sctp` |
//! | `NAME_PORT_N_PROTO_PORT` | `N` |
//! | `NAME_PORT_N_PROTO_ADDR` | `IP` |
//!
//! A variable only counts when its value has the shape too, so `CTS_PORT=50051` (someone's guess at a
//! setting) is still refused as an unknown setting, never silently ignored. No setting of this service
//! can take one of these names (a unit test checks every setting's variable).

use std::net::{IpAddr, SocketAddr};

use super::ENV_PREFIX;

/// The `CTS_*` variables of this process's environment that are Kubernetes service links: left out of the
/// configuration. Names only (values are cluster addresses, but nothing here needs them).
pub fn service_link_variables() -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .filter(|(name, value)| name.starts_with(ENV_PREFIX) && is_service_link(name, value))
        .map(|(name, _)| name)
        .collect()
}

/// Whether `name=value` is a variable the kubelet injects for a Service whose name starts with `cts`.
pub(super) fn is_service_link(name: &str, value: &str) -> bool {
    // Every place the Service's part of the name could end: before a `_SERVICE_…` or `_PORT…` suffix.
    name.match_indices('_').any(|(at, _)| {
        let (service, suffix) = name.split_at(at);
        service.starts_with("CTS")
            && service
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            && is_link_suffix(suffix, value)
    })
}

/// Whether `suffix` (from the `_` after the Service's name) and `value` are one of the shapes above.
fn is_link_suffix(suffix: &str, value: &str) -> bool {
    if suffix == "_SERVICE_HOST" {
        return value.parse::<IpAddr>().is_ok();
    }
    if let Some(port_name) = suffix.strip_prefix("_SERVICE_PORT") {
        let named = port_name.is_empty() || port_name.strip_prefix('_').is_some_and(is_word);
        return named && is_port(value);
    }
    let Some(port) = suffix.strip_prefix("_PORT") else {
        return false;
    };
    if port.is_empty() {
        return link_url(value).is_some();
    }
    // _PORT_N_PROTO, then nothing or one of _PROTO, _PORT, _ADDR.
    let mut parts = port.strip_prefix('_').unwrap_or("").splitn(3, '_');
    let (Some(number), Some(protocol)) = (parts.next(), parts.next()) else {
        return false;
    };
    if !is_port(number) || !["TCP", "UDP", "SCTP"].contains(&protocol) {
        return false;
    }
    let protocol = protocol.to_ascii_lowercase();
    match parts.next() {
        None => link_url(value)
            .is_some_and(|(p, addr)| p == protocol && addr.port().to_string() == number),
        Some("PROTO") => value == protocol,
        Some("PORT") => value == number,
        Some("ADDR") => value.parse::<IpAddr>().is_ok(),
        Some(_) => false,
    }
}

/// `proto://IP:PORT` as the kubelet writes it: the protocol and the address.
fn link_url(value: &str) -> Option<(&str, SocketAddr)> {
    let (protocol, address) = value.split_once("://")?;
    if !["tcp", "udp", "sctp"].contains(&protocol) {
        return None;
    }
    Some((protocol, address.parse().ok()?))
}

fn is_port(text: &str) -> bool {
    !text.starts_with('0') && text.parse::<u16>().is_ok()
}

/// A port name as the kubelet spells it: upper-case letters, digits, `_`.
fn is_word(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}
