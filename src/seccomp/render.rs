//! The allow-lists as Markdown, for `docs/security.md` (`capsule
//! seccomp` prints it; a test checks the document carries exactly this).

use std::fmt::Write;

use super::filters::{self, Only};
use super::ThreadKind;

/// The line before the generated lists in `docs/security.md`.
pub const BEGIN: &str = "<!-- seccomp-filters: begin (capsule seccomp) -->";
/// The line after them.
pub const END: &str = "<!-- seccomp-filters: end -->";

/// `doc` with the text between [`BEGIN`] and [`END`] replaced by
/// [`markdown`]; `None` if the markers are missing.
pub fn update_doc(doc: &str) -> Option<String> {
    let start = doc.find(BEGIN)? + BEGIN.len();
    let stop = doc[start..].find(END)? + start;
    Some(format!(
        "{}\n\n{}\n\n{}",
        &doc[..start],
        markdown().trim(),
        &doc[stop..]
    ))
}

/// The text between the markers in `docs/security.md`.
pub fn markdown() -> String {
    let mut out = String::new();
    for kind in ThreadKind::ALL {
        let list = filters::allowed(kind);
        let _ = writeln!(
            out,
            "#### `{}` ({} calls)\n\n| Call | Arguments | Why |\n| --- | --- | --- |",
            kind.name(),
            list.len()
        );
        for a in &list {
            let args = match &a.only {
                Only::Any => "any".to_string(),
                Only::OneOf { arg, values } => {
                    let names: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
                    format!("arg {arg} one of: {}", names.join(", "))
                }
                Only::Without { arg, flag, .. } => format!("arg {arg} without {flag}"),
            };
            let _ = writeln!(out, "| `{}` | {args} | {} |", a.name, a.why);
        }
        out.push('\n');
    }
    out
}
