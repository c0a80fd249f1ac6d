//! The microVM metadata service (MMDS): data a user gives a VM through
//! capsule's API, answered over HTTP to the guest at a link-local address
//! (169.254.169.254 by default), as Firecracker's MMDS and EC2's IMDS do.
//!
//! - [`store`]: the data (JSON; `PUT` replaces, `PATCH` merges), the
//!   settings (V1 or V2, address, answer format) and V2 session tokens;
//! - [`http`]: the subset of HTTP the guest speaks, parsed defensively,
//!   and the answers;
//! - [`stack`]: which guest frames are for the service, and the TCP/IP
//!   endpoint (smoltcp's) that answers them; a network device hands it
//!   those frames instead of sending them to its backend.

pub mod http;
pub mod stack;
pub mod store;

pub use stack::{is_for, Responder};
pub use store::{Mmds, Version, DEFAULT_IPV4, DEFAULT_SIZE_LIMIT};
