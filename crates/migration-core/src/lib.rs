//! migration-core
