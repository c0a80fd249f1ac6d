//! The metadata a user gives a VM (`PUT` / `PATCH /mmds`), its settings
//! (`PUT /mmds/config`) and the session tokens its guest asks for.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The address the guest reaches the service at, unless configured.
pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The largest data store, in bytes of its JSON text, unless configured
/// (`--mmds-size-limit`).
pub const DEFAULT_SIZE_LIMIT: usize = 51_200;
/// The longest a session token may live.
pub const MAX_TOKEN_TTL: u64 = 21_600;
/// Tokens kept at once; the oldest goes first when a guest asks for more.
const MAX_TOKENS: usize = 1024;

/// Errors changing the store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The data would be larger than the limit.
    #[error("the MMDS data store would be {size} bytes, over its limit of {limit}")]
    TooLarge {
        /// The data's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// `PATCH` before any `PUT`.
    #[error("the MMDS data store is empty: PUT /mmds before PATCH")]
    NotInitialized,
    /// Data or a patch that is not a JSON object.
    #[error("the MMDS data must be a JSON object")]
    NotAnObject,
}

/// Which requests the guest must make: V1 answers any `GET`; V2 answers
/// only a `GET` with a session token from `PUT /latest/api/token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Version {
    /// No token needed.
    #[default]
    V1,
    /// Session tokens required.
    V2,
}

/// The metadata service's state, shared by the API thread and the
/// network device that answers the guest.
#[derive(Debug)]
pub struct Mmds {
    data: Option<Value>,
    /// The largest data, in bytes of its JSON text (checked at the next
    /// change).
    pub size_limit: usize,
    /// V1 or V2.
    pub version: Version,
    /// The guest-facing address.
    pub ipv4: Ipv4Addr,
    /// Answer every `GET` in the IMDS text format (EC2's: strings as
    /// they are, objects as key lists), even one that asks for JSON with
    /// `Accept: application/json`.
    pub imds_compat: bool,
    tokens: HashMap<String, Instant>,
}

impl Default for Mmds {
    fn default() -> Self {
        Self::new(DEFAULT_SIZE_LIMIT)
    }
}

impl Mmds {
    /// An empty store holding at most `size_limit` bytes of JSON.
    pub fn new(size_limit: usize) -> Self {
        Self {
            data: None,
            size_limit,
            version: Version::V1,
            ipv4: DEFAULT_IPV4,
            imds_compat: false,
            tokens: HashMap::new(),
        }
    }

    /// The data (an empty object before the first `PUT`).
    pub fn data(&self) -> Value {
        self.data
            .clone()
            .unwrap_or_else(|| Value::Object(serde_json::Map::new()))
    }

    /// Replaces the data, which must be an object.
    pub fn put(&mut self, data: Value) -> Result<(), Error> {
        if !data.is_object() {
            return Err(Error::NotAnObject);
        }
        self.check_size(&data)?;
        self.data = Some(data);
        Ok(())
    }

    /// Merges `patch` into the data as RFC 7396 says (objects merge key by
    /// key, `null` removes a key, anything else replaces).
    pub fn patch(&mut self, patch: &Value) -> Result<(), Error> {
        if !patch.is_object() {
            return Err(Error::NotAnObject);
        }
        let mut data = self.data.clone().ok_or(Error::NotInitialized)?;
        merge(&mut data, patch);
        self.check_size(&data)?;
        self.data = Some(data);
        Ok(())
    }

    fn check_size(&self, data: &Value) -> Result<(), Error> {
        let size = data.to_string().len();
        if size > self.size_limit {
            return Err(Error::TooLarge {
                size,
                limit: self.size_limit,
            });
        }
        Ok(())
    }

    /// The value at `path` (`/a/b/0`: object keys and array indices;
    /// empty segments are skipped, so `/` is the whole store).
    pub fn lookup(&self, path: &str) -> Option<&Value> {
        let mut v = self.data.as_ref()?;
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            v = match v {
                Value::Object(map) => map.get(seg)?,
                Value::Array(items) => items.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(v)
    }

    /// A new session token valid for `ttl_secs` (1 to [`MAX_TOKEN_TTL`]),
    /// or `None` if the TTL is out of range or no randomness is to be had.
    pub fn new_token(&mut self, ttl_secs: u64) -> Option<String> {
        if !(1..=MAX_TOKEN_TTL).contains(&ttl_secs) {
            return None;
        }
        let now = Instant::now();
        self.tokens.retain(|_, expiry| *expiry > now);
        if self.tokens.len() >= MAX_TOKENS {
            let oldest = self
                .tokens
                .iter()
                .min_by_key(|(_, expiry)| **expiry)
                .map(|(t, _)| t.clone())?;
            self.tokens.remove(&oldest);
        }
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).ok()?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.tokens
            .insert(token.clone(), now + Duration::from_secs(ttl_secs));
        Some(token)
    }

    /// Whether `token` was issued and has not expired.
    pub fn token_valid(&self, token: &str) -> bool {
        self.tokens
            .get(token)
            .is_some_and(|expiry| *expiry > Instant::now())
    }
}

/// RFC 7396 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(map) = target {
        for (k, v) in patch_map {
            if v.is_null() {
                map.remove(k);
            } else {
                merge(map.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn put_patch_and_lookup() {
        let mut m = Mmds::default();
        assert_eq!(m.patch(&json!({"a": 1})), Err(Error::NotInitialized));
        assert_eq!(m.data(), json!({}));
        assert_eq!(m.put(json!(false)), Err(Error::NotAnObject));
        assert_eq!(m.put(json!([1])), Err(Error::NotAnObject));
        m.put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "tags": ["x", "y"]}}}))
            .unwrap();
        m.patch(&json!({"latest": {"meta-data": {"hostname": "h", "ami-id": null}}}))
            .unwrap();
        assert_eq!(m.lookup("/latest/meta-data/hostname"), Some(&json!("h")));
        assert_eq!(m.lookup("/latest/meta-data/ami-id"), None);
        assert_eq!(m.lookup("latest//meta-data/tags/1"), Some(&json!("y")));
        assert_eq!(m.lookup("/latest/meta-data/tags/9"), None);
        assert_eq!(m.lookup("/latest/meta-data/hostname/deeper"), None);
        assert_eq!(m.lookup("/").unwrap(), &m.data());
        assert_eq!(m.patch(&json!("x")), Err(Error::NotAnObject));
    }

    #[test]
    fn the_size_limit_holds_for_put_and_patch() {
        let mut m = Mmds::new(20);
        assert!(matches!(
            m.put(json!({"k": "a string that is too long"})),
            Err(Error::TooLarge { limit: 20, .. })
        ));
        m.put(json!({"k": "v"})).unwrap();
        assert!(m.patch(&json!({"k2": "longer than twenty"})).is_err());
        assert_eq!(m.data(), json!({"k": "v"}));
    }

    #[test]
    fn tokens_expire_and_are_bounded() {
        let mut m = Mmds::default();
        assert!(m.new_token(0).is_none());
        assert!(m.new_token(MAX_TOKEN_TTL + 1).is_none());
        let t = m.new_token(60).unwrap();
        assert_eq!(t.len(), 64);
        assert!(m.token_valid(&t));
        assert!(!m.token_valid("0123"));
        for _ in 0..MAX_TOKENS + 10 {
            m.new_token(1).unwrap();
        }
        assert!(m.tokens.len() <= MAX_TOKENS);
    }
}
