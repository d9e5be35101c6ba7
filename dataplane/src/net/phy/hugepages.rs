//! Whether DPDK's EAL will find hugepages, asked before it starts so that a machine without them gets a
//! message that names the fix.
//!
//! DPDK 22.11's EAL, unless given `--no-huge`, needs free hugepages of some size, and a mounted
//! hugetlbfs for them unless it runs `--in-memory` (then it maps them anonymously). Without either it
//! stops with "Cannot get hugepage information" and sets `rte_errno` to `EACCES`, which reads like a
//! permission problem. `-m` only limits how much of the hugepages EAL takes; it needs them all the same.
//!
//! - [`eal_hugepage_problem`]: reads `/proc/meminfo`, `/proc/sys/vm/nr_overcommit_hugepages` and
//!   `/proc/mounts` and says what is missing, if anything, for the given EAL arguments.
//! - [`hugepage_problem`]: the same decision on the files' text (pure, for tests).
//! - [`Meminfo`]: the hugepage lines of `/proc/meminfo`.

use std::fs;

/// The hugepage counters of `/proc/meminfo`. `HugePages_*` count pages of the default size only;
/// `Hugetlb` (kernels since 5.x) is the memory in hugepages of every size, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meminfo {
    /// `HugePages_Total`: pages of the default size in the pool.
    pub total: u64,
    /// `HugePages_Free`: pages of the pool not allocated yet (reserved ones included).
    pub free: u64,
    /// `HugePages_Rsvd`: free pages promised to a mapping already.
    pub reserved: u64,
    /// `Hugepagesize`, in KiB.
    pub page_kib: u64,
    /// `Hugetlb`, in KiB, if the kernel reports it.
    pub hugetlb_kib: Option<u64>,
}

impl Meminfo {
    /// Parses `/proc/meminfo`; `None` if a `HugePages_*` or `Hugepagesize` line is missing (a kernel
    /// without hugetlb support).
    pub fn parse(text: &str) -> Option<Meminfo> {
        let field = |name: &str| {
            text.lines().find_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
        };
        Some(Meminfo {
            total: field("HugePages_Total")?,
            free: field("HugePages_Free")?,
            reserved: field("HugePages_Rsvd")?,
            page_kib: field("Hugepagesize")?,
            hugetlb_kib: field("Hugetlb"),
        })
    }

    /// Free pages of the default size that nobody reserved: what EAL may take.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// Whether hugepages of another size than the default are set up too (then EAL may use those, and
    /// these counters cannot tell).
    pub fn other_sizes(&self) -> bool {
        self.hugetlb_kib
            .is_some_and(|all| all > self.total.saturating_mul(self.page_kib))
    }
}

/// Whether `/proc/mounts` lists a hugetlbfs.
pub fn hugetlbfs_mounted(mounts: &str) -> bool {
    mounts
        .lines()
        .any(|line| line.split_whitespace().nth(2) == Some("hugetlbfs"))
}

/// What keeps EAL, started with `eal_args`, from finding hugepages on this machine, as a message that
/// names the fix; `None` if nothing does, or if this cannot tell (EAL then decides).
pub fn eal_hugepage_problem(eal_args: &[String]) -> Option<String> {
    if !wants_hugepages(eal_args) {
        return None;
    }
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let overcommit = fs::read_to_string("/proc/sys/vm/nr_overcommit_hugepages")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0);
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    hugepage_problem(eal_args, &meminfo, overcommit, &mounts)
}

/// [`eal_hugepage_problem`] on the text of `/proc/meminfo` and `/proc/mounts` and the value of
/// `nr_overcommit_hugepages` (pages the kernel may add to the pool on demand).
pub fn hugepage_problem(
    eal_args: &[String],
    meminfo: &str,
    overcommit: u64,
    mounts: &str,
) -> Option<String> {
    if !wants_hugepages(eal_args) {
        return None;
    }
    let no_huge = "or, to try DPDK without hugepages, add \"--no-huge\", \"-m\", \"128\", \"--no-shconf\" \
                   to [net.dpdk] eal_args";
    let Some(info) = Meminfo::parse(meminfo) else {
        return Some(format!(
            "DPDK needs hugepages and this kernel has none (no HugePages_ lines in /proc/meminfo): {no_huge}"
        ));
    };
    if info.available() == 0 && overcommit == 0 && !info.other_sizes() {
        let size = info.page_kib / 1024;
        return Some(format!(
            "DPDK needs hugepages and none is free (/proc/meminfo: HugePages_Total {}, HugePages_Free {}, \
             HugePages_Rsvd {}): reserve some with `echo 256 > /proc/sys/vm/nr_hugepages` (256 pages of \
             {size} MiB; more if other programs use them, and vm.nr_hugepages in /etc/sysctl.d to keep it \
             after a reboot), {no_huge}",
            info.total, info.free, info.reserved
        ));
    }
    let in_memory = eal_args.iter().any(|arg| arg == "--in-memory");
    if !in_memory && !hugetlbfs_mounted(mounts) {
        return Some(format!(
            "DPDK needs a mounted hugetlbfs for its hugepages and /proc/mounts lists none: \
             `mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages`, or add \"--in-memory\" \
             to [net.dpdk] eal_args (hugepages without hugetlbfs), {no_huge}"
        ));
    }
    None
}

