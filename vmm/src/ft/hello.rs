//! The log stream's hello, the first line a primary sends a backup:
//! `FTVM-LOG/<version> view=<N> to=<ADDR@ID>`.
//!
//! The version is that of the stream protocol (what follows the hello:
//! the backup's answer, header, state, records, acknowledgements), so that
//! a backup and a primary of different ftvm releases refuse each other in
//! words instead of taking each other's bytes for something else. A hello
//! without a version is version 1: ftvm before stream resumption (`FROM`,
//! `RESUME`: `resume.rs`).

/// The hello's first word, before the version.
pub const HELLO: &str = "FTVM-LOG";
/// The stream protocol of this release. 2: the `FROM` line after the state
/// and the `RESUME` answer.
pub const PROTOCOL: u32 = 2;

/// The hello for a stream of `view` to the backup member `to`.
pub fn hello(view: u64, to: &str) -> String {
    format!("{HELLO}/{PROTOCOL} view={view} to={to}")
}

/// Whether `line` means to be a log stream's hello (of any version).
pub fn is_hello(line: &str) -> bool {
    line.strip_prefix(HELLO).is_some_and(|r| r.starts_with('/') || r.starts_with(' '))
}

/// The view and member a hello of this protocol names, or the text of the
/// refusal (after `ERR `).
pub fn parse(line: &str) -> Result<(u64, &str), String> {
    let rest = line.strip_prefix(HELLO).ok_or_else(|| "unknown hello".to_string())?;
    let rest = match rest.strip_prefix('/') {
        Some(r) => {
            let (v, r) = r.split_once(' ').unwrap_or((r, ""));
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err("malformed hello".into());
            }
            match v.parse::<u32>() {
                Ok(PROTOCOL) => r,
                Ok(v) => return Err(mixed(v)),
                Err(_) => return Err("malformed hello".into()),
            }
        }
        None if rest.starts_with(" view=") => return Err(mixed(1)),
        None => return Err("unknown hello".into()),
    };
    let digits = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
    let parsed = rest
        .strip_prefix("view=")
        .and_then(|r| r.split_once(" to="))
        .and_then(|(v, to)| Some((v.parse::<u64>().ok().filter(|_| digits(v))?, to)));
    match parsed {
        Some((view, to)) if !to.is_empty() && !to.contains(' ') => Ok((view, to)),
        _ => Err("malformed hello".into()),
    }
}

fn mixed(theirs: u32) -> String {
    format!("log stream protocol {theirs}, this backup speaks {PROTOCOL}: primary and backup must be the same ftvm release")
}

/// A refusal's words for the primary's log, with a hint where the backup
/// did not know the hello at all (a release from before versions).
pub fn explain_refusal(line: &str) -> String {
    if line == "ERR unknown hello" || line == "ERR malformed hello" {
        format!("{line}: a backup of another ftvm release? this primary speaks log stream protocol {PROTOCOL}")
    } else {
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_release_reads_its_own_hello() {
        assert_eq!(parse(&hello(7, "127.0.0.1:7001@00ff")), Ok((7, "127.0.0.1:7001@00ff")));
        assert!(is_hello(&hello(7, "x")));
    }

    #[test]
    fn another_release_is_refused_in_words() {
        let old = parse("FTVM-LOG view=3 to=a@1").unwrap_err();
        assert!(old.starts_with("log stream protocol 1, this backup speaks 2"), "{old}");
        assert!(is_hello("FTVM-LOG view=3 to=a@1"));
        let newer = parse("FTVM-LOG/3 view=3 to=a@1 and more").unwrap_err();
        assert!(newer.starts_with("log stream protocol 3, this backup speaks 2"), "{newer}");
        assert!(newer.contains("same ftvm release"), "{newer}");
    }

    #[test]
    fn malformed_hellos_are_refused() {
        for bad in ["FTVM-LOG/2 view=1", "FTVM-LOG/2 view=x to=a", "FTVM-LOG/2 view=1 to=", "FTVM-LOG/2 view=1 to=a b", "FTVM-LOG/x view=1 to=a", "FTVM-LOG/2view=1 to=a", "FTVM-LOG/", "FTVM-LOG/+2 view=1 to=a", "FTVM-LOG/2 view=+1 to=a"] {
            assert_eq!(parse(bad), Err("malformed hello".to_string()), "{bad}");
        }
        for other in ["FTVM-LOGGER view=1 to=a", "CONSOLE from=1", ""] {
            assert!(!is_hello(other), "{other}");
        }
        // Not an older release's hello, just junk after the word.
        assert_eq!(parse("FTVM-LOG junk"), Err("unknown hello".to_string()));
    }

    #[test]
    fn an_old_backups_refusal_gets_a_hint() {
        assert!(explain_refusal("ERR unknown hello").contains("another ftvm release"));
        assert_eq!(explain_refusal("ERR stale view 1: the backup is in view 2"), "ERR stale view 1: the backup is in view 2");
    }
}
