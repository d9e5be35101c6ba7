//! The arena comes from 2 MiB hugepages when the machine has them reserved, and says so in `stats`;
//! without them it falls back (transparent huge pages, else 4 KiB pages), also said in `stats`.
//!
//! Reserving hugepages needs root (CI runs as root). Elsewhere the hugepage half is skipped with a
//! printed reason; under `CI=true` it fails instead (`dataplane::test_support`). The fallback half
//! needs a machine with no hugepages reserved, which a CI machine may not be: it only ever skips.

use std::fs;

use dataplane::test_support::runs_here;
use tandem_tests::ServerProcess;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn stat(server: &ServerProcess, name: &str) -> String {
    server.connect().stat(name)
}

/// Sets nr_hugepages and restores the old value on drop.
struct Reservation {
    old: String,
}

impl Reservation {
    fn new(pages: usize) -> Result<Reservation, String> {
        let old = fs::read_to_string(NR_HUGEPAGES).map_err(|e| format!("cannot read {NR_HUGEPAGES}: {e}"))?;
        fs::write(NR_HUGEPAGES, pages.to_string()).map_err(|e| format!("cannot write {NR_HUGEPAGES} (needs root): {e}"))?;
        let now: usize = fs::read_to_string(NR_HUGEPAGES).unwrap_or_default().trim().parse().unwrap_or(0);
        let reservation = Reservation { old };
        if now < pages {
            return Err(format!("asked for {pages} hugepages, the kernel gave {now}"));
        }
        Ok(reservation)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let _ = fs::write(NR_HUGEPAGES, self.old.trim());
    }
}

/// One test, not two: reserving hugepages changes what the fallback case would see.
#[test]
fn arena_backing_follows_what_the_machine_has() {
    falls_back_without_hugepages();
    uses_reserved_hugepages();
}

fn falls_back_without_hugepages() {
    let none = fs::read_to_string(NR_HUGEPAGES).map(|s| s.trim() == "0").unwrap_or(true);
    if !none {
        println!("SKIPPED fallback half: hugepages are already reserved on this machine");
        return;
    }
    let server = ServerProcess::tandemd(&["-t", "2", "-m", "64"]);
    let backing = stat(&server, "memory_backing");
    assert!(backing == "transparent_hugepages" || backing == "4k_pages", "{backing}");
}

fn uses_reserved_hugepages() {
    // -m 64 over 2 shards: 32 MiB each = 16 pages each; reserve a little more.
    let reservation = match Reservation::new(40) {
        Ok(r) => r,
        Err(reason) => {
            runs_here(false, "hugepage half", &reason);
            return;
        }
    };
    let server = ServerProcess::tandemd(&["-t", "2", "-m", "64"]);
    assert_eq!(stat(&server, "memory_backing"), "hugepages");
    let mut c = server.connect();
    let value = "h".repeat(100_000);
    for i in 0..100 {
        assert_eq!(c.call(&format!("set hp:{i} 0 0 {}\r\n{value}\r\n", value.len())), "STORED\r\n");
    }
    assert_eq!(c.call("get hp:7\r\n"), format!("VALUE hp:7 0 {}\r\n", value.len()));
    drop(server);
    drop(reservation);
}
