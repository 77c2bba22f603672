//! The configured services as every consumer sees them: one snapshot, swapped whole on reload.
//!
//! Endpoints carry a service *id*, not a position in the config: a cached metric series or a
//! fact recorded before a reload must keep naming the service it was recorded for, even when
//! the reload reorders, adds or removes services. So an id is given to a name once and keeps it
//! for the agent's lifetime; a name dropped by a reload keeps its id (nothing is watched under
//! it any more, but what is in flight still resolves). Connections still open are another
//! matter: a reload rebinds them to the service that watches their port now
//! ([`Services::rebound`]), so a renamed service's pooled connections count under its new name.

use std::{net::SocketAddr, sync::Arc};

use arc_swap::{ArcSwap, Guard};
use foldhash::{HashMap, HashMapExt};

use crate::{
    config::{Config, Protocol, Service},
    conn::tracking::Endpoint,
    model::Role,
};

/// Distinct service names one agent may have seen across reloads. Endpoints pack the id into a
/// u16, and a name table that only grows must stay bounded; past this a reload is refused.
pub const MAX_SERVICE_IDS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServicesError {
    #[error(
        "more than {MAX_SERVICE_IDS} distinct service names since the agent started; restart it to reload this config"
    )]
    TooManyNames,
}

/// One service id: its name and what the current config says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    protocol: Protocol,
    /// In the current config. Ids of services a reload removed stay resolvable.
    configured: bool,
}

/// The configured services at one point in time.
#[derive(Debug, Clone, Default)]
pub struct Services {
    entries: Vec<Entry>,
    ports: HashMap<u16, usize>,
}

impl Services {
    /// The services of a config, with ids in config order.
    pub fn new(services: &[Service]) -> Result<Services, ServicesError> {
        Services::default().reconfigured(services)
    }

    pub fn from_config(config: &Config) -> Result<Services, ServicesError> {
        Services::new(&config.services)
    }

    /// The services after a reload: names seen before keep their ids, new names get new ones.
    pub fn reconfigured(&self, services: &[Service]) -> Result<Services, ServicesError> {
        let mut entries: Vec<Entry> = self
            .entries
            .iter()
            .map(|entry| Entry {
                configured: false,
                ..entry.clone()
            })
            .collect();
        let mut ports = HashMap::with_capacity(services.len());
        for service in services {
            let id = match entries.iter().position(|entry| entry.name == service.name) {
                Some(id) => id,
                None => {
                    if entries.len() >= MAX_SERVICE_IDS {
                        return Err(ServicesError::TooManyNames);
                    }
                    entries.push(Entry {
                        name: service.name.clone(),
                        protocol: service.protocol,
                        configured: true,
                    });
                    entries.len() - 1
                }
            };
            entries[id].protocol = service.protocol;
            entries[id].configured = true;
            for &port in &service.ports {
                ports.insert(port, id);
            }
        }
        Ok(Services { entries, ports })
    }

    /// The name of a service id (also of one a reload removed).
    pub fn name(&self, id: usize) -> Option<&str> {
        self.entries.get(id).map(|entry| entry.name.as_str())
    }

    /// Whether the service speaks the Starling/Kestrel queue dialect.
    pub fn is_queue(&self, id: usize) -> bool {
        self.entries
            .get(id)
            .is_some_and(|entry| entry.protocol == Protocol::MemcacheQueue)
    }

    /// The id of a service in the current config.
    pub fn id_of(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|entry| entry.configured && entry.name == name)
    }

    /// Whether the kernel still reports `endpoint`'s connections: its server port is watched.
    pub fn still_watches(&self, endpoint: &Endpoint) -> bool {
        self.ports.contains_key(&endpoint.server.port())
    }

    /// `endpoint` under the service that watches its server port now: after a reload that
    /// renamed its service (or moved the port to another one), a connection opened before it
    /// counts under the name new connections get. What was recorded before the reload keeps
    /// the old id, and so the old name. An unwatched port keeps its endpoint.
    pub fn rebound(&self, endpoint: Endpoint) -> Endpoint {
        match self.ports.get(&endpoint.server.port()) {
            Some(&service) => Endpoint {
                service,
                ..endpoint
            },
            None => endpoint,
        }
    }

    /// A socket belongs to a service when the service port is its local port (this host is the
    /// server) or its remote port (this host is a client). Local wins: a server is a server.
    pub fn endpoint(&self, local: SocketAddr, remote: SocketAddr) -> Option<Endpoint> {
        if let Some(&service) = self.ports.get(&local.port()) {
            return Some(Endpoint {
                service,
                server: local,
                role: Role::Server,
            });
        }
        self.ports.get(&remote.port()).map(|&service| Endpoint {
            service,
            server: remote,
            role: Role::Client,
        })
    }
}

/// The one services snapshot the pipeline, the tracker, the metrics recorder and the history
/// read; a reload swaps it for all of them at once.
#[derive(Debug, Clone)]
pub struct SharedServices(Arc<ArcSwap<Services>>);

