//! The `embedhost` binary; see [`embedhost::cli`].

fn main() -> std::process::ExitCode {
    embedhost::cli::main()
}
