//! udp-shim-server