/// Whether EAL started with `eal_args` looks for hugepages itself: not with `--no-huge`, and not as a
/// secondary process (which takes the primary's).
fn wants_hugepages(eal_args: &[String]) -> bool {
    !eal_args
        .iter()
        .any(|arg| arg == "--no-huge" || arg.starts_with("--proc-type"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO_2M: &str = "MemTotal:       24570340 kB\n\
                              AnonHugePages:         0 kB\n\
                              HugePages_Total:     256\n\
                              HugePages_Free:      200\n\
                              HugePages_Rsvd:        8\n\
                              HugePages_Surp:        0\n\
                              Hugepagesize:       2048 kB\n\
                              Hugetlb:          524288 kB\n";
    const MOUNTS: &str = "proc /proc proc rw,nosuid 0 0\nhugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n";
    const NO_HUGETLBFS: &str = "proc /proc proc rw,nosuid 0 0\ntmpfs /dev/shm tmpfs rw 0 0\n";

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|arg| arg.to_string()).collect()
    }

    fn meminfo(total: u64, free: u64, reserved: u64, hugetlb_kib: u64) -> String {
        format!(
            "HugePages_Total: {total}\nHugePages_Free: {free}\nHugePages_Rsvd: {reserved}\n\
             HugePages_Surp: 0\nHugepagesize: 2048 kB\nHugetlb: {hugetlb_kib} kB\n"
        )
    }

    #[test]
    fn meminfo_hugepage_lines_are_read() {
        let info = Meminfo::parse(MEMINFO_2M).unwrap();
        assert_eq!(
            info,
            Meminfo { total: 256, free: 200, reserved: 8, page_kib: 2048, hugetlb_kib: Some(524288) }
        );
        assert_eq!(info.available(), 192);
        assert!(!info.other_sizes());
        // AnonHugePages is not HugePages_*; a kernel without hugetlb has none of these lines.
        assert_eq!(Meminfo::parse("MemTotal: 1 kB\nAnonHugePages: 0 kB\n"), None);
        // Before Hugetlb was added to meminfo.
        let old = Meminfo::parse(&MEMINFO_2M.replace("Hugetlb:          524288 kB\n", "")).unwrap();
        assert_eq!(old.hugetlb_kib, None);
        assert!(!old.other_sizes());
    }

    #[test]
    fn free_hugepages_and_a_mount_are_enough() {
        assert_eq!(hugepage_problem(&args(&["--no-pci"]), MEMINFO_2M, 0, MOUNTS), None);
        assert_eq!(hugepage_problem(&args(&["-m", "128"]), MEMINFO_2M, 0, MOUNTS), None);
    }

    #[test]
    fn no_free_hugepages_names_nr_hugepages_and_no_huge() {
        for text in [meminfo(0, 0, 0, 0), meminfo(64, 0, 0, 131072), meminfo(64, 10, 10, 131072)] {
            let problem = hugepage_problem(&args(&["--in-memory"]), &text, 0, MOUNTS)
                .unwrap_or_else(|| panic!("{text}"));
            assert!(problem.contains("none is free"), "{problem}");
            assert!(problem.contains("echo 256 > /proc/sys/vm/nr_hugepages"), "{problem}");
            assert!(problem.contains("\"--no-huge\""), "{problem}");
        }
    }

    #[test]
    fn eal_with_no_huge_or_as_secondary_needs_none() {
        let none = meminfo(0, 0, 0, 0);
        assert_eq!(hugepage_problem(&args(&["--no-huge", "-m", "128"]), &none, 0, NO_HUGETLBFS), None);
        assert_eq!(hugepage_problem(&args(&["--proc-type=secondary"]), &none, 0, NO_HUGETLBFS), None);
    }

    #[test]
    fn what_this_cannot_see_is_left_to_eal() {
        // The kernel may add pages on demand (overcommit), or pages of another size (1 GiB) are set up.
        assert_eq!(hugepage_problem(&[], &meminfo(0, 0, 0, 0), 64, MOUNTS), None);
        assert_eq!(hugepage_problem(&[], &meminfo(0, 0, 0, 1048576), 0, MOUNTS), None);
    }

    #[test]
    fn hugetlbfs_must_be_mounted_unless_in_memory() {
        let problem = hugepage_problem(&[], MEMINFO_2M, 0, NO_HUGETLBFS).unwrap();
        assert!(problem.contains("mount -t hugetlbfs nodev /dev/hugepages"), "{problem}");
        assert!(problem.contains("\"--in-memory\""), "{problem}");
        assert_eq!(hugepage_problem(&args(&["--in-memory"]), MEMINFO_2M, 0, NO_HUGETLBFS), None);
        assert!(hugetlbfs_mounted(MOUNTS));
        assert!(!hugetlbfs_mounted("hugetlbfs-not /x ext4 rw 0 0\n"));
    }

    #[test]
    fn a_kernel_without_hugetlb_is_named() {
        let problem = hugepage_problem(&[], "MemTotal: 1 kB\n", 0, MOUNTS).unwrap();
        assert!(problem.contains("this kernel has none"), "{problem}");
        assert!(problem.contains("\"--no-huge\""), "{problem}");
    }
}
