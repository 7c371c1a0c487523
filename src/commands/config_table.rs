//! The table of every `TALLY_*` variable, made from the clap definitions themselves, so the
//! one in docs/OPERATIONS.md is checked against what the binary accepts.

use std::collections::BTreeMap;

use clap::CommandFactory;

use super::Cli;

struct Setting {
    flag: String,
    /// Each default with the commands that have it (most take the same one).
    defaults: Vec<(String, Vec<String>)>,
    help: String,
    commands: Vec<String>,
}

/// One row per variable: the flag, its default, what it does, which commands take it.
pub fn markdown() -> String {
    let mut settings: BTreeMap<String, Setting> = BTreeMap::new();
    // Built, so global flags are copied into every subcommand.
    let mut root = Cli::command();
    root.build();
    for command in root.get_subcommands() {
        let name = command.get_name().to_owned();
        for arg in command.get_arguments() {
            let Some(env) = arg.get_env() else { continue };
            let env = env.to_string_lossy().into_owned();
            let setting = settings.entry(env).or_insert_with(|| Setting {
                flag: arg
                    .get_long()
                    .map(|long| format!("`--{long}`"))
                    .unwrap_or_default(),
                defaults: Vec::new(),
                help: arg
                    .get_help()
                    .map(|h| h.to_string().replace('|', "\\|"))
                    .unwrap_or_default(),
                commands: Vec::new(),
            });
            let default = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(",");
            match setting.defaults.iter_mut().find(|(d, _)| *d == default) {
                Some((_, commands)) => commands.push(name.clone()),
                None => setting.defaults.push((default, vec![name.clone()])),
            }
            setting.commands.push(name.clone());
        }
    }
    let mut out =
        String::from("| variable | flag | default | services | meaning |\n|---|---|---|---|---|\n");
    for (env, setting) in settings {
        let shown = |default: &str| {
            if default.is_empty() {
                "—".to_owned()
            } else {
                format!("`{default}`")
            }
        };
        let default = match setting.defaults.as_slice() {
            [(default, _)] => shown(default),
            several => several
                .iter()
                .map(|(default, commands)| format!("{} ({})", shown(default), commands.join(", ")))
                .collect::<Vec<_>>()
                .join("; "),
        };
        out.push_str(&format!(
            "| `{env}` | {} | {default} | {} | {} |\n",
            setting.flag,
            setting.commands.join(", "),
            setting.help
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    /// docs/OPERATIONS.md holds the table between two markers; it must be what the binary
    /// accepts. Regenerate it with `cargo run -- config-table`.
    #[test]
    fn env_table_in_the_docs_is_current() {
        let docs = include_str!("../../docs/OPERATIONS.md");
        let start = "<!-- tally config-table: start -->\n";
        let end = "<!-- tally config-table: end -->";
        let from = docs
            .find(start)
            .expect("the start marker in docs/OPERATIONS.md")
            + start.len();
        let to = docs[from..].find(end).expect("the end marker") + from;
        assert_eq!(
            &docs[from..to],
            super::markdown(),
            "docs/OPERATIONS.md lists other variables than the binary takes; paste `cargo run -- config-table` between the markers"
        );
    }
}
