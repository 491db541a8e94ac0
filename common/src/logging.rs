//! The log format flag. The subscriber itself is set up by
//! [`crate::telemetry::init`].

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for terminals.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}
