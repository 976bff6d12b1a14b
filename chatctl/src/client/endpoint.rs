//! Where a client connects by default, and as whom: the local stack's HAProxy (from its
//! state file) when `chatctl up` runs, with a token minted from its secret when it runs with
//! `--auth jwt`; otherwise `ws://127.0.0.1:8080/ws`.

use std::path::Path;
use std::time::Duration;

use chatcluster_protocol::Encoding;

use super::{ClientError, Identity, Target};
use crate::stack::secrets::Secrets;
use crate::stack::{Layout, StackInfo, lock};

/// The URL used when none is given and no local stack runs.
pub const FALLBACK_URL: &str = "ws://127.0.0.1:8080/ws";

/// How long minted tokens live.
pub const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Frame encoding, as a command-line value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Wire {
    /// JSON text frames (`chat.v1.json`).
    Json,
    /// MessagePack binary frames (`chat.v1.msgpack`).
    Msgpack,
}

impl From<Wire> for Encoding {
    fn from(wire: Wire) -> Self {
        match wire {
            Wire::Json => Encoding::Json,
            Wire::Msgpack => Encoding::MsgPack,
        }
    }
}

/// The state of the stack running in `state_dir`, if one runs.
pub fn running_stack(state_dir: &Path) -> Option<StackInfo> {
    let layout = Layout::new(state_dir);
    if !lock::is_held(&layout.lock()) {
        return None;
    }
    StackInfo::read(&layout.state_file()).ok()
}

/// `url` if given, else the running local stack's WebSocket URL, else [`FALLBACK_URL`].
pub fn target(url: Option<&str>, state_dir: &Path) -> Result<Target, ClientError> {
    match url {
        Some(url) => Target::parse(url),
        None => Target::parse(
            &running_stack(state_dir)
                .and_then(|info| info.ws_url)
                .unwrap_or_else(|| FALLBACK_URL.to_owned()),
        ),
    }
}

/// Who to connect as: `token` if given; else `user`, with a token minted for them when the
/// local stack in `state_dir` runs with `--auth jwt` and serves `target`.
pub fn identity(
    token: Option<&str>,
    user: Option<&str>,
    target: &Target,
    state_dir: &Path,
) -> Result<Identity, ClientError> {
    if let Some(token) = token {
        return Ok(Identity::Token(token.to_owned()));
    }
    let Some(user) = user else {
        return Err(ClientError::BadTarget(
            "no identity: give --user NAME (or --token JWT)".to_owned(),
        ));
    };
    if let Some(info) = running_stack(state_dir).filter(|i| i.auth == "jwt") {
        let serves = match target {
            Target::Url(url) => info.ws_url.as_deref() == Some(url.as_str()),
            Target::Unix(path) => info
                .children
                .iter()
                .any(|c| c.socket.as_deref() == Some(path.as_path())),
        };
        if serves {
            let secret = Secrets::jwt_secret(&Layout::new(state_dir).secrets()).map_err(|e| {
                ClientError::BadTarget(format!("cannot read the stack's JWT secret: {e}"))
            })?;
            let token = crate::token::mint(secret.expose(), user, TOKEN_TTL, None)
                .map_err(|e| ClientError::BadTarget(e.to_string()))?;
            return Ok(Identity::Token(token));
        }
    }
    Ok(Identity::User(user.to_owned()))
}
