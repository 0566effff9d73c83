//! control-protocol
