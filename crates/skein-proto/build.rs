//! Generates the gRPC code from `proto/`. Uses `$PROTOC` when set, else the vendored protoc,
//! so a build needs no system package.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let admin = root.join("skein/admin/v1/admin.proto");
    let raft = root.join("skein/raft/v1/raft.proto");
    let responses = root.join("skein/responses/v1/responses.proto");
    let idempotency = root.join("skein/idempotency/v1/idempotency.proto");
    println!("cargo:rerun-if-changed={}", admin.display());
    println!("cargo:rerun-if-changed={}", raft.display());
    println!("cargo:rerun-if-changed={}", responses.display());
    println!("cargo:rerun-if-changed={}", idempotency.display());
    println!("cargo:rerun-if-env-changed=PROTOC");
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let descriptors = PathBuf::from(std::env::var("OUT_DIR")?).join("skein_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptors)
        .compile_with_config(config, &[admin, raft, responses, idempotency], &[root])?;
    Ok(())
}
