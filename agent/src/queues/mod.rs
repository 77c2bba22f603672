//! Memcache-protocol queues (Starling, Kestrel) seen as message flow rather than requests:
//! time in queue, relative depth and messages lost on closed connections.

pub mod flow;
