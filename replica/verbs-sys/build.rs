//! Build script of verbs-sys: finds the system libibverbs with pkg-config, generates bindings for an
//! allowlist of what Tandem calls (bindgen reads the same /usr/include/infiniband/verbs.h the library
//! was built with, so struct sizes agree), and compiles the C shim for the static-inline verbs.
//!
//! Only libibverbs is linked; the provider (rxe, mlx5 ...) is a plugin it loads at run time through
//! /etc/libibverbs.d/*.driver, so one binary serves Soft-RoCE and real NICs.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/wrapper.h");
    println!("cargo:rerun-if-changed=csrc/shim.h");
    println!("cargo:rerun-if-changed=csrc/shim.c");

    let verbs = match pkg_config::Config::new().atleast_version("1.1").probe("libibverbs") {
        Ok(library) => library,
        Err(err) => panic!(
            "verbs-sys needs the system libibverbs found through pkg-config: {err}\n\
             On Debian: apt-get install libibverbs-dev rdma-core ibverbs-providers pkg-config clang libclang-dev.\n\
             Build without the RDMA transport by leaving the `rdma` feature of `replica` off."
        ),
    };
    let clang_args: Vec<String> = verbs
        .include_paths
        .iter()
        .map(|path| format!("-I{}", path.display()))
        .collect();

    cc::Build::new()
        .file("csrc/shim.c")
        .include("csrc")
        .includes(&verbs.include_paths)
        .warnings(true)
        .extra_warnings(true)
        .flag_if_supported("-Wno-unused-parameter")
        .compile("tandem_verbs_shim");

    let bindings = bindgen::Builder::default()
        .header("csrc/wrapper.h")
        .clang_args(&clang_args)
        .clang_arg("-Icsrc")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        // Devices.
        .allowlist_function("ibv_get_device_list")
        .allowlist_function("ibv_free_device_list")
        .allowlist_function("ibv_get_device_name")
        .allowlist_function("ibv_get_device_guid")
        .allowlist_function("ibv_open_device")
        .allowlist_function("ibv_close_device")
        .allowlist_function("ibv_query_device")
        .allowlist_function("ibv_query_gid")
        // Protection domains, memory regions, completion queues and channels.
        .allowlist_function("ibv_alloc_pd")
        .allowlist_function("ibv_dealloc_pd")
        .allowlist_function("ibv_reg_mr")
        .allowlist_function("ibv_dereg_mr")
        .allowlist_function("ibv_create_cq")
        .allowlist_function("ibv_destroy_cq")
        .allowlist_function("ibv_create_comp_channel")
        .allowlist_function("ibv_destroy_comp_channel")
        .allowlist_function("ibv_get_cq_event")
        .allowlist_function("ibv_ack_cq_events")
        // Queue pairs.
        .allowlist_function("ibv_create_qp")
        .allowlist_function("ibv_destroy_qp")
        .allowlist_function("ibv_modify_qp")
        .allowlist_function("ibv_query_qp")
        // Names for statuses and states.
        .allowlist_function("ibv_wc_status_str")
        .allowlist_function("ibv_port_state_str")
        // The shim.
        .allowlist_function("tandem_.*")
        .allowlist_type("ibv_gid")
        .allowlist_type("ibv_gid_entry")
        .allowlist_type("ibv_gid_type")
        .allowlist_type("ibv_sge")
        .allowlist_type("ibv_send_wr")
        .allowlist_type("ibv_recv_wr")
        .allowlist_type("ibv_wc")
        .allowlist_type("ibv_mr")
        .allowlist_type("ibv_port_attr")
        .allowlist_type("ibv_device_attr")
        .allowlist_type("ibv_global_route")
        .allowlist_type("ibv_ah_attr")
        .allowlist_type("ibv_qp_cap")
        .allowlist_type("ibv_qp_init_attr")
        .allowlist_type("ibv_qp_attr")
        .allowlist_type("ibv_wc_status")
        .allowlist_type("ibv_wc_opcode")
        .allowlist_type("ibv_wc_flags")
        .allowlist_type("ibv_wr_opcode")
        .allowlist_type("ibv_send_flags")
        .allowlist_type("ibv_access_flags")
        .allowlist_type("ibv_qp_attr_mask")
        .allowlist_type("ibv_qp_state")
        .allowlist_type("ibv_qp_type")
        .allowlist_type("ibv_mtu")
        .allowlist_type("ibv_port_state")
        .allowlist_var("IBV_LINK_LAYER_.*")
        // Opaque to Rust: devices, contexts, PDs, CQs and QPs are handles only touched through libibverbs
        // and the shim (their ops tables are the provider's business).
        .opaque_type("ibv_device")
        .opaque_type("ibv_context")
        .opaque_type("ibv_pd")
        .opaque_type("ibv_cq")
        .opaque_type("ibv_qp")
        .opaque_type("ibv_srq")
        .opaque_type("ibv_comp_channel")
        .opaque_type("ibv_mw")
        .opaque_type("ibv_ah")
        .opaque_type("ibv_xrcd")
        .opaque_type("ibv_mw_bind_info")
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .generate()
        .expect("bindgen could not generate the verbs bindings (is libclang-dev installed?)");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings.write_to_file(&out).expect("writing the verbs bindings");
}
