//! `monitor` commands: parsed here (no KVM, unit-tested), carried out by
//! the session (`session.rs`), which alone can move the replay.

/// One `monitor` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Where the replay is: exit ordinal, instructions since it, guest time.
    When,
    /// Go to the end of exit N, plus K single steps.
    Goto { ordinal: u64, steps: u64 },
    /// Control registers, segment bases, EFER (gdb's x86-64 description
    /// has no room for them).
    Sregs,
    /// The checkpoints held for reverse execution.
    Checkpoints,
    Help,
}

pub const HELP: &str = "\
ftvm monitor commands:
  monitor when              where the replay is: exit ordinal (as `ftvm log dump` shows it, @N),
                            instructions since that exit, guest time, the log's last exit
  monitor goto N [K]        go to the end of exit N (then K instructions); back to the recorded
                            run after a diversion. Run `flushregs` after it: gdb caches registers.
  monitor sregs             control registers, EFER, segment bases
  monitor checkpoints       checkpoints held for reverse execution (interval, count, bytes)
  monitor help              this text
";

/// Parses a command (`cmd` as gdb sends it, without `monitor`).
pub fn parse(cmd: &str) -> Result<Command, String> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let num = |w: &str| -> Result<u64, String> {
        let w = w.trim_start_matches('#').trim_start_matches('@');
        let r = match w.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => w.parse(),
        };
        r.map_err(|_| format!("'{w}' is not a number"))
    };
    match words.as_slice() {
        ["when"] => Ok(Command::When),
        ["goto", n] => Ok(Command::Goto { ordinal: num(n)?, steps: 0 }),
        ["goto", n, k] => Ok(Command::Goto { ordinal: num(n)?, steps: num(k)? }),
        ["goto", ..] => Err("usage: monitor goto N [K] (N: an exit ordinal as `ftvm log dump` shows it)".into()),
        ["sregs"] => Ok(Command::Sregs),
        ["checkpoints"] => Ok(Command::Checkpoints),
        ["help"] | [] => Ok(Command::Help),
        [w, ..] => Err(format!("unknown monitor command '{w}' (monitor help lists them)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_says_what_is_wrong() {
        assert_eq!(parse("when"), Ok(Command::When));
        assert_eq!(parse(" goto 123 "), Ok(Command::Goto { ordinal: 123, steps: 0 }));
        assert_eq!(parse("goto @0x10 3"), Ok(Command::Goto { ordinal: 16, steps: 3 }));
        assert_eq!(parse("goto #42"), Ok(Command::Goto { ordinal: 42, steps: 0 }));
        assert!(parse("goto").unwrap_err().contains("usage"));
        assert!(parse("goto x").unwrap_err().contains("not a number"));
        assert!(parse("frobnicate").unwrap_err().contains("unknown monitor command 'frobnicate'"));
        assert_eq!(parse(""), Ok(Command::Help));
    }
}
