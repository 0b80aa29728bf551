//! The `embedhost` binary; see [`embedhost::cli`].

/// The system allocator; in a native child (`embedhost child`) a refused
/// allocation at the memory ceiling ends the child with a code the host
/// recognises (see [`embedhost::native::ceiling`]).
#[global_allocator]
static ALLOCATOR: embedhost::native::ceiling::CeilingAllocator =
    embedhost::native::ceiling::CeilingAllocator;

fn main() -> std::process::ExitCode {
    embedhost::memory::tune();
    embedhost::cli::main()
}
