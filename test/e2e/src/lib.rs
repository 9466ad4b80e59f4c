//! Helpers for driving the two-node lab from tests.