impl SharedServices {
    pub fn new(services: Services) -> SharedServices {
        SharedServices(Arc::new(ArcSwap::from_pointee(services)))
    }

    pub fn from_config(config: &Config) -> Result<SharedServices, ServicesError> {
        Ok(SharedServices::new(Services::from_config(config)?))
    }

    /// The current snapshot; cheap enough for every event.
    pub fn load(&self) -> Guard<Arc<Services>> {
        self.0.load()
    }

    /// Services watching one port each, for tests.
    #[cfg(test)]
    pub fn watching(ports: &[(&str, u16)]) -> SharedServices {
        let services: Vec<Service> = ports
            .iter()
            .map(|&(name, port)| Service {
                name: name.to_string(),
                ports: vec![port],
                protocol: Protocol::Memcache,
                capture: true,
            })
            .collect();
        SharedServices::new(Services::new(&services).expect("few test services"))
    }

    /// Applies a reload's services for every reader. On error nothing changes.
    pub fn reconfigure(&self, services: &[Service]) -> Result<(), ServicesError> {
        let next = self.0.load().reconfigured(services)?;
        self.store(next);
        Ok(())
    }

    /// Swaps in a snapshot made with [`Services::reconfigured`] from the current one.
    pub fn store(&self, services: Services) {
        self.0.store(Arc::new(services));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, port: u16, protocol: Protocol) -> Service {
        Service {
            name: name.to_string(),
            ports: vec![port],
            protocol,
            capture: true,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_reload_that_reorders_and_adds_keeps_every_name_on_its_id() {
        let shared = SharedServices::new(
            Services::new(&[
                service("old", 11211, Protocol::Memcache),
                service("queue", 22133, Protocol::MemcacheQueue),
            ])
            .unwrap(),
        );
        let reader = shared.clone();
        let old = reader
            .load()
            .endpoint(addr(40000), addr(11211))
            .expect("old is watched");
        assert_eq!(reader.load().name(old.service), Some("old"));

        shared
            .reconfigure(&[
                service("new", 11311, Protocol::MemcacheQueue),
                service("old", 11211, Protocol::Memcache),
            ])
            .unwrap();
        let services = reader.load();
        // The endpoint recorded before the reload still names its service.
        assert_eq!(services.name(old.service), Some("old"));
        let new = services.endpoint(addr(40001), addr(11311)).unwrap();
        assert_eq!(services.name(new.service), Some("new"));
        assert!(services.is_queue(new.service));
        assert_eq!(
            services.endpoint(addr(40002), addr(11211)).unwrap().service,
            old.service
        );
        // A removed service is no longer watched, but its id still resolves.
        assert!(services.endpoint(addr(40003), addr(22133)).is_none());
        assert_eq!(services.name(1), Some("queue"));
        assert_eq!(services.id_of("queue"), None);
        assert_eq!(services.id_of("new"), Some(new.service));
    }

    #[test]
    fn a_port_change_moves_the_port_not_the_name() {
        let shared =
            SharedServices::new(Services::new(&[service("a", 1000, Protocol::Memcache)]).unwrap());
        shared
            .reconfigure(&[service("a", 2000, Protocol::MemcacheQueue)])
            .unwrap();
        let services = shared.load();
        assert!(services.endpoint(addr(40000), addr(1000)).is_none());
        let endpoint = services.endpoint(addr(40000), addr(2000)).unwrap();
        assert_eq!(endpoint.service, 0);
        assert!(services.is_queue(0), "the protocol follows the config");
    }

    #[test]
    fn local_port_wins_and_makes_a_server() {
        let services = Services::new(&[service("mc", 11211, Protocol::Memcache)]).unwrap();
        let endpoint = services.endpoint(addr(11211), addr(11211)).unwrap();
        assert_eq!(endpoint.role, Role::Server);
        assert_eq!(endpoint.server, addr(11211));
        let client = services.endpoint(addr(50000), addr(11211)).unwrap();
        assert_eq!(client.role, Role::Client);
        assert!(services.endpoint(addr(50000), addr(50001)).is_none());
    }

    #[test]
    fn the_name_table_is_bounded_and_a_refused_reload_changes_nothing() {
        let shared = SharedServices::new(Services::default());
        for batch in 0..MAX_SERVICE_IDS / 64 {
            let services: Vec<Service> = (0..64)
                .map(|i| service(&format!("s{batch}-{i}"), 1 + i as u16, Protocol::Memcache))
                .collect();
            shared.reconfigure(&services).unwrap();
        }
        let err = shared
            .reconfigure(&[service("one-too-many", 1, Protocol::Memcache)])
            .unwrap_err();
        assert_eq!(err, ServicesError::TooManyNames);
        assert!(err.to_string().contains("restart"));
        let services = shared.load();
        assert_eq!(services.id_of("one-too-many"), None);
        assert!(services
            .id_of(&format!("s{}-0", MAX_SERVICE_IDS / 64 - 1))
            .is_some());
        // Names already known are still accepted.
        drop(services);
        shared
            .reconfigure(&[service("s0-0", 1, Protocol::Memcache)])
            .unwrap();
    }
}
