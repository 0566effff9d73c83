//! migration-crypto
