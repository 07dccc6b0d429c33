//! The Redis key schema. Every key Fleet reads or writes is built here and nowhere else.
//!
//! All keys of one fleet share the hash tag `{<prefix>}`, so every Lua script touches keys of a
//! single hash slot and runs unchanged on Redis Cluster.

/// Builds Fleet's Redis keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// `{prefix}`, the hash-tagged root of every key.
    root: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            root: format!("{{{prefix}}}"),
        }
    }

    /// Hash recording the key-schema version this fleet's data is written in.
    pub fn schema(&self) -> String {
        format!("{}:schema", self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let keys = Keys::new("fleet");
        assert_eq!(keys.schema(), "{fleet}:schema");
    }
}
