//! Backend processes (`gmem::remote`), on real processes: this test binary
//! starts itself as the backend (`GMEM_TEST_BACKEND` names the socket to
//! connect), which attaches, maps and pins as the parent tells it on its
//! standard input, and answers on its standard output. The VMM's side runs
//! here. Malformed backends are played by a thread writing raw messages.
//!
//! It has its own `main` (libtest-mimic) so that the same binary can be the
//! backend.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use gmem::{
    Attribute, BackendFault, ConversionError, Error, Flags, GuestMemfd, Options, PAGE_SIZE,
    ProbeOutcome,
};
use libtest_mimic::{Arguments, Trial};

const P: u64 = PAGE_SIZE;
const CHILD: &str = "GMEM_TEST_BACKEND";

fn main() {
    if let Ok(path) = std::env::var(CHILD) {
        backend_process(PathBuf::from(path));
        return;
    }
    let tests = [
        trial(
            "a_backend_cannot_read_private_pages",
            backend_hides_private_pages,
        ),
        trial(
            "a_backend_pin_fails_a_conversion_with_its_page",
            backend_pin_blocks,
        ),
        trial(
            "a_stopped_backend_fails_conversions_in_time",
            stopped_backend_times_out,
        ),
        trial(
            "a_killed_backend_no_longer_counts",
            killed_backend_frees_pins,
        ),
        trial(
            "a_replica_is_converted_only_by_the_vmm",
            replica_refuses_its_own_conversions,
        ),
        trial("bad_handshakes_are_refused", bad_handshakes_are_refused),
        trial(
            "backends_from_listener_callbacks_do_not_deadlock",
            backends_from_callbacks,
        ),
        trial(
            "two_threads_convert_with_a_backend_attached",
            two_threads_with_a_backend,
        ),
        trial(
            "a_backend_pin_fails_a_punch_with_its_page",
            backend_pin_blocks_punch,
        ),
        trial(
            "bad_answers_break_only_the_backend",
            bad_answers_break_the_backend,
        ),
    ];
    libtest_mimic::run(&Arguments::from_args(), tests.into()).exit();
}

fn trial(name: &'static str, test: fn()) -> Trial {
    Trial::test(name, move || {
        std::panic::catch_unwind(test).map_err(|panic| {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            text.unwrap_or_default().into()
        })
    })
}

// ---- The backend process ----

/// The backend: attach, then obey one command a line.
fn backend_process(path: PathBuf) {
    let socket = UnixStream::connect(path).expect("connect to the VMM");
    let attached = GuestMemfd::attach(socket, Options::new()).expect("attach");
    let file = attached.file().clone();
    let map = file.mmap().expect("map the replica");
    let mut pins = Vec::new();
    let mut out = std::io::stdout();
    writeln!(out, "attached").unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let mut words = line.split_whitespace();
        let (command, offset) = (words.next().unwrap_or(""), words.next());
        let offset: u64 = offset.map_or(0, |word| word.parse().unwrap());
        let answer = match command {
            "pin" => match file.pin(offset, P) {
                Ok(pin) => {
                    pins.push(pin);
                    "ok".to_string()
                }
                Err(error) => format!("error {}", error.errno()),
            },
            "unpin" => {
                pins.clear();
                "ok".to_string()
            }
            "read" => {
                let mut byte = [0];
                match map.read(offset, &mut byte) {
                    Ok(()) => format!("ok {}", byte[0]),
                    Err(error) => format!("error {}", error.errno()),
                }
            }
            "raw" => match map.probe(offset, false) {
                Ok(ProbeOutcome::Completed) => "ok".to_string(),
                Ok(ProbeOutcome::Signal(signal)) => format!("signal {signal}"),
                Err(error) => format!("error {}", error.errno()),
            },
            "state" => format!("{:?}", file.attribute(offset).unwrap()),
            _ => "unknown".to_string(),
        };
        writeln!(out, "{answer}").unwrap();
    }
}

/// A backend process of the test, and its command pipe.
struct Backend {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Backend {
    /// Starts a backend and attaches it to `file` (over a socket it
    /// connects, so that the kernel knows its process).
    fn start(file: &GuestMemfd) -> Backend {
        let dir = std::env::temp_dir().join(format!("gmem-backends-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{:?}.sock", Instant::now()));
        let listener = UnixListener::bind(&path).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD, &path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (socket, _) = listener.accept().unwrap();
        std::fs::remove_file(&path).unwrap();
        file.add_backend(socket, None).expect("add the backend");
        let mut backend = Backend {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        };
        assert_eq!(backend.answer(), "attached");
        backend
    }

