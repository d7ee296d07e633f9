//! The `solo` command: parses arguments and calls the library (`solo::cli`).

use std::process::ExitCode;

/// mimalloc: the node allocates many small strings on one thread and frees them on another
/// (replay, the writer and its readers), where it is much faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    solo::cli::run(solo::cli::Cli::parse_args())
}
