//! A tiny flag parser: `--name value`, `--flag`, nothing else (no dependency needed).

use std::collections::HashMap;
use std::str::FromStr;

/// Parsed `--name value` pairs and bare `--flag`s.
pub struct Args {
    values: HashMap<String, String>,
    flags: Vec<String>,
}

impl Args {
    /// Parse `args`; `switches` are the flags that take no value.
    pub fn parse(args: &[String], switches: &[&str]) -> Result<Args, String> {
        let (mut values, mut flags) = (HashMap::new(), Vec::new());
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let name = a.strip_prefix("--").ok_or_else(|| format!("unexpected argument {a:?}"))?;
            if switches.contains(&name) {
                flags.push(name.to_string());
            } else {
                let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
                values.insert(name.to_string(), v.clone());
            }
        }
        Ok(Args { values, flags })
    }

    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    pub fn str(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(|s| s.as_str())
    }

    /// A typed value, or the default when absent; a parse failure names the flag.
    pub fn get<T: FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.values.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{name}: cannot parse {v:?}")),
        }
    }

    /// Names given that are not in `known` (to report typos).
    pub fn unknown(&self, known: &[&str]) -> Vec<String> {
        self.values.keys().chain(&self.flags).filter(|k| !known.contains(&k.as_str())).cloned().collect()
    }
}
