//! QMP client (in progress).
