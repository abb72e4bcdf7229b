//! Reads commands out of the shipped systemd units, so tests run exactly what
//! systemd would run.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub const UNIT_BINARY: &str = "/usr/local/bin/llm-edge";
pub const UNIT_CONFIG: &str = "/etc/llm-edge/llm-edge.yaml";

/// The unit's text with `\`-continued lines joined.
pub fn read_unit(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.replace("\\\n", " ")
}

/// Every `key=` line of the unit (e.g. all `ExecReload=` lines, in order), split into words.
pub fn commands(unit: &str, key: &str) -> Vec<Vec<String>> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .map(|cmd| cmd.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// Runs unit commands in order, like systemd: the first failure stops the
/// sequence. `substitute` maps each word (binary path, config path, $MAINPID).
/// Returns the index of the failed command, if any.
pub fn run_sequence(
    cmds: &[Vec<String>],
    substitute: impl Fn(&str) -> String,
) -> Result<(), (usize, String)> {
    for (i, cmd) in cmds.iter().enumerate() {
        let words: Vec<String> = cmd.iter().map(|w| substitute(w)).collect();
        let out = Command::new(&words[0])
            .args(&words[1..])
            .output()
            .unwrap_or_else(|e| panic!("{words:?}: {e}"));
        if !out.status.success() {
            return Err((
                i,
                format!(
                    "{words:?} failed ({}): {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ));
        }
    }
    Ok(())
}
