//! Examples of an application made migratable with the `swrapper` (server) and `cwrapper`
//! (client) libraries; README.md's "Use it in your own app" walks through them. Each is an
//! `[[example]]` of this package (the files beside `src/`), built by
//! `cargo build --workspace --examples`, and run by `tests/examples.rs` over loopback.
//!
//! ```text
//!  own_server_config.rs  a quinn server with its own ServerConfig (TLS, ALPN, stream limits,
//!                        keep-alive, idle timeout) and address validation (Retry)
//!  client_keep_alive.rs  a quinn client with its own ClientConfig, keep-alive on
//!  in_process_move.rs    a move and an aborted move in one process: every announce ends with
//!                        resumed() or abort(); one connection, one handshake throughout
//!  h3_file_server.rs     an HTTP/3 file server (h3 + h3-quinn) that can move
//! ```
//!
//! The library itself is empty: the package exists for its examples, and its normal
//! dependencies are those of a minimal application (`cargo tree -p app-examples -e normal`).
