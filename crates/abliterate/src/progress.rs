//! Progress bars on stderr, only when stderr is a terminal (never in pipes, logs or tests).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` units (`bytes` formats them as sizes), hidden unless stderr is a terminal.
pub fn bar(len: u64, message: &str, bytes: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), draw_target());
    let template = if bytes {
        "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg:>10} [{bar:40}] {pos}/{len} eta {eta}"
    };
    pb.set_style(ProgressStyle::with_template(template).expect("static template is valid").progress_chars("=> "));
    pb.set_message(message.to_string());
    pb
}

fn draw_target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() }
}
