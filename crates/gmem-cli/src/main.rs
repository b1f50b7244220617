//! The `gmem` command.

fn main() {}
