//! The metadata service's API: `PUT`, `PATCH` and `GET /mmds` (the data,
//! at any time) and `PUT /mmds/config` (before start: which network
//! interfaces answer, V1 or V2, the address, the answer format), with
//! Firecracker's field names.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::action::{VmmActionError, VmmData};
use crate::config::SharedMmds;

/// `PUT /mmds/config` and the config file's `mmds-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// `V1` (the default) or `V2` (session tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The network interfaces (`iface_id`s) whose guest traffic to the
    /// service's address the service answers.
    pub network_interfaces: Vec<String>,
    /// A link-local address, 169.254.0.0/16 (default 169.254.169.254).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<String>,
    /// Always answer in the IMDS text format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds_compat: Option<bool>,
}

/// Checks `c` against the interfaces configured so far (`ifaces`) and
/// applies its settings to `store`.
pub fn configure(
    store: &SharedMmds,
    c: &MmdsConfig,
    ifaces: &[String],
) -> Result<(), VmmActionError> {
    let bad = |m: String| Err(VmmActionError::Mmds(m));
    let version = match c.version.as_deref() {
        None | Some("V1") => mmds::Version::V1,
        Some("V2") => mmds::Version::V2,
        Some(v) => return bad(format!("unknown MMDS version '{v}' (V1 or V2)")),
    };
    if c.network_interfaces.is_empty() {
        return bad("network_interfaces must name at least one interface".into());
    }
    if let Some(i) = c.network_interfaces.iter().find(|i| !ifaces.contains(i)) {
        return bad(format!(
            "the MMDS cannot be attached to network interface '{i}': it does not exist"
        ));
    }
    let ipv4 = match &c.ipv4_address {
        None => mmds::DEFAULT_IPV4,
        Some(a) => match a.parse::<Ipv4Addr>() {
            // Link-local, not the first or last /24 (RFC 3927 reserves them).
            Ok(ip) if ip.octets()[..2] == [169, 254] && (1..=254).contains(&ip.octets()[2]) => ip,
            _ => return bad(format!("invalid MMDS ipv4_address '{a}': expected a link-local address 169.254.1.0 to 169.254.254.255")),
        },
    };
    let mut m = store
        .0
        .lock()
        .map_err(|_| VmmActionError::Mmds("the MMDS store is unavailable".into()))?;
    m.version = version;
    m.ipv4 = ipv4;
    m.imds_compat = c.imds_compat.unwrap_or(false);
    Ok(())
}

/// `PUT /mmds`.
pub fn put(store: &SharedMmds, data: Value) -> Result<VmmData, VmmActionError> {
    lock(store)?
        .put(data)
        .map_err(|e| VmmActionError::Mmds(e.to_string()))?;
    Ok(VmmData::Empty)
}

/// `PATCH /mmds`.
pub fn patch(store: &SharedMmds, data: &Value) -> Result<VmmData, VmmActionError> {
    lock(store)?
        .patch(data)
        .map_err(|e| VmmActionError::Mmds(e.to_string()))?;
    Ok(VmmData::Empty)
}

/// `--mmds-size-limit`.
pub fn set_size_limit(store: &SharedMmds, limit: usize) -> Result<VmmData, VmmActionError> {
    lock(store)?.size_limit = limit;
    Ok(VmmData::Empty)
}

/// `GET /mmds`.
pub fn get(store: &SharedMmds) -> Result<VmmData, VmmActionError> {
    Ok(VmmData::Mmds(lock(store)?.data()))
}

fn lock(store: &SharedMmds) -> Result<std::sync::MutexGuard<'_, mmds::Mmds>, VmmActionError> {
    store
        .0
        .lock()
        .map_err(|_| VmmActionError::Mmds("the MMDS store is unavailable".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_is_checked_and_applied() {
        let store = SharedMmds::default();
        let ifaces = vec!["eth0".to_string()];
        let c = |v: Value| serde_json::from_value::<MmdsConfig>(v).unwrap();
        for (bad, why) in [
            (json!({"network_interfaces": []}), "at least one"),
            (json!({"network_interfaces": ["eth9"]}), "'eth9'"),
            (
                json!({"network_interfaces": ["eth0"], "version": "V3"}),
                "V3",
            ),
            (
                json!({"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}),
                "link-local",
            ),
            (
                json!({"network_interfaces": ["eth0"], "ipv4_address": "169.254.0.9"}),
                "link-local",
            ),
            (
                json!({"network_interfaces": ["eth0"], "ipv4_address": "x"}),
                "link-local",
            ),
        ] {
            let e = configure(&store, &c(bad.clone()), &ifaces)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(serde_json::from_value::<MmdsConfig>(
            json!({"network_interfaces": ["eth0"], "x": 1})
        )
        .is_err());
        configure(
            &store,
            &c(json!({"network_interfaces": ["eth0"], "version": "V2", "ipv4_address": "169.254.170.2", "imds_compat": true})),
            &ifaces,
        )
        .unwrap();
        let m = store.0.lock().unwrap();
        assert_eq!(
            (m.version, m.ipv4.to_string(), m.imds_compat),
            (mmds::Version::V2, "169.254.170.2".into(), true)
        );
    }

    #[test]
    fn data_is_put_patched_and_read() {
        let store = SharedMmds::default();
        assert!(patch(&store, &json!({"a": 1})).is_err());
        put(&store, json!({"a": {"b": 1}})).unwrap();
        patch(&store, &json!({"a": {"c": 2}})).unwrap();
        assert!(matches!(get(&store), Ok(VmmData::Mmds(v)) if v == json!({"a": {"b": 1, "c": 2}})));
        let huge = json!({"k": "x".repeat(mmds::DEFAULT_SIZE_LIMIT)});
        assert!(put(&store, huge)
            .unwrap_err()
            .to_string()
            .contains("over its limit"));
    }
}
