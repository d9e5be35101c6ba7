//! Build script of dpdk-sys: finds the system DPDK with pkg-config (libdpdk), generates bindings for an
//! allowlist of what Tandem calls (bindgen), and compiles the C shim for DPDK's static-inline fast path.
//!
//! The default links the shared libraries; the shared EAL loads its PMD plugins from
//! /usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0 by itself. Feature `static` links the archives instead, with
//! the PMDs Tandem uses whole-archive (a PMD registers itself from a constructor, so without
//! whole-archive the linker drops it and EAL later fails to parse its `--vdev`).

use std::env;
use std::path::PathBuf;

/// PMDs (and the buses, mempool driver and common code they need) linked whole-archive by feature
/// `static`: virtual devices for tests and trials (af_packet, tap, null), and virtio and the common
/// Intel NICs for the appliance. net_af_xdp is left out: it would pull in libxdp and libbpf.
const STATIC_PMDS: &[&str] = &[
    "rte_bus_vdev",
    "rte_bus_pci",
    "rte_mempool_ring",
    "rte_net_af_packet",
    "rte_net_tap",
    "rte_net_virtio",
    "rte_net_e1000",
    "rte_net_ixgbe",
    "rte_net_i40e",
    "rte_common_iavf",
    "rte_net_ice",
    "rte_net_null",
];

fn main() {
    println!("cargo:rerun-if-changed=csrc/wrapper.h");
    println!("cargo:rerun-if-changed=csrc/shim.h");
    println!("cargo:rerun-if-changed=csrc/shim.c");
    let statik = env::var_os("CARGO_FEATURE_STATIC").is_some();

    let dpdk = match pkg_config::Config::new()
        .atleast_version("22.11")
        .cargo_metadata(!statik)
        .probe("libdpdk")
    {
        Ok(library) => library,
        Err(err) => panic!(
            "dpdk-sys needs the system DPDK (22.11 or later) found through pkg-config: {err}\n\
             On Debian: apt-get install dpdk dpdk-dev libdpdk-dev pkg-config clang libclang-dev.\n\
             Build without the DPDK backend by leaving the `dpdk` feature of `dataplane` off."
        ),
    };
    if statik {
        link_static(&dpdk);
    }

    // `pkg-config --cflags libdpdk`: include paths, `-include rte_config.h` and an -march that the
    // inline functions need (SSE4.2 CRCs, 16-byte atomics).
    let mut clang_args: Vec<String> = dpdk
        .include_paths
        .iter()
        .map(|path| format!("-I{}", path.display()))
        .collect();
    clang_args.extend(["-include".to_string(), "rte_config.h".to_string()]);
    clang_args.extend(dpdk.defines.iter().map(|(name, value)| match value {
        Some(value) => format!("-D{name}={value}"),
        None => format!("-D{name}"),
    }));
    let march = cflags_march().unwrap_or_else(|| "-march=corei7".to_string());

    let mut shim = cc::Build::new();
    shim.file("csrc/shim.c")
        .include("csrc")
        .includes(&dpdk.include_paths)
        .flag("-include")
        .flag("rte_config.h")
        .flag(&march)
        .warnings(true)
        .extra_warnings(true)
        .flag_if_supported("-Wno-unused-parameter");
    shim.compile("tandem_dpdk_shim");

    let bindings = bindgen::Builder::default()
        .header("csrc/wrapper.h")
        .clang_args(&clang_args)
        .clang_arg(&march)
        .clang_arg("-Icsrc")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        // EAL, lcores and errors.
        .allowlist_function("rte_eal_init")
        .allowlist_function("rte_eal_cleanup")
        .allowlist_function("rte_thread_register")
        .allowlist_function("rte_thread_unregister")
        .allowlist_function("rte_lcore_count")
        .allowlist_function("rte_socket_id")
        .allowlist_function("rte_strerror")
        // Ports.
        .allowlist_function("rte_eth_dev_count_avail")
        .allowlist_function("rte_eth_find_next")
        .allowlist_function("rte_eth_dev_is_valid_port")
        .allowlist_function("rte_eth_dev_socket_id")
        .allowlist_function("rte_eth_dev_get_name_by_port")
        .allowlist_function("rte_eth_dev_info_get")
        .allowlist_function("rte_eth_dev_configure")
        .allowlist_function("rte_eth_dev_adjust_nb_rx_tx_desc")
        .allowlist_function("rte_eth_rx_queue_setup")
        .allowlist_function("rte_eth_tx_queue_setup")
        .allowlist_function("rte_eth_dev_start")
        .allowlist_function("rte_eth_dev_stop")
        .allowlist_function("rte_eth_dev_close")
        .allowlist_function("rte_eth_macaddr_get")
        .allowlist_function("rte_eth_dev_default_mac_addr_set")
        .allowlist_function("rte_eth_promiscuous_enable")
        .allowlist_function("rte_eth_promiscuous_disable")
        .allowlist_function("rte_eth_stats_get")
        .allowlist_function("rte_eth_stats_reset")
        // Packet buffers.
        .allowlist_function("rte_pktmbuf_pool_create")
        .allowlist_function("rte_mempool_free")
        .allowlist_function("rte_mempool_avail_count")
        .allowlist_function("rte_mempool_in_use_count")
        // The shim.
        .allowlist_function("tandem_.*")
        .allowlist_type("rte_eth_conf")
        .allowlist_type("rte_eth_dev_info")
        .allowlist_type("rte_eth_stats")
        .allowlist_type("rte_ether_addr")
        .allowlist_type("rte_eth_rxconf")
        .allowlist_type("rte_eth_txconf")
        .allowlist_var("RTE_MAX_ETHPORTS")
        .allowlist_var("RTE_MAX_LCORE")
        .allowlist_var("RTE_PKTMBUF_HEADROOM")
        .allowlist_var("RTE_ETHER_ADDR_LEN")
        .allowlist_var("RTE_ETH_NAME_MAX_LEN")
        // Opaque to Rust: mbufs and pools are only touched through the shim and DPDK's functions.
        .opaque_type("rte_mbuf")
        .opaque_type("rte_mempool")
        .blocklist_type("rte_mbuf_.+")
        .blocklist_type("rte_mempool_.+")
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .generate()
        .expect("bindgen could not generate the DPDK bindings (is libclang-dev installed?)");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings
        .write_to_file(&out)
        .expect("writing the DPDK bindings");
}