    fn answer(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.answer()
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, signal).unwrap();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shared_file(pages: u64) -> GuestMemfd {
    GuestMemfd::new(pages * P, Flags::MMAP | Flags::INIT_SHARED).unwrap()
}

// ---- Real processes ----

fn backend_hides_private_pages() {
    let file = shared_file(16);
    file.mmap().unwrap().write(5 * P, &[0x5a]).unwrap();
    file.set_attributes(3 * P, P, Attribute::Private).unwrap();
    let mut backend = Backend::start(&file);
    // The state it was given at attachment: page 3 private.
    assert_eq!(backend.ask(&format!("state {}", 3 * P)), "Private");
    assert_eq!(backend.ask(&format!("raw {}", 3 * P)), "signal 11");
    assert_eq!(backend.ask(&format!("read {}", 3 * P)), "error 14");
    assert_eq!(backend.ask(&format!("read {}", 5 * P)), "ok 90");
    // A conversion to private is hidden in the backend before it returns.
    file.set_attributes(5 * P, P, Attribute::Private).unwrap();
    assert_eq!(backend.ask(&format!("raw {}", 5 * P)), "signal 11");
    assert_eq!(backend.ask(&format!("pin {}", 5 * P)), "error 14");
    // And a conversion to shared shown.
    file.set_attributes(3 * P, P, Attribute::Shared).unwrap();
    assert_eq!(backend.ask(&format!("raw {}", 3 * P)), "ok");
    assert_eq!(backend.ask(&format!("read {}", 3 * P)), "ok 0");
}

fn backend_pin_blocks() {
    let file = shared_file(16);
    let mut backend = Backend::start(&file);
    assert_eq!(backend.ask(&format!("pin {}", 7 * P)), "ok");
    let refused = file.set_attributes(0, 16 * P, Attribute::Private);
    assert_eq!(
        refused,
        Err(ConversionError::Again {
            error_offset: 7 * P
        })
    );
    assert_eq!(refused.unwrap_err().errno(), libc::EAGAIN);
    // Nothing changed, here or in the backend.
    assert_eq!(file.attribute(0).unwrap(), Attribute::Shared);
    assert_eq!(backend.ask("raw 0"), "ok");
    assert_eq!(backend.ask(&format!("read {}", 7 * P)), "ok 0");
    // A range without the pinned page converts.
    file.set_attributes(8 * P, 8 * P, Attribute::Private)
        .unwrap();
    // Released, the page converts.
    assert_eq!(backend.ask("unpin"), "ok");
    file.set_attributes(0, 16 * P, Attribute::Private).unwrap();
    assert_eq!(backend.ask(&format!("raw {}", 7 * P)), "signal 11");
}

fn backend_pin_blocks_punch() {
    let file = shared_file(16);
    file.mmap().unwrap().write(6 * P, &[0x66]).unwrap();
    let mut backend = Backend::start(&file);
    assert_eq!(backend.ask(&format!("pin {}", 6 * P)), "ok");
    let refused = file.punch_hole(4 * P, 4 * P).unwrap_err();
    assert_eq!(refused, Error::Pinned { offset: 6 * P });
    assert_eq!(refused.errno(), libc::EBUSY);
    // Nothing was punched, and the backend goes on.
    assert_eq!(backend.ask(&format!("read {}", 6 * P)), "ok 102");
    assert_eq!(backend.ask("unpin"), "ok");
    file.punch_hole(4 * P, 4 * P).unwrap();
    assert_eq!(backend.ask(&format!("read {}", 6 * P)), "ok 0");
    assert_eq!(backend.ask(&format!("pin {}", 6 * P)), "ok");
}

fn stopped_backend_times_out() {
    let timeout = Duration::from_millis(200);
    let file = GuestMemfd::with_options(
        16 * P,
        Flags::MMAP | Flags::INIT_SHARED,
        Options::new().backend_timeout(timeout),
    )
    .unwrap();
    let map = file.mmap().unwrap();
    let backend = Backend::start(&file);
    backend.signal(rustix::process::Signal::STOP);
    let start = Instant::now();
    let failed = file
        .set_attributes(2 * P, P, Attribute::Private)
        .unwrap_err();
    let waited = start.elapsed();
    assert!(
        matches!(
            failed,
            ConversionError::Backend {
                fault: BackendFault::Unanswered,
                ..
            }
        ),
        "{failed:?}"
    );
    assert_eq!(failed.errno(), libc::ETIMEDOUT);
    assert!(
        waited >= timeout && waited < timeout * 5,
        "waited {waited:?}"
    );
    // Nothing changed.
    assert_eq!(file.attribute(2 * P).unwrap(), Attribute::Shared);
    map.read(2 * P, &mut [0]).unwrap();
    // It is broken until it exits: conversions to private fail at once,
    // conversions to shared go on.
    let again = file
        .set_attributes(4 * P, P, Attribute::Private)
        .unwrap_err();
    assert_eq!(again.errno(), libc::ETIMEDOUT);
    let status = file.backends();
    assert_eq!(status[0].fault, Some(BackendFault::Unanswered));
    backend.signal(rustix::process::Signal::KILL);
    drop(backend);
    file.set_attributes(2 * P, P, Attribute::Private).unwrap();
    assert!(file.backends().is_empty());
}

fn killed_backend_frees_pins() {
    let file = shared_file(16);
    let mut backend = Backend::start(&file);
    assert_eq!(backend.ask(&format!("pin {}", 9 * P)), "ok");
    assert!(file.set_attributes(9 * P, P, Attribute::Private).is_err());
    backend.signal(rustix::process::Signal::KILL);
    // No wait for the exit here: the conversion sees it.
    file.set_attributes(9 * P, P, Attribute::Private).unwrap();
    assert!(file.backends().is_empty(), "{:?}", file.backends());
}

// ---- The replica's own rules, and malformed backends ----

fn replica_refuses_its_own_conversions() {
    let file = shared_file(4);
    let (vmm, backend) = UnixStream::pair().unwrap();
    let attaching = std::thread::spawn(move || GuestMemfd::attach(backend, Options::new()));
    file.add_backend(vmm, None).unwrap();
    let attached = attaching.join().unwrap().unwrap();
    let replica = attached.file();
    let refused = replica
        .set_attributes(0, P, Attribute::Private)
        .unwrap_err();
    assert_eq!(refused.errno(), libc::EPERM);
    assert_eq!(replica.punch_hole(0, P).unwrap_err().errno(), libc::EPERM);
    let (a, _b) = UnixStream::pair().unwrap();
    assert_eq!(replica.add_backend(a, None).unwrap_err(), Error::Attached);
    // The VMM converts it.
    file.set_attributes(0, P, Attribute::Private).unwrap();
    assert_eq!(replica.attribute(0).unwrap(), Attribute::Private);
    assert!(attached.requests_served() >= 1);
    drop(file);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !attached.vmm_gone() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(attached.vmm_gone(), "the replica sees the VMM go");
}

/// A raw message of the protocol (`gmem::remote`'s wire format).
fn message(kind: u32, seq: u64, a: u64, b: u64) -> [u8; 32] {
    let mut bytes = [0; 32];
    bytes[0..4].copy_from_slice(&kind.to_le_bytes());
    bytes[8..16].copy_from_slice(&seq.to_le_bytes());
    bytes[16..24].copy_from_slice(&a.to_le_bytes());
    bytes[24..32].copy_from_slice(&b.to_le_bytes());
    bytes
}

const HELLO: u32 = 1;
const READY: u32 = 4;
const DONE: u32 = 7;
const BUSY: u32 = 8;

/// A fake backend that says `hello` and then reads until the `Ready`.
fn fake_backend(hello: [u8; 32]) -> (UnixStream, std::thread::JoinHandle<UnixStream>) {
    let (vmm, mut backend) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        backend.write_all(&hello).unwrap();
        let mut bytes = [0; 32];
        while backend.read_exact(&mut bytes).is_ok() {
            if u32::from_le_bytes(bytes[0..4].try_into().unwrap()) == READY {
                backend.write_all(&message(DONE, 0, 0, 0)).unwrap();
                break;
            }
        }
        backend
    });
    (vmm, fake)
}

