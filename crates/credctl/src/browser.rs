//! The browser `credctl begin --open` starts, without the token's variables in its environment.

use std::process::Stdio;

/// The desktop's "open this URL" command (`open` on Linux is openvt, so only macOS gets it).
pub(crate) const OPENER: &str = if cfg!(target_os = "macos") {
    "open"
} else {
    "xdg-open"
};

/// Starts the default browser; false when the opener is missing or failed. The token (an admin's,
/// usually) stays here: neither the opener nor the browser it starts gets it in its environment.
pub(crate) fn open_browser(url: &str) -> bool {
    let mut opener = std::process::Command::new(OPENER);
    for variable in crate::token::VARIABLES {
        opener.env_remove(variable);
    }
    opener
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