/// The -march that libdpdk's Cflags ask for (Debian: corei7), passed to both clang and the C compiler.
fn cflags_march() -> Option<String> {
    let output = std::process::Command::new("pkg-config")
        .args(["--cflags", "libdpdk"])
        .output()
        .ok()?;
    String::from_utf8(output.stdout)
        .ok()?
        .split_whitespace()
        .find(|flag| flag.starts_with("-march="))
        .map(str::to_string)
}

/// Feature `static`: the core libraries as archives, the PMDs in [`STATIC_PMDS`] whole-archive, and
/// `--export-dynamic` so PMDs that look up EAL symbols at run time find them.
fn link_static(dpdk: &pkg_config::Library) {
    for path in &dpdk.link_paths {
        println!("cargo:rustc-link-search=native={}", path.display());
    }
    for pmd in STATIC_PMDS {
        println!("cargo:rustc-link-lib=static:+whole-archive,-bundle={pmd}");
    }
    // libdpdk-libs' list, in its order (dependents before what they depend on); rte_gso for net_tap.
    for lib in &dpdk.libs {
        if lib.starts_with("rte_") {
            println!("cargo:rustc-link-lib=static:-bundle={lib}");
        }
    }
    for lib in ["bsd", "numa", "pcap", "fdt", "dl", "m", "pthread"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,--export-dynamic");
}
