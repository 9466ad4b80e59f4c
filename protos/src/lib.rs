//! The `katamaran.v1.Migration` ttrpc service (placeholder until the protocol lands).
