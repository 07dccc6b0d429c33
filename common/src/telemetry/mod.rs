//! Logging set up in one place for every Fleet binary.

use std::cell::RefCell;
use std::io::{self, IsTerminal, Write};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::settings::{LogFormat, LogSettings};

pub mod metrics;
mod span_fields;
pub use span_fields::JsonSpanFields;

/// Installs the global `tracing` subscriber: human-readable on a terminal, JSON otherwise or when
/// `log.format = "json"`. `RUST_LOG`, when set, takes precedence over `log.level`.
///
/// Logs go to stderr so that stdout stays clean for command output.
pub fn init(settings: &LogSettings) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directive) if !directive.is_empty() => EnvFilter::try_new(directive)?,
        _ => EnvFilter::try_new(&settings.level)?,
    };
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| HoldingWriter(io::stderr))
        .with_span_events(FmtSpan::NONE);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .fmt_fields(JsonSpanFields)
            .try_init()?;
        log_panics();
        Ok(())
    } else {
        builder.with_target(false).try_init()
    }
}

/// Panics become one log event each. The default hook writes a panic's message and backtrace
/// in many small writes that other threads' log lines can land between, cutting JSON lines in
/// two (a handler panic is caught and recorded as the attempt's error, but its report still
/// went to stderr this way).
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::capture();
        tracing::error!(panic = %info, backtrace = %backtrace, "A thread panicked.");
    }));
}

thread_local! {
    /// Log lines this thread writes inside [`batched`], not yet written.
    static HELD: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Most bytes written at once when [`batched`] lets its lines out: what a pipe takes in one
/// piece (`PIPE_BUF`), so a log collector reading the pipe never gets a line cut by another
/// writer's.
const WRITE_LIMIT: usize = 4096;

/// Runs `f`, holding the log lines this thread writes meanwhile, and writes them before
/// returning in as few system calls as fit: a worker logs a whole batch of handler starts
/// this way, which took a tenth of its CPU at one `write(2)` per line. The lines are out when
/// `batched` returns (also if `f` panics), so work started after it cannot run without its
/// line, even if the process is killed.
pub fn batched<R>(f: impl FnOnce() -> R) -> R {
    batched_to(io::stderr, f)
}

/// [`batched`] with the held lines written to `sink()`.
fn batched_to<W: Write, R>(sink: impl Fn() -> W, f: impl FnOnce() -> R) -> R {
    /// Writes the held lines out when dropped, so a panic in `f` loses none.
    struct Release<S: Fn() -> W, W: Write>(S);
    impl<S: Fn() -> W, W: Write> Drop for Release<S, W> {
        fn drop(&mut self) {
            let Some(held) = HELD.with_borrow_mut(Option::take) else {
                return;
            };
            let mut out = (self.0)();
            for piece in pieces(&held, WRITE_LIMIT) {
                // Logging has nowhere to report its own failure.
                let _ = out.write_all(piece);
            }
        }
    }
    let outermost = HELD.with_borrow_mut(|held| {
        let outermost = held.is_none();
        held.get_or_insert_with(Vec::new);
        outermost
    });
    if !outermost {
        return f(); // the outermost call writes the lines
    }
    let _release = Release(sink);
    f()
}

/// `bytes` cut after line ends into pieces of at most `limit` bytes; a longer line is a piece
/// of its own.
fn pieces(bytes: &[u8], limit: usize) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let window = &rest[..rest.len().min(limit)];
        let end = match window.iter().rposition(|b| *b == b'\n') {
            Some(last) if rest.len() > limit => last + 1,
            _ if rest.len() <= limit => rest.len(),
            // One line longer than the limit: up to its end.
            _ => rest
                .iter()
                .position(|b| *b == b'\n')
                .map_or(rest.len(), |i| i + 1),
        };
        let (piece, after) = rest.split_at(end);
        rest = after;
        Some(piece)
    })
}

/// The log writer: writes to the writer it wraps, except inside [`batched`] on the same thread,
/// where it holds the lines.
struct HoldingWriter<F>(F);

impl<F: Fn() -> W, W: Write> Write for HoldingWriter<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let held = HELD.with_borrow_mut(|held| match held {
            Some(lines) => {
                lines.extend_from_slice(buf);
                true
            }
            None => false,
        });
        if held {
            Ok(())
        } else {
            (self.0)().write_all(buf)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        (self.0)().flush()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A sink that records each `write_all` separately.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line(i: usize) -> String {
        format!(
            "{{\"message\":\"Handler started.\",\"task_id\":\"t{i:04}\",\"pad\":\"{}\"}}\n",
            "x".repeat(i % 200)
        )
    }

    #[test]
    fn lines_inside_batched_are_held_and_written_in_pieces_of_whole_lines() {
        let calls = Calls::default();
        let sink = calls.clone();
        let mut writer = HoldingWriter(move || sink.clone());
        let lines: Vec<String> = (0..300).map(line).collect();
        batched_to(
            || calls.clone(),
            || {
                for l in &lines {
                    writer.write_all(l.as_bytes()).unwrap();
                }
                assert!(
                    calls.0.lock().unwrap().is_empty(),
                    "nothing written before the end"
                );
            },
        );
        let written = calls.0.lock().unwrap().clone();
        let all: Vec<u8> = written.concat();
        assert_eq!(all, lines.concat().into_bytes(), "every line, in order");
        assert!(
            written.len() < lines.len() / 10,
            "{} writes for {} lines",
            written.len(),
            lines.len()
        );
        for piece in &written {
            assert!(piece.len() <= WRITE_LIMIT);
            assert_eq!(piece.last(), Some(&b'\n'), "pieces end at a line's end");
        }
    }

    #[test]
    fn lines_outside_batched_and_after_a_panic_are_not_held() {
        let calls = Calls::default();
        let sink = calls.clone();
        let mut writer = HoldingWriter(move || sink.clone());
        writer.write_all(b"one\n").unwrap();
        assert_eq!(calls.0.lock().unwrap().len(), 1, "written at once");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            batched_to(
                || calls.clone(),
                || {
                    writer.write_all(b"two\n").unwrap();
                    batched_to(|| calls.clone(), || writer.write_all(b"three\n").unwrap());
                    panic!("handler bug");
                },
            )
        }));
        assert!(panicked.is_err());
        assert_eq!(
            calls.0.lock().unwrap().concat(),
            b"one\ntwo\nthree\n",
            "held lines survive the panic"
        );
        writer.write_all(b"four\n").unwrap();
        assert_eq!(
            calls.0.lock().unwrap().last().unwrap(),
            b"four\n",
            "not held after"
        );
    }

    #[test]
    fn a_line_longer_than_the_limit_is_a_piece_of_its_own() {
        let long = format!("{}\n", "y".repeat(10));
        let text = format!("a\nb\n{long}c\n");
        let got: Vec<&[u8]> = pieces(text.as_bytes(), 6).collect();
        assert_eq!(got, vec![&b"a\nb\n"[..], long.as_bytes(), b"c\n"]);
        assert_eq!(
            pieces(b"no end", 3).collect::<Vec<_>>(),
            vec![&b"no end"[..]]
        );
    }
}
