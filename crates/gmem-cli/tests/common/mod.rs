//! Helpers shared by the command's end-to-end tests.

use std::process::Command;

/// Whether KVM tests may run; panics where they must (`GMEM_REQUIRE_KVM`).
pub fn kvm() -> bool {
    match gmem::kvm::HostSupport::probe() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("GMEM_REQUIRE_KVM").is_none(),
                "skipped on a KVM host: {e}"
            );
            eprintln!("skipped: KVM unavailable: {e}");
            false
        }
    }
}

/// Runs `gmem` with `args`: (exit code, stdout, stderr).
pub fn gmem_full(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("gmem runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