fn bad_handshakes_are_refused() {
    let file = shared_file(4);
    let (vmm, fake) = fake_backend(message(HELLO, 0, 2, 0));
    let refused = file.add_backend(vmm, None).unwrap_err();
    assert_eq!(refused, Error::Backend(BackendFault::Version(2)));
    drop(fake);
    let (vmm, fake) = fake_backend(message(DONE, 0, 1, 0));
    let refused = file.add_backend(vmm, None).unwrap_err();
    assert_eq!(refused.errno(), libc::EPROTO);
    drop(fake);
    let mut reserved = message(HELLO, 0, 1, 0);
    reserved[5] = 1;
    let (vmm, fake) = fake_backend(reserved);
    assert_eq!(
        file.add_backend(vmm, None).unwrap_err().errno(),
        libc::EPROTO
    );
    drop(fake);
    assert!(file.backends().is_empty());
}

/// What a fake backend sends for request `seq` of `offset`.
type Answers = fn(u64, u64) -> Vec<[u8; 32]>;

/// A fake backend answers its first request well and the second with
/// something the protocol does not allow.
fn bad_answers_break_the_backend() {
    let cases: [(&str, Answers); 4] = [
        ("an answer to a request never sent", |seq, _| {
            vec![message(DONE, seq + 5, 0, 0)]
        }),
        ("a forged page", |seq, _| {
            vec![message(BUSY, seq, 1 << 40, 0)]
        }),
        ("a flood", |seq, _| {
            (0..100).map(|_| message(DONE, seq - 1, 0, 0)).collect()
        }),
        ("an unknown kind", |seq, _| vec![message(77, seq, 0, 0)]),
    ];
    for (case, answer) in cases {
        let file = shared_file(8);
        let (vmm, fake) = fake_backend(message(HELLO, 0, 1, 0));
        file.add_backend(vmm, None).unwrap();
        let mut backend = fake.join().unwrap();
        let answering = std::thread::spawn(move || {
            let mut request = [0; 32];
            while backend.read_exact(&mut request).is_ok() {
                let seq = u64::from_le_bytes(request[8..16].try_into().unwrap());
                let offset = u64::from_le_bytes(request[16..24].try_into().unwrap());
                let answers = match seq {
                    1 => vec![message(DONE, 1, 0, 0)],
                    _ => answer(seq, offset),
                };
                for bytes in answers {
                    if backend.write_all(&bytes).is_err() {
                        return;
                    }
                }
            }
        });
        file.set_attributes(0, P, Attribute::Private).unwrap();
        let failed = file.set_attributes(P, P, Attribute::Private).unwrap_err();
        assert_eq!(failed.errno(), libc::EPROTO, "{case}: {failed:?}");
        assert_eq!(file.attribute(P).unwrap(), Attribute::Shared, "{case}");
        file.mmap().unwrap().read(P, &mut [0]).unwrap();
        // Broken until detached; then conversions go on.
        let id = file.backends()[0].id;
        assert!(
            file.set_attributes(P, P, Attribute::Private).is_err(),
            "{case}"
        );
        assert!(file.detach_backend(id));
        file.set_attributes(P, P, Attribute::Private).unwrap();
        drop(file);
        answering.join().unwrap();
    }
}

