//! katamaran's migration engine.
