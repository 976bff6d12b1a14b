//! Choosing loopback TCP ports: the user's when given (it must be free; 0 means any free
//! port), else a preferred well-known one when free, else any free one.
//!
//! HAProxy binds with `SO_REUSEPORT`, so two stacks started at the same moment could both
//! get a port that was free when they looked; [`PortPicker::still_free`] checks again just
//! before HAProxy starts.

use std::net::TcpListener;

/// A port that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error(
    "{flag} {port}: the port is in use on 127.0.0.1; choose another or leave {flag} out to get a free one"
)]
pub struct PortInUse {
    /// The flag that asked for it.
    pub flag: &'static str,
    /// The port.
    pub port: u16,
}

/// Whether `port` can be bound on 127.0.0.1 now.
pub fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port the kernel says is free now, different from every port in `taken`.
pub fn any_free(taken: &[u16]) -> u16 {
    loop {
        let port = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        if port != 0 && !taken.contains(&port) {
            return port;
        }
    }
}

/// Picks ports for a stack, remembering those already handed out.
#[derive(Debug, Default)]
pub struct PortPicker {
    taken: Vec<u16>,
}

impl PortPicker {
    /// `given` (checked free; `Some(0)`: any free port), else `preferred` if free, else any
    /// free port.
    pub fn pick(
        &mut self,
        flag: &'static str,
        given: Option<u16>,
        preferred: Option<u16>,
    ) -> Result<u16, PortInUse> {
        let port = match given {
            Some(port) if port != 0 => {
                if self.taken.contains(&port) || !is_free(port) {
                    return Err(PortInUse { flag, port });
                }
                port
            }
            Some(_) => any_free(&self.taken),
            None => preferred
                .filter(|p| !self.taken.contains(p) && is_free(*p))
                .unwrap_or_else(|| any_free(&self.taken)),
        };
        self.taken.push(port);
        Ok(port)
    }

    /// `port` if nothing took it since it was picked; else, when the user did not ask for
    /// it (`given` is `None` or 0), another free port.
    pub fn still_free(
        &mut self,
        flag: &'static str,
        port: u16,
        given: Option<u16>,
    ) -> Result<u16, PortInUse> {
        if is_free(port) {
            return Ok(port);
        }
        match given {
            Some(given) if given != 0 => Err(PortInUse { flag, port }),
            _ => {
                let other = any_free(&self.taken);
                self.taken.push(other);
                Ok(other)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_port_is_refused_naming_the_flag() {
        let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = busy.local_addr().expect("addr").port();
        let mut picker = PortPicker::default();
        let err = picker.pick("--port", Some(port), None).expect_err("busy");
        assert!(
            err.to_string().starts_with(&format!("--port {port}")),
            "{err}"
        );
        // A busy preferred port is replaced by a free one.
        let other = picker.pick("--port", None, Some(port)).expect("free");
        assert_ne!(other, port);
        // Ports are never handed out twice.
        let third = picker
            .pick("--stats-port", None, Some(other))
            .expect("free");
        assert_ne!(third, other);
    }
}
