//! `control agent`: one per host. It runs the host's services (each in a slot: a network
//! namespace behind a host port), moves them to other hosts' agents over mutual-TLS QUIC with
//! migration tokens and sealed image streams, receives theirs, and answers the command line
//! of its host over a unix socket. See ARCHITECTURE.md ("The agent").

pub(crate) mod cli;
pub(crate) mod config;
pub(crate) mod daemon;
pub(crate) mod gate;
pub(crate) mod inbound;
pub(crate) mod local;
pub(crate) mod outbound;
pub(crate) mod page_relay;
pub(crate) mod recovery;
pub(crate) mod service;
pub(crate) mod tls;
