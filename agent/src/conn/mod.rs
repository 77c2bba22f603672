//! Watched connections: the socket table (which service and role, how each ends) and the writes sent after the peer closed.

pub mod dead_writes;
pub mod tracking;