/// Adding or detaching a backend from a listener's callback of the same
/// file would wait for the conversion's own lock: refused, nothing changes.
fn backends_from_callbacks() {
    use std::sync::{Arc, Mutex};
    struct Adding(Mutex<Option<(Error, bool)>>, Arc<GuestMemfd>);
    impl gmem::ConversionListener for Adding {
        fn commit(&self, _: u64, _: u64, _: Attribute) -> Result<(), gmem::Refusal> {
            let (a, _b) = UnixStream::pair().unwrap();
            let added = self.1.add_backend(a, None).unwrap_err();
            let id = self.1.backends()[0].id;
            *self.0.lock().unwrap() = Some((added, self.1.detach_backend(id)));
            Ok(())
        }
    }
    let file = Arc::new(shared_file(4));
    let (vmm, backend) = UnixStream::pair().unwrap();
    let attaching = std::thread::spawn(move || GuestMemfd::attach(backend, Options::new()));
    file.add_backend(vmm, None).unwrap();
    let attached = attaching.join().unwrap().unwrap();
    let listener = Arc::new(Adding(Mutex::new(None), file.clone()));
    file.add_listener(listener.clone());
    file.set_attributes(0, P, Attribute::Private).unwrap();
    let (added, detached) = listener.0.lock().unwrap().take().unwrap();
    assert_eq!(added, Error::WouldDeadlock);
    assert!(!detached);
    assert_eq!(file.backends().len(), 1);
    assert_eq!(attached.file().attribute(0).unwrap(), Attribute::Private);
}

/// Two threads converting the same file with a backend process attached:
/// each conversion is answered, and the replica ends in the VMM's state.
fn two_threads_with_a_backend() {
    let file = shared_file(64);
    let mut backend = Backend::start(&file);
    std::thread::scope(|scope| {
        for thread in 0..2u64 {
            let file = &file;
            scope.spawn(move || {
                for round in 0..2_000u64 {
                    let page = thread * 32 + round % 32;
                    let to = if round % 2 == 0 {
                        Attribute::Private
                    } else {
                        Attribute::Shared
                    };
                    file.set_attributes(page * P, P, to).unwrap();
                }
            });
        }
    });
    for page in [0, 17, 32, 63] {
        let want = format!("{:?}", file.attribute(page * P).unwrap());
        assert_eq!(backend.ask(&format!("state {}", page * P)), want);
    }
    assert!(file.backends()[0].fault.is_none());
}
