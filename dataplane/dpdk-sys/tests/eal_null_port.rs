//! dpdk-sys against the real EAL: starts it without hugepages, PCI or privileges on DPDK's null
//! device and checks that the PMD registered itself and its port comes up. With feature `static` this
//! is the check that the whole-archive PMD link kept the driver (without it EAL cannot parse the vdev).
//! EAL starts once per process, so this file holds one test.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;

use dpdk_sys as sys;

#[test]
fn eal_starts_and_finds_the_null_port() {
    let args = [
        "dpdk-sys-test",
        "-l0",
        "--no-huge",
        "-m",
        "64",
        "--no-shconf",
        "--no-pci",
        "--no-telemetry",
        "--log-level=lib.eal:error",
        "--vdev=net_null0",
    ];
    let args: Vec<CString> = args.iter().map(|arg| CString::new(*arg).unwrap()).collect();
    let mut argv: Vec<*mut c_char> = args.iter().map(|arg| arg.as_ptr() as *mut c_char).collect();
    // SAFETY: argv holds argc NUL-terminated strings that outlive the process's use of EAL (the test).
    let parsed = unsafe { sys::rte_eal_init(argv.len() as i32, argv.as_mut_ptr()) };
    if parsed < 0 {
        // SAFETY: reads the thread's rte_errno; rte_strerror returns a static string.
        let reason = unsafe { CStr::from_ptr(sys::rte_strerror(sys::tandem_rte_errno())) };
        panic!("EAL did not start: {}", reason.to_string_lossy());
    }
    // SAFETY: EAL is started.
    assert_eq!(
        unsafe { sys::rte_eth_dev_count_avail() },
        1,
        "net_null0 is the one port"
    );
    let mut info = sys::rte_eth_dev_info::default();
    // SAFETY: port 0 exists; info is a live rte_eth_dev_info.
    assert_eq!(unsafe { sys::rte_eth_dev_info_get(0, &mut info) }, 0);
    // SAFETY: the driver's name is a static NUL-terminated string.
    let driver = unsafe { CStr::from_ptr(info.driver_name) };
    assert_eq!(driver.to_str().unwrap(), "net_null");
    // SAFETY: the main thread has lcore 0 after init.
    assert_eq!(unsafe { sys::tandem_rte_lcore_id() }, 0);
    // SAFETY: nothing of EAL is in use any more.
    assert_eq!(unsafe { sys::rte_eal_cleanup() }, 0);
}
