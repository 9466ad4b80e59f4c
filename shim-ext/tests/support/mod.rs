//! Helpers shared by the integration tests: a scripted fake QMP server and a QEMU launcher.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod fake_qmp;
pub mod qemu;
