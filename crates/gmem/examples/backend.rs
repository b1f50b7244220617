//! A backend process: another process that serves a VMM's guest memory
//! through gmem, held to the VMM's rules (`gmem::remote`).
//!
//! This one binary is both. As the VMM it makes the guest memory, starts
//! itself as the backend, attaches it, and drives it line by line on its
//! standard input. The backend attaches to the VMM's file, builds a
//! vm-memory view of its replica (the same `GuestMemoryGmem` a device in
//! the VMM would use), and serves "read" (a device reading a buffer) and
//! "hold" / "release" (a request that keeps its buffer pinned).
//!
//! The VMM shows: the backend reads a shared buffer; once the VMM converts
//! it private the backend's read is refused (a raw access would fault);
//! while the backend holds the buffer, the VMM's conversion fails with
//! `EAGAIN` at the buffer's offset, and succeeds once released.
//!
//! Run: `cargo run -p gmem --example backend --features vm-memory`.

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::Arc;

use gmem::vm_memory::GuestMemoryGmem;
use gmem::{Attribute, ConversionError, Flags, GuestMemfd, Options, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

const BUFFER: u64 = PAGE_SIZE;
const MESSAGE: &[u8] = b"hello from the VMM";

fn main() -> Result<(), Box<dyn Error>> {
    match std::env::args().nth(1).as_deref() {
        Some("--backend") => backend(&std::env::args().nth(2).ok_or("no socket")?),
        _ => vmm(),
    }
}

/// The backend: attach, view the replica at guest address 0, serve.
fn backend(path: &str) -> Result<(), Box<dyn Error>> {
    let attached = GuestMemfd::attach(UnixStream::connect(path)?, Options::new())?;
    let file: Arc<GuestMemfd> = attached.file().clone();
    let size = file.size();
    let view = GuestMemoryGmem::from_regions([(GuestAddress(0), file, 0, size)])?;
    let mut held = None;
    let mut out = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let answer = match line?.as_str() {
            "read" => {
                let mut buf = vec![0; MESSAGE.len()];
                match view.read_slice(&mut buf, GuestAddress(BUFFER)) {
                    Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
                    Err(error) => format!("refused: {error}"),
                }
            }
            "hold" => {
                held = Some(view.pin_ranges([(GuestAddress(BUFFER), PAGE_SIZE as usize)])?);
                "holding".into()
            }
            "release" => {
                held = None;
                "released".into()
            }
            other => format!("unknown command {other:?}"),
        };
        writeln!(out, "{answer}")?;
    }
    drop(held);
    Ok(())
}

/// The VMM: guest memory, a backend process, and conversions it must obey.
fn vmm() -> Result<(), Box<dyn Error>> {
    let mem = GuestMemfd::new(16 * PAGE_SIZE, Flags::MMAP | Flags::INIT_SHARED)?;
    mem.mmap()?.write(BUFFER, MESSAGE)?;
    let path = std::env::temp_dir().join(format!("gmem-example-{}.sock", std::process::id()));
    let listener = UnixListener::bind(&path)?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--backend")
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let (socket, _) = listener.accept()?;
    std::fs::remove_file(&path)?;
    // The kernel knows the backend's process (it connected): its exit would
    // drop it from every conversion.
    let id = mem.add_backend(socket, None)?;
    println!("backend {} attached", id.get());
    let mut to_backend = child.stdin.take().ok_or("no stdin")?;
    let mut from_backend = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut ask = |command: &str| -> Result<String, Box<dyn Error>> {
        writeln!(to_backend, "{command}")?;
        let mut line = String::new();
        from_backend.read_line(&mut line)?;
        println!("  backend, {command}: {}", line.trim());
        Ok(line.trim().to_string())
    };

    assert_eq!(ask("read")?.as_bytes(), MESSAGE);
    mem.set_attributes(BUFFER, PAGE_SIZE, Attribute::Private)?;
    println!("VMM: the buffer is private");
    assert!(ask("read")?.starts_with("refused"));
    mem.set_attributes(BUFFER, PAGE_SIZE, Attribute::Shared)?;
    println!("VMM: the buffer is shared again");
    ask("hold")?;
    let refused = mem.set_attributes(0, 4 * PAGE_SIZE, Attribute::Private);
    println!("VMM: converting while the backend holds the buffer: {refused:?}");
    assert_eq!(
        refused,
        Err(ConversionError::Again {
            error_offset: BUFFER
        })
    );
    ask("release")?;
    mem.set_attributes(0, 4 * PAGE_SIZE, Attribute::Private)?;
    println!("VMM: released, the conversion succeeds");
    assert!(ask("read")?.starts_with("refused"));
    drop(to_backend);
    let status = child.wait()?;
    println!("backend exited: {status}");
    Ok(())
}
