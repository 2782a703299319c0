//! Everything every crate logs, kept in memory: the log suites search it for secrets and count
//! audit events in it. A process has one global subscriber, hence these suites' own binaries.

use std::sync::{Arc, Mutex, OnceLock};

/// Everything every crate logs at or above the installed level.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// The test binary's global subscriber, capturing `level` and above: installed by the first
    /// test that asks, shared by the rest (a process has one, so a binary uses one level).
    pub fn install(level: tracing::Level) -> &'static Self {
        static CAPTURE: OnceLock<LogCapture> = OnceLock::new();
        CAPTURE.get_or_init(|| {
            let capture = Self::default();
            tracing_subscriber::fmt()
                .with_max_level(level)
                .with_writer(capture.clone())
                .with_ansi(false)
                .init();
            capture
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
