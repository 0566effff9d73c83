//! udp-shim-client
