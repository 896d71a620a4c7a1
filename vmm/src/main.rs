//! The `ftvm` command line.

mod cli;

fn main() {
    std::process::exit(match cli::main() {
        Ok(code) => code,
        Err(e) => {
            // `ftvm log dump | head` closes our stdout early; that is not an error.
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    std::process::exit(0);
                }
            }
            eprintln!("ftvm: error: {e:#}");
            1
        }
    });
}
